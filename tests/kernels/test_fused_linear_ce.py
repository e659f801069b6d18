"""ops.fused_linear_cross_entropy against ``F.linear`` + ``F.cross_entropy`` in float64:
chunking (tails), vocabularies, ignore_index, options, reductions, dtypes, layouts, gradients of
hidden, weight and bias, retained graphs, compile, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernforge as kf
from kernforge import ops
from kernforge.kernels import fused_linear_ce as flce
from tests.helpers import DEVICE, DTYPES, ON_GPU, TOL, randn
from tests.kernels.test_cross_entropy import IGNORE, close, ref_ce, rel, targets


def make(n, h, v, dtype=torch.float32, bias=False, layout="contiguous"):
    """hidden [n, h], weight [v, h] scaled so that logits are O(1-3), bias or None."""
    x = randn((n, h), dtype, layout=layout, requires_grad=True)
    w = randn((v, h), dtype, scale=2.0 * h**-0.5, requires_grad=True)
    b = randn((v,), dtype, scale=0.5, requires_grad=True) if bias else None
    return x, w, b


def reference(x, w, t, b=None, **kw):
    """Loss and float64 gradients of the unfused computation on the same (rounded) inputs."""
    xd, wd = (a.detach().double().requires_grad_() for a in (x, w))
    bd = None if b is None else b.detach().double().requires_grad_()
    loss = ref_ce(F.linear(xd, wd, bd), t, **kw)
    return loss, [xd, wd, bd]


def check(x, w, t, b=None, chunk_size=None, tol_scale=1.0, **kw):
    """Triton loss and gradients (hidden, weight, bias) against the float64 reference."""
    reduction = kw.get("reduction", "mean")
    with kf.backend("triton"):
        loss = ops.fused_linear_cross_entropy(x, w, t, b, chunk_size=chunk_size, **kw)
    sign = torch.randint(0, 2, loss.shape, device=DEVICE) * 2 - 1
    gy = (torch.rand(loss.shape, device=DEVICE) + 0.5) * sign
    inputs = [a for a in (x, w, b) if a is not None and a.requires_grad]
    got = torch.autograd.grad(loss, inputs, gy) if inputs else []
    want, leaves = reference(x, w, t, b, **kw)
    live = [d for a, d in zip((x, w, b), leaves, strict=True) if a is not None and a.requires_grad]
    want_g = torch.autograd.grad(want, live, gy.double()) if live else []
    assert loss.dtype == torch.float32
    # The logits are rounded to the input dtype before the loss (as in the unfused bf16 path).
    tol = 2 * TOL[x.dtype] * tol_scale
    floors = [0.0] * (1 + len(got))
    if x.dtype == torch.float16:
        # fp16 dlogits of a "mean" loss at large N * V sit in fp16's subnormals, in the unfused
        # torch path as here: be as close to the truth as that path is, at least.
        floors = [1.5 * e for e in unfused_errors(x, w, t, b, gy, want, want_g, inputs, kw)]
    close(loss, want, max(tol, floors[0]), f"loss ({reduction})")
    for g, wg, a, floor in zip(got, want_g, inputs, floors[1:], strict=True):
        assert g.dtype == a.dtype and g.shape == a.shape
        close(g, wg, max(tol, floor), f"grad {tuple(a.shape)} ({reduction})")
    return loss, got


def unfused_errors(x, w, t, b, gy, want, want_g, inputs, kw):
    """Errors of the unfused torch computation in the input dtype (logits in that dtype, an
    fp32 loss): loss first, then each gradient of ``inputs``."""
    loss = ref_ce(F.linear(x, w, b).float(), t, **kw)
    grads = torch.autograd.grad(loss, inputs, gy) if inputs else []
    return [rel(loss, want), *(rel(g, wg) for g, wg in zip(grads, want_g, strict=True))]


#: (tokens, hidden, vocab, chunk): chunks with a tail, one chunk, a chunk per token, a single
#: class, a vocabulary past the interpreter's 4096-wide tile.
SHAPES = [(37, 24, 1000, 16), (20, 16, 7, None), (5, 8, 33, 1), (9, 16, 1, 4), (6, 32, 5003, 4)]
GPU_SHAPES = [(1000, 512, 32000, 256), (300, 1024, 128256, 128), (4099, 256, 151936, None)]


@pytest.mark.parametrize("shape", SHAPES + (GPU_SHAPES if ON_GPU else []), ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(shape, dtype):
    n, h, v, chunk = shape
    x, w, _ = make(n, h, v, dtype)
    check(x, w, targets((n,), v, ignored=[1]), chunk_size=chunk)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "smooth, z",
    [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.3, 0.05)],
    ids=["plain", "smooth", "z", "smooth+z"],
)
def test_options_with_bias(smooth, z, reduction):
    x, w, b = make(29, 16, 300, bias=True)
    t = targets((29,), 300, ignored=[0, 7, 28])
    check(x, w, t, b, chunk_size=8, label_smoothing=smooth, z_loss=z, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bias_half(dtype, reduction):
    x, w, b = make(19, 32, 250, dtype, bias=True)
    t = targets((19,), 250, ignored=[3])
    check(x, w, t, b, chunk_size=8, label_smoothing=0.1, z_loss=1e-3, reduction=reduction)


@pytest.mark.parametrize("which", ["hidden", "weight", "bias", "none"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_partial_requires_grad(which, reduction):
    """Only the gradients asked for are computed and returned (a frozen lm_head, say)."""
    x, w, b = make(11, 8, 40, bias=True)
    for name, a in (("hidden", x), ("weight", w), ("bias", b)):
        a.requires_grad_(name == which)
    t = targets((11,), 40, ignored=[2])
    check(x, w, t, b, chunk_size=4, reduction=reduction)


def test_no_grad_mode():
    x, w, b = make(13, 8, 40, bias=True)
    t = targets((13,), 40, ignored=[5])
    with torch.no_grad(), kf.backend("triton"):
        loss = ops.fused_linear_cross_entropy(x, w, t, b, chunk_size=5, z_loss=1e-3)
    want, _ = reference(x, w, t, b, z_loss=1e-3)
    assert not loss.requires_grad
    close(loss, want, 1e-5, "loss")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(reduction):
    x, w, b = make(6, 8, 20, bias=True)
    t = torch.full((6,), IGNORE, device=DEVICE)
    with kf.backend("triton"):
        loss = ops.fused_linear_cross_entropy(x, w, t, b, reduction=reduction, chunk_size=4)
    grads = torch.autograd.grad(loss, [x, w, b], torch.ones_like(loss))
    assert torch.equal(loss, torch.zeros_like(loss))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


def test_no_tokens():
    x, w, b = make(0, 8, 20, bias=True)
    t = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    with kf.backend("triton"):
        loss = ops.fused_linear_cross_entropy(x, w, t, b)
    gx, gw, gb = torch.autograd.grad(loss, [x, w, b])
    assert loss.item() == 0.0 and gx.shape == (0, 8)
    assert torch.equal(gw, torch.zeros_like(gw)) and torch.equal(gb, torch.zeros_like(gb))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_retained_graph_second_backward(reduction):
    """The saved gradients are scaled in place; a second backward with another incoming
    gradient must still give the right answer (and the first result must not change)."""
    x, w, b = make(10, 8, 30, bias=True)
    t = targets((10,), 30, ignored=[4])
    with kf.backend("triton"):
        loss = ops.fused_linear_cross_entropy(x, w, t, b, reduction=reduction, chunk_size=4)
    want, leaves = reference(x, w, t, b, reduction=reduction)
    base = torch.autograd.grad(want, leaves)
    first = torch.autograd.grad(loss, [x, w, b], torch.tensor(2.5), retain_graph=True)
    second = torch.autograd.grad(loss, [x, w, b], torch.tensor(-0.75), retain_graph=True)
    third = torch.autograd.grad(loss, [x, w, b], torch.tensor(1.0))
    for g1, g2, g3, ref in zip(first, second, third, base, strict=True):
        close(g1, 2.5 * ref, 1e-5, "first backward")
        close(g2, -0.75 * ref, 1e-5, "second backward")
        close(g3, ref, 1e-5, "third backward")


def test_retained_graph_after_grads_were_accumulated():
    """The first backward hands its gradients to .grad without a copy; once .grad has been
    added to, a second backward through the retained graph says so instead of going wrong."""
    x, w, b = make(10, 8, 30, bias=True)
    t = targets((10,), 30, ignored=[4])
    with kf.backend("triton"):
        loss = ops.fused_linear_cross_entropy(x, w, t, b, chunk_size=4)
    loss.backward(retain_graph=True)
    want, leaves = reference(x, w, t, b)
    base = torch.autograd.grad(want, leaves)
    for a, ref in zip((x, w, b), base, strict=True):
        close(a.grad, ref, 1e-5, "first backward")
    loss.backward(retain_graph=True)  # adds the same gradients again: fine
    for a, ref in zip((x, w, b), base, strict=True):
        close(a.grad, 2 * ref, 1e-5, "second backward")
    with pytest.raises(kf.UnsupportedError, match="retained graph"):
        loss.backward()


def test_accumulates_into_existing_grads():
    x, w, b = make(10, 8, 30, bias=True)
    t = targets((10,), 30)
    with kf.backend("triton"):
        for _ in range(2):
            ops.fused_linear_cross_entropy(x, w, t, b, chunk_size=3).backward()
    want, leaves = reference(x, w, t, b)
    base = torch.autograd.grad(want, leaves)
    for a, ref in zip((x, w, b), base, strict=True):
        close(a.grad, 2 * ref, 1e-5, "accumulated grad")


@pytest.mark.parametrize("flat_target", [False, True])
def test_leading_dims(flat_target):
    x = randn((2, 5, 16), torch.float32, requires_grad=True)
    w = randn((50, 16), torch.float32, scale=0.5, requires_grad=True)
    t = targets((2, 5), 50, ignored=[3])
    t = t.reshape(-1) if flat_target else t
    loss, (gx, _) = check(x, w, t, chunk_size=3, reduction="none")
    assert loss.shape == t.shape and gx.shape == x.shape
    check(x, w, t, chunk_size=4)


@pytest.mark.parametrize("layout", ["padded", "strided"])
def test_non_contiguous_hidden(layout):
    x, w, _ = make(17, 24, 100, torch.bfloat16, layout=layout)
    assert not x.is_contiguous()
    check(x, w, targets((17,), 100, ignored=[0]), chunk_size=5, label_smoothing=0.1)


def test_transposed_weight():
    # weight as the transpose of an [H, V] buffer (column-major [V, H]): cuBLAS takes it as is.
    x = randn((12, 16), torch.float32, requires_grad=True)
    w = randn((16, 70), torch.float32, scale=0.5).t().requires_grad_()
    check(x, w, targets((12,), 70), chunk_size=5, z_loss=1e-3)


def test_int32_target_and_other_ignore_index():
    x, w, _ = make(12, 8, 20)
    t = targets((12,), 20, ignored=[1, 2], ignore_index=3, dtype=torch.int32)
    check(x, w, t, chunk_size=5, ignore_index=3)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ops_compile_without_graph_breaks(reduction):
    def f(x, w, t, b):
        loss = ops.fused_linear_cross_entropy(x, w, t, b, label_smoothing=0.1, z_loss=1e-3,
                                              reduction=reduction, chunk_size=4)  # fmt: skip
        return loss if reduction == "mean" else (loss * loss).sum()

    x, w, b = make(10, 8, 30, bias=True)
    t = targets((10,), 30, ignored=[6])
    with kf.backend("triton"):
        torch._dynamo.reset()
        out = torch.compile(f, fullgraph=True)(x, w, t, b)
        got = torch.autograd.grad(out, [x, w, b])
    xd, wd, bd = (a.detach().double().requires_grad_() for a in (x, w, b))
    loss = ref_ce(F.linear(xd, wd, bd), t, label_smoothing=0.1, z_loss=1e-3, reduction=reduction)
    want = loss if reduction == "mean" else (loss * loss).sum()
    want_g = torch.autograd.grad(want, [xd, wd, bd])
    close(out, want, 1e-5, "out")
    for g, wg in zip(got, want_g, strict=True):
        close(g, wg, 1e-5, "grad")


def test_torch_backend_matches_reference():
    x, w, b = make(7, 8, 20, torch.float64, bias=True)
    t = targets((7,), 20, ignored=[0])
    with kf.backend("torch"):
        got = ops.fused_linear_cross_entropy(x, w, t, b, label_smoothing=0.2, z_loss=0.01)
    want, _ = reference(x, w, t, b, label_smoothing=0.2, z_loss=0.01)
    torch.testing.assert_close(got, want)


def test_default_chunk():
    assert flce.default_chunk(8192, 128256, 2) == 1024  # 263 MB of bf16 logits
    assert flce.default_chunk(100, 7, 4) == 100  # everything in one chunk
    assert flce.default_chunk(10**6, 10**6, 4) == flce.MIN_CHUNK
    assert flce.default_chunk(0, 10, 2) == 1


def test_float64_is_not_taken_by_triton():
    x, w, _ = make(3, 4, 5, torch.float64)
    with kf.backend("triton"), pytest.raises(kf.UnsupportedError, match="float64"):
        ops.fused_linear_cross_entropy(x, w, targets((3,), 5))


def _bad(kind):
    x, w, b = randn((4, 8)), randn((10, 8)), randn((10,))
    t = targets((4,), 10)
    return {
        "h-mismatch": (x, randn((10, 7)), t, None),
        "weight-1d": (x, randn((8,)), t, None),
        "weight-transposed": (x, randn((8, 10)), t, None),
        "bias-shape": (x, w, t, randn((9,))),
        "dtype-mix": (x, w.half(), t, None),
        "bias-dtype": (x, w, t, b.double()),
        "target-rows": (x, w, targets((5,), 10), None),
        "target-float": (x, w, t.float(), None),
        "target-high": (x, w, torch.tensor([0, 1, 10, 2], device=DEVICE), None),
        "int-hidden": (torch.ones(4, 8, dtype=torch.int32, device=DEVICE), w, t, None),
    }[kind]


@pytest.mark.parametrize(
    "kind, error, word",
    [
        ("h-mismatch", kf.ShapeError, "H = 8"),
        ("weight-1d", kf.ShapeError, "weight"),
        ("weight-transposed", kf.ShapeError, "lm_head"),
        ("bias-shape", kf.ShapeError, "bias"),
        ("dtype-mix", kf.DTypeError, "dtype"),
        ("bias-dtype", kf.DTypeError, "bias"),
        ("target-rows", kf.ShapeError, "target"),
        ("target-float", kf.DTypeError, "int64"),
        ("target-high", kf.ShapeError, "outside"),
        ("int-hidden", kf.DTypeError, "hidden"),
    ],
)
def test_bad_input(kind, error, word):
    with pytest.raises(error, match=word):
        ops.fused_linear_cross_entropy(*_bad(kind))


@pytest.mark.parametrize(
    "kw, word",
    [({"chunk_size": 0}, "chunk_size"), ({"chunk_size": 2.0}, "chunk_size"),
     ({"reduction": "batchmean"}, "reduction"), ({"label_smoothing": 2}, "label_smoothing")],
)  # fmt: skip
def test_bad_options(kw, word):
    x, w, _ = make(4, 8, 10)
    with pytest.raises(kf.ArgumentError, match=word):
        ops.fused_linear_cross_entropy(x, w, targets((4,), 10), **kw)


@pytest.mark.gpu
def test_inputs_on_two_devices():
    x, w, _ = make(4, 8, 10)
    with pytest.raises(kf.DeviceError, match="device"):
        ops.fused_linear_cross_entropy(x, w.cpu(), targets((4,), 10))
    with pytest.raises(kf.DeviceError, match="device"):
        ops.fused_linear_cross_entropy(x, w, torch.zeros(4, dtype=torch.int64))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_extra_memory_is_one_chunk_plus_gradients():
    n, h, v, chunk = 4096, 1024, 32000, 512
    x, w, _ = make(n, h, v, torch.bfloat16)
    t = targets((n,), v)

    def step():
        x.grad = w.grad = None
        with kf.backend("triton"):
            ops.fused_linear_cross_entropy(x, w, t, chunk_size=chunk).backward()

    step()  # warm-up: compile, cuBLAS workspace
    x.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    budget = (chunk * v + n * h + v * h) * 2  # one chunk of logits, dh, dW (bf16)
    assert extra < budget + (8 << 20), f"extra {extra / 1e6:.1f} MB > {budget / 1e6:.1f} MB"


@pytest.mark.skipif(ON_GPU, reason="the CPU cases run through the interpreter")
def test_bench_cases_run_on_cpu():
    """The benchmark cases build, run through the interpreter and agree with torch."""
    from kernforge.bench import cases_losses
    from kernforge.bench.harness import run_cases

    cases = cases_losses.cases(on_gpu=False)
    assert {c.op for c in cases} == {"cross_entropy", "fused_linear_cross_entropy"}
    results, _ = run_cases(cases, on_gpu=False, with_compile=False, copy_tbs=1.0)
    for r in results:
        assert not r.error, r.error
        assert r.rel_err < 2e-2, (r.op, r.direction, r.rel_err)
    gpu = cases_losses.cases(on_gpu=True)
    assert {c.shape for c in gpu if c.op == "cross_entropy"} == {(8192, 128256), (16384, 32000)}
    assert cases_losses.cases(on_gpu=True, quick=True)[0].direction == "fwd"


@pytest.mark.gpu
def test_measure_flce_small():
    from kernforge.bench.cases_losses import measure_flce

    r = measure_flce(tokens=1024, vocab=32000, hidden=512, rep_ms=50, fp32_check=True)
    assert set(r["ms"]) == {"reference", "kernforge"}
    assert r["memory_ratio"] < 0.5, r["extra_peak_bytes"]
    assert r["rel_diff_vs_reference"]["dweight"] < 1e-2
    assert r["rel_err_vs_fp32"]["kernforge"]["dhidden"] < 2e-2
