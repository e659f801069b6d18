"""ops.cross_entropy on Triton against F.cross_entropy in float64 (plus the z-loss term):
odd vocabularies, ignore_index, label smoothing, z-loss, reductions, dtypes, layouts, errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import kernforge as kf
from kernforge import config, ops
from kernforge.kernels import cross_entropy as ce
from tests.helpers import DEVICE, DTYPES, ON_GPU, TOL, randn, sizes

IGNORE = -100


def ref_ce(x, t, ignore_index=IGNORE, label_smoothing=0.0, z_loss=0.0, reduction="mean"):
    """F.cross_entropy in x's dtype (float64 in the tests) plus z_loss * lse**2 per kept row."""
    v = x.shape[-1]
    x2, t1 = x.reshape(-1, v), t.reshape(-1).long()
    loss = F.cross_entropy(x2, t1, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction="none")  # fmt: skip
    valid = t1 != ignore_index
    if z_loss:
        lse = torch.logsumexp(x2, -1)
        loss = loss + torch.where(valid, z_loss * lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        return loss.view(t.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


def targets(shape, v, ignored=(), ignore_index=IGNORE, dtype=torch.int64):
    t = torch.randint(0, v, shape, device=DEVICE)
    flat = t.view(-1)
    for i in ignored:
        flat[i] = ignore_index
    return t.to(dtype)


def rel(out, ref) -> float:
    """Norm-wise relative error."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def close(out, ref, tol, what):
    """Finite (no poison left) and within ``tol`` norm-wise of ``ref``."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten output?)"
    err = rel(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


def check(x, t, grad_scale=1.0, dx_tol=None, **kw):
    """Triton loss and dlogits against the float64 reference on the same (rounded) inputs."""
    reduction = kw.get("reduction", "mean")
    with kf.backend("triton"):
        loss = ops.cross_entropy(x, t, **kw)
    # |gy| in [0.5, 1.5): a tiny random scale would push fp16 gradients into subnormals.
    sign = torch.randint(0, 2, loss.shape, device=DEVICE) * 2 - 1
    gy = (torch.rand(loss.shape, device=DEVICE) + 0.5) * sign * grad_scale
    (dx,) = torch.autograd.grad(loss, [x], gy)
    xd = x.detach().double().requires_grad_()
    want = ref_ce(xd, t, **kw)
    (want_dx,) = torch.autograd.grad(want, [xd], gy.double())
    assert loss.dtype == torch.float32
    assert dx.dtype == x.dtype and dx.shape == x.shape
    close(loss, want, 5 * TOL[torch.float32], f"loss ({reduction})")
    # At large N * V a "mean" gradient (p - onehot) / N drops into fp16's subnormals: the
    # dtype itself cannot hold it better than the exact gradient rounded to it.
    floor = 2 * rel(want_dx.to(x.dtype), want_dx)
    close(dx, want_dx, max(dx_tol or TOL[x.dtype], floor), f"dlogits ({reduction})")
    return loss, dx


#: (rows, vocab): a single class, odd widths, exactly a tile, a tail past the interpreter's
#: 4096-wide tile, GPT-2's vocabulary; bigger vocabularies and row counts on the GPU.
SHAPES = sizes(
    cpu=[(5, 1), (6, 7), (7, 1000), (4, 4096), (3, 4097), (3, 50257)],
    gpu=[(300, 128256), (1000, 32000), (4099, 151936), (64, 262144)],
)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(shape, dtype):
    n, v = shape
    x = randn(shape, dtype, requires_grad=True, scale=2.0)
    t = targets((n,), v, ignored=[1])
    check(x, t)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "smooth, z",
    [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.3, 0.05), (1.0, 0.0)],
    ids=["plain", "smooth", "z", "smooth+z", "smooth=1"],
)
def test_options(smooth, z, reduction):
    # Two tiles per row in the interpreter (5000 > 4096); rows 0 and 4 ignored.
    x = randn((6, 5000), torch.float32, requires_grad=True, scale=3.0)
    t = targets((6,), 5000, ignored=[0, 4])
    check(x, t, label_smoothing=smooth, z_loss=z, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_options_half(dtype):
    x = randn((5, 777), dtype, requires_grad=True, scale=3.0)
    t = targets((5,), 777, ignored=[2])
    check(x, t, label_smoothing=0.1, z_loss=1e-2, reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(reduction):
    """No target kept: "mean" is 0.0 (torch gives NaN), and every gradient is 0."""
    x = randn((4, 33), torch.float32, requires_grad=True)
    t = torch.full((4,), IGNORE, device=DEVICE)
    with kf.backend("triton"):
        loss = ops.cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-3, reduction=reduction)
    (dx,) = torch.autograd.grad(loss, [x], torch.ones_like(loss))
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(dx, torch.zeros_like(dx))


@pytest.mark.parametrize("ignore_index", [0, 5, -1])
def test_other_ignore_index(ignore_index):
    # A class id used as ignore_index: rows with that target are dropped, others keep it.
    x = randn((9, 6), torch.float32, requires_grad=True)
    t = torch.tensor([0, 5, 1, 2, 3, 4, 0, 5, ignore_index], device=DEVICE)
    t = torch.where(t < 0, ignore_index, t)
    check(x, t, ignore_index=ignore_index, reduction="none")
    check(x, t, ignore_index=ignore_index, label_smoothing=0.2)


@pytest.mark.parametrize("layout", ["padded", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous(layout, dtype):
    x = randn((5, 301), dtype, layout=layout, requires_grad=True)
    assert not x.is_contiguous()
    check(x, targets((5,), 301, ignored=[3]), reduction="sum")


def test_transposed_logits():
    x = randn((40, 6), torch.float32).t().requires_grad_()  # [6, 40], column stride 6
    check(x, targets((6,), 40), label_smoothing=0.1)


def test_column_slice_of_wider_buffer():
    # The first 1000 columns of a [4, 1500] buffer: row stride 1500, read in place.
    buf = randn((4, 1500), torch.float16)
    x = buf[:, :1000].requires_grad_()
    check(x, targets((4,), 1000), z_loss=1e-3)


@pytest.mark.parametrize("flat_target", [False, True])
def test_leading_dims(flat_target):
    x = randn((2, 3, 50), torch.bfloat16, requires_grad=True)
    t = targets((2, 3), 50, ignored=[4])
    t = t.reshape(-1) if flat_target else t
    loss, _ = check(x, t, reduction="none")
    assert loss.shape == t.shape
    check(x, t)


def test_int32_target():
    x = randn((7, 100), torch.float32, requires_grad=True)
    check(x, targets((7,), 100, ignored=[2], dtype=torch.int32), label_smoothing=0.1)


def test_unbatched():
    x = randn((13,), torch.float32, requires_grad=True)
    t = torch.tensor(4, device=DEVICE)
    loss, _ = check(x, t, reduction="none")
    assert loss.shape == ()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_rows(reduction):
    x = randn((0, 10), torch.float32, requires_grad=True)
    t = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    with kf.backend("triton"):
        loss = ops.cross_entropy(x, t, reduction=reduction)
    (dx,) = torch.autograd.grad(loss, [x], torch.ones_like(loss))
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert dx.shape == (0, 10)
    if reduction != "none":
        assert loss.item() == 0.0


def test_extreme_logits_are_stable():
    """Large magnitudes (where a naive exp overflows) and -inf (masked classes)."""
    x = randn((6, 700), torch.float32, scale=1e4)
    x[:, 100:200] = -float("inf")  # masked vocabulary entries: probability 0, gradient 0
    x.requires_grad_()
    t = targets((6,), 100)
    # fp32 holds logits of 1e4 to ~1e-3 absolute: exp() of them is good to ~1e-3 relative.
    loss, dx = check(x, t, reduction="none", dx_tol=2e-3)
    assert torch.equal(dx[:, 100:200], torch.zeros_like(dx[:, 100:200]))


def test_ops_compile_without_graph_breaks():
    """fullgraph compile through every reduction, forward and backward."""

    def f(x, t):
        a = ops.cross_entropy(x, t)
        b = ops.cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-3, reduction="sum")
        c = ops.cross_entropy(x, t, reduction="none")
        return a + 0.5 * b + (c * c).sum()

    x = randn((6, 37), torch.float32, requires_grad=True)
    t = targets((6,), 37, ignored=[2])
    with kf.backend("triton"):
        torch._dynamo.reset()
        out = torch.compile(f, fullgraph=True)(x, t)
        (dx,) = torch.autograd.grad(out, [x])
    xd = x.detach().double().requires_grad_()
    a = ref_ce(xd, t)
    b = ref_ce(xd, t, label_smoothing=0.1, z_loss=1e-3, reduction="sum")
    c = ref_ce(xd, t, reduction="none")
    want = a + 0.5 * b + (c * c).sum()
    (want_dx,) = torch.autograd.grad(want, [xd])
    close(out, want, 1e-5, "out")
    close(dx, want_dx, 1e-5, "dx")


def test_torch_backend_matches_reference():
    x = randn((5, 40), torch.float64, requires_grad=True)
    t = targets((5,), 40, ignored=[0])
    for red in ("mean", "sum", "none"):
        with kf.backend("torch"):
            got = ops.cross_entropy(x, t, label_smoothing=0.2, z_loss=0.01, reduction=red)
        want = ref_ce(x, t, label_smoothing=0.2, z_loss=0.01, reduction=red)
        torch.testing.assert_close(got, want)


def test_float64_is_not_taken_by_triton():
    x, t = randn((3, 5)).double(), targets((3,), 5)
    with kf.backend("triton"), pytest.raises(kf.UnsupportedError, match="float64"):
        ops.cross_entropy(x, t)


@pytest.mark.parametrize(
    "make, error, word",
    [
        (lambda: (randn((4, 8)), targets((5,), 8)), kf.ShapeError, "target"),
        (lambda: (randn((4, 8)), targets((4, 1), 8)), kf.ShapeError, "target"),
        (lambda: (randn((4, 8)), randn((4,))), kf.DTypeError, "int64"),
        (lambda: (torch.ones(4, 8, dtype=torch.int32, device=DEVICE), targets((4,), 8)),
         kf.DTypeError, "logits"),
        (lambda: (randn((4, 0)), targets((4,), 1)), kf.ShapeError, "no classes"),
        (lambda: (randn((4, 8)), [1, 2, 3, 4]), TypeError, "target"),
        (lambda: (randn((4, 8)), torch.tensor([0, 8, 1, 2], device=DEVICE)), kf.ShapeError,
         "outside"),
        (lambda: (randn((4, 8)), torch.tensor([0, -3, 1, 2], device=DEVICE)), kf.ShapeError,
         "-3"),
    ],
    ids=["rows", "rank", "float-target", "int-logits", "no-classes", "list", "high", "negative"],
)  # fmt: skip
def test_bad_input(make, error, word):
    x, t = make()
    with pytest.raises(error, match=word):
        ops.cross_entropy(x, t)


@pytest.mark.parametrize(
    "kw, word",
    [
        ({"reduction": "avg"}, "reduction"),
        ({"label_smoothing": 1.5}, "label_smoothing"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"z_loss": -1e-4}, "z_loss"),
        ({"ignore_index": True}, "ignore_index"),
        ({"ignore_index": 1.0}, "ignore_index"),
    ],
)
def test_bad_options(kw, word):
    with pytest.raises(kf.ArgumentError, match=word):
        ops.cross_entropy(randn((4, 8)), targets((4,), 8), **kw)


def test_index_check_can_be_turned_off(monkeypatch):
    """KERNFORGE_CHECK_INDICES=0: no host check; the kernel still reads nothing out of the row
    (the loss of such a row is lse - 0, finite)."""
    settings = dataclasses.replace(config.settings, check_indices=False)
    monkeypatch.setattr(config, "settings", settings)
    x = randn((3, 8))
    with kf.backend("triton"):
        loss = ops.cross_entropy(x, torch.tensor([0, 99, 1], device=DEVICE), reduction="none")
    assert torch.isfinite(loss).all()


def test_ignored_target_is_not_range_checked():
    x = randn((3, 8), requires_grad=True)
    check(x, torch.tensor([0, -100, 7], device=DEVICE))


def test_launch_config_caps():
    block, warps = ce._config("fwd", 7)
    assert block == 8 and warps == 1
    block, _ = ce._config("fwd", 1 << 20)
    assert block == ce.LAUNCH["fwd"].block_v


@pytest.mark.gpu
def test_inputs_on_two_devices():
    with pytest.raises(kf.DeviceError, match="device"):
        ops.cross_entropy(randn((4, 8)), torch.zeros(4, dtype=torch.int64))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_no_fp32_copy_of_the_logits():
    """Forward + backward of bf16 logits allocate dlogits (bf16) and per-row vectors only."""
    n, v = 2048, 128256
    x = randn((n, v), torch.bfloat16, requires_grad=True)
    t = targets((n,), v)
    with kf.backend("triton"):
        ops.cross_entropy(x, t).backward()  # warm-up: compile
        x.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        ops.cross_entropy(x, t).backward()
        torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    bf16_bytes = n * v * 2
    assert extra < 1.1 * bf16_bytes, f"extra peak {extra / 1e6:.0f} MB for {bf16_bytes / 1e6} MB"
