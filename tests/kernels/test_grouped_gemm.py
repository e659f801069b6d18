"""ops.grouped_gemm against a float64 torch loop over the groups: forward and the gradients of
x, weight and bias, with empty groups, a single huge group, odd sizes, both dtypes, weight
layouts (K-contiguous, a transposed [G, K, N] view, other strides), the TMA and pointer
kernels; bad input; no host sync (CUDA-graph capture, on the GPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kernforge as kf
from kernforge import config, ops
from kernforge.errors import DeviceError, DTypeError, ShapeError, UnsupportedError
from kernforge.kernels import grouped_gemm as gg
from tests.helpers import DEVICE, ON_GPU, assert_close, f64, grads, randn, sizes

DTYPES = [torch.float16, torch.bfloat16]

#: (N, K, group sizes): empty groups, a single group holding every row (between empty ones),
#: odd N/K (pointer kernel: rows not 16-byte aligned), one row, no rows at all, 11 groups.
CASES = sizes(
    cpu=[
        (48, 64, [5, 0, 20, 12]),
        (24, 64, [0, 40, 0]),
        (17, 33, [1, 7, 0, 15]),
        (8, 16, [1]),
        (16, 32, [0, 0]),
        (40, 48, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 11]),
    ],
    gpu=[
        (1024, 512, "route:4096:8"),
        (512, 768, [0, 8192, 0, 0]),
        (2816, 2048, "route:300:64"),
        (1000, 1000, [10, 0, 490, 333, 167]),
        (4096, 1408, "route:2048:64"),
    ],
)


def group_sizes(spec, generator=None) -> torch.Tensor:
    """int32 sizes from a list, or from ``"route:T:G"``: T tokens routed at random (uneven)."""
    if isinstance(spec, str):
        _, t, g = spec.split(":")
        logits = torch.randn(int(t), int(g)) + 2 * torch.randn(int(g))  # popular experts
        ids = logits.argmax(-1)
        return torch.bincount(ids, minlength=int(g)).to(torch.int32).to(DEVICE)
    return torch.tensor(spec, dtype=torch.int32, device=DEVICE)


#: weight [G, N, K] as a view of a parameter in each layout: K-contiguous; the transpose of a
#: [G, K, N] tensor (read in place); K stride 2 (neither: the kernel copies it).
LAYOUTS = {
    "kmajor": (lambda g, n, k: (g, n, k), lambda p: p),
    "nmajor": (lambda g, n, k: (g, k, n), lambda p: p.transpose(1, 2)),
    "strided": (lambda g, n, k: (g, n, 2 * k), lambda p: p[:, :, ::2]),
}


def check(n, k, sizes_t, dtype, layout="kmajor", bias=True, x_layout="contiguous"):
    """ops.grouped_gemm on Triton vs the float64 torch loop: y, dx, dweight, dbias (the weight
    gradient taken at the parameter the weight is a view of)."""
    g = sizes_t.shape[0]
    t = int(sizes_t.sum())
    shape, view = LAYOUTS[layout]
    x = randn((t, k), dtype, layout=x_layout, requires_grad=True)
    param = randn(shape(g, n, k), dtype, scale=k**-0.5, requires_grad=True)
    b = randn((g, n), dtype, requires_grad=True) if bias else None
    with kf.backend("triton"):
        y = ops.grouped_gemm(x, view(param), sizes_t, b)
        gy = randn(y.shape, dtype)
        got = grads([y], [x, param, b], [gy])
    xd, pd, bd = f64(x, param, b)
    ref = gg.grouped_gemm_torch(xd, view(pd), sizes_t, bd)
    want = grads([ref], [xd, pd, bd], [gy.double()])
    assert y.dtype == dtype and y.shape == (t, n)
    assert_close(y, ref, dtype, "y")
    for out, exp, what in zip(got, want, ["dx", "dweight", "dbias"], strict=True):
        if exp is None:
            assert out is None, what
            continue
        assert out.dtype == dtype and out.shape == exp.shape, what
        assert_close(out, exp, dtype, what)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_gemm_matches_reference(case, dtype):
    n, k, spec = case
    check(n, k, group_sizes(spec), dtype)


@pytest.mark.parametrize("layout", ["nmajor", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_layouts(layout, dtype):
    check(48, 64, group_sizes([5, 0, 20, 12]), dtype, layout=layout)


@pytest.mark.parametrize("x_layout", ["padded", "strided"])
def test_non_contiguous_x(x_layout):
    check(32, 48, group_sizes([9, 0, 14]), torch.float16, x_layout=x_layout)


@pytest.mark.parametrize("case", CASES[:3], ids=str)
def test_pointer_kernel(case, monkeypatch):
    """The pointer kernels (other GPUs, unaligned shapes) where TMA would run."""
    monkeypatch.setattr(gg, "ALLOW_TMA", False)
    n, k, spec = case
    check(n, k, group_sizes(spec), torch.bfloat16, layout="nmajor")


#: The candidate configs' code paths at interpreter-sized tiles (GPU: the configs themselves).
VARIANTS = {
    "persistent": {},
    "tile-per-program": {"programs_per_sm": 0},
    "plain-x-descriptor": {"ragged": False},
    "subtiled-epilogue": {"epilogue_subtile": True},
    "flattened": {"flatten": True, "group_m": 1},
}


def _has(cfg, fields: dict) -> bool:
    return all(getattr(cfg, k) == v for k, v in fields.items() if k != "group_m")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variants(variant, monkeypatch):
    fields = VARIANTS[variant]
    if ON_GPU:  # the first candidate config of this kind, as the tuner would run it
        configs = [c for c in gg.FWD_CONFIGS if _has(c, fields)]
        if not configs:
            pytest.skip("no candidate config of this kind")
        cfg = configs[0]
    else:
        cfg = dataclasses.replace(gg.FWD_INTERPRET, **fields)
    monkeypatch.setattr(gg, "FWD_INTERPRET", cfg)
    monkeypatch.setattr(gg.FWD_TUNER, "pick", lambda key, run, default: cfg)
    check(48, 64, group_sizes([5, 0, 20, 12, 33]), torch.bfloat16)


def test_tma_path_taken_for_aligned_inputs():
    x = randn((37, 64), torch.float16)
    w = randn((4, 48, 64), torch.float16)
    y = torch.empty(37, 48, dtype=torch.float16, device=DEVICE)
    if ON_GPU and torch.cuda.get_device_capability()[0] < 9:
        assert not gg._tma_ok(x, w, y)
    else:
        assert gg._tma_ok(x, w, y) and gg._tma_ok(x, w.transpose(1, 2).contiguous(), y)
    assert not gg._tma_ok(randn((37, 33), torch.float16))  # 66-byte rows


def test_no_bias_and_partial_grads():
    sizes_t = group_sizes([4, 0, 9])
    x = randn((13, 32), torch.bfloat16)  # no gradient wanted for x
    w = randn((3, 24, 32), torch.bfloat16, requires_grad=True)
    with kf.backend("triton"):
        y = ops.grouped_gemm(x, w, sizes_t)
        (dw,) = torch.autograd.grad(y.float().square().sum(), [w])
    xd, wd = f64(x, w)
    ref = gg.grouped_gemm_torch(xd, wd, sizes_t)
    (want,) = torch.autograd.grad(ref.square().sum(), [wd])
    assert_close(y, ref, torch.bfloat16, "y")
    assert_close(dw, want, torch.bfloat16, "dweight", tol_scale=2)


def test_int64_group_sizes():
    sizes64 = group_sizes([3, 0, 6]).long()
    check(16, 32, sizes64, torch.float16, bias=False)


def test_oversized_group_sizes_stay_in_bounds(monkeypatch):
    """With the check off, sizes summing past T are clamped in the kernel: rows past T are never
    touched (here the first group takes every row)."""
    monkeypatch.setattr(
        config, "settings", dataclasses.replace(config.settings, check_indices=False)
    )
    x = randn((10, 32), torch.float16)
    w = randn((2, 16, 32), torch.float16)
    with kf.backend("triton"):
        y = ops.grouped_gemm(x, w, group_sizes([10, 7]))
    assert_close(y, x.double() @ w[0].double().t(), torch.float16, "y")


def test_torch_reference_is_a_loop_over_groups():
    sizes_t = group_sizes([2, 0, 3])
    x, w, b = randn((5, 8)), randn((3, 4, 8)), randn((3, 4))
    y = gg.grouped_gemm_torch(x, w, sizes_t, b)
    want = torch.cat([x[:2] @ w[0].t() + b[0], x[2:] @ w[2].t() + b[2]])
    torch.testing.assert_close(y, want)
    with kf.backend("torch"):
        torch.testing.assert_close(ops.grouped_gemm(x, w, sizes_t, b), want)


def test_bad_inputs():
    x = randn((6, 16), torch.float16)
    w = randn((2, 8, 16), torch.float16)
    s = group_sizes([2, 4])
    with pytest.raises(ShapeError, match="K=16"):
        ops.grouped_gemm(x, randn((2, 8, 12), torch.float16), s)
    with pytest.raises(DTypeError, match="one dtype"):
        ops.grouped_gemm(x, w.float(), s)
    with pytest.raises(DTypeError, match="int32 or int64"):
        ops.grouped_gemm(x, w, s.float())
    with pytest.raises(ShapeError, match="group_sizes"):
        ops.grouped_gemm(x, w, group_sizes([1, 2, 3]))
    with pytest.raises(ShapeError, match="sum to x's 6 rows"):
        ops.grouped_gemm(x, w, group_sizes([2, 5]))
    with pytest.raises(ShapeError, match=">= 0"):
        ops.grouped_gemm(x, w, group_sizes([-1, 7]))
    with pytest.raises(ShapeError, match="bias"):
        ops.grouped_gemm(x, w, s, randn((2, 7), torch.float16))
    with pytest.raises(ShapeError, match="3-D"):
        ops.grouped_gemm(x, w[0], s)
    with pytest.raises(ShapeError, match="2-D"):
        ops.grouped_gemm(x[None], w, s)
    if ON_GPU:
        with pytest.raises(DeviceError):
            ops.grouped_gemm(x, w, s.cpu())


def test_float32_is_not_a_triton_dtype():
    x, w, s = randn((6, 16)), randn((2, 8, 16)), group_sizes([2, 4])
    assert "float32" in gg._supports(x, w, s)
    with kf.backend("triton"), pytest.raises(UnsupportedError):  # the fallback is forbidden here
        ops.grouped_gemm(x, w, s)


@pytest.mark.gpu
def test_cuda_graph_capture_without_host_sync():
    """The schedule is built on the device: a captured call replays with new group sizes."""
    g, n, k, t = 8, 256, 128, 1000
    x = randn((t, k), torch.bfloat16)
    w = randn((g, n, k), torch.bfloat16, scale=k**-0.5)
    sizes_t = group_sizes("route:1000:8")
    with kf.backend("triton"):
        y = ops.grouped_gemm(x, w, sizes_t)  # compile (and tune) outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = ops.grouped_gemm(x, w, sizes_t)
        new = group_sizes([0, 500, 0, 0, 250, 250, 0, 0])
        sizes_t.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
    ref = gg.grouped_gemm_torch(x.double(), w.double(), new)
    assert_close(y, ref, torch.bfloat16, "y after replay")


def test_compiles_without_graph_breaks():
    """The custom ops (with fake implementations) trace under torch.compile(fullgraph=True),
    forward and backward, for both weight layouts."""

    def f(x, w_up, w_down_t, sizes):
        h = ops.grouped_gemm(x, w_up, sizes)
        return ops.grouped_gemm(h, w_down_t.transpose(1, 2), sizes)

    sizes_t = group_sizes([6, 0, 11])
    x = randn((17, 32), torch.float16, requires_grad=True)
    w_up = randn((3, 48, 32), torch.float16, scale=0.2, requires_grad=True)
    w_down_t = randn((3, 48, 32), torch.float16, scale=0.2, requires_grad=True)
    with kf.backend("triton"):
        torch._dynamo.reset()
        y = torch.compile(f, fullgraph=True)(x, w_up, w_down_t, sizes_t)
        got = grads([y], [x, w_up, w_down_t], [torch.ones_like(y)])
    xd, ud, dd = f64(x, w_up, w_down_t)
    with kf.backend("torch"):
        ref = f(xd, ud, dd, sizes_t)
    want = grads([ref], [xd, ud, dd], [torch.ones_like(ref)])
    assert_close(y, ref, torch.float16, "y")
    for g, w, what in zip(got, want, ["dx", "dw_up", "dw_down"], strict=True):
        assert_close(g, w, torch.float16, what)
