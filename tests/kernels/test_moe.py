"""MoE building blocks (moe_route, moe_permute, moe_unpermute) on Triton against the torch
reference: forward exactly (ids, order, sorted rows) or within tolerance (weights, outputs),
backward against float64, ties, odd sizes, bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kernforge as kf
from kernforge import checks, config, dispatch, ops
from kernforge.kernels import moe
from tests.helpers import DEVICE, DTYPES, assert_close, f64, grads, randn, reference, sizes

# ------------------------------------------------------------------------------------ routing

#: (tokens, experts, top_k): one token, k = 1, k = E, odd sizes, E = 1, more tokens than a
#: routing tile holds under the interpreter (65536 scores / 8 experts = 8192 per tile at E = 8
#: is too big to test cheaply; 64 experts give 1024 tokens per tile).
ROUTE_SHAPES = sizes(
    cpu=[(1, 4, 2), (17, 5, 1), (33, 8, 2), (7, 3, 3), (5, 1, 1), (100, 60, 8), (1030, 64, 4)],
    gpu=[(8192, 8, 2), (8192, 64, 8), (4099, 256, 8), (3, 1024, 6)],
)


def check_route(logits, top_k, scoring="softmax", renormalize=True, bias=None):
    """Triton routing against the float64 reference: the same ids, weights to fp32 precision,
    dlogits within the logits dtype's tolerance."""
    with kf.backend("triton"):
        w, ids = ops.moe_route(logits, top_k, scoring, renormalize, bias)
        gw = torch.randn_like(w)
        (dl,) = grads([w], [logits], [gw])
    (ld,) = f64(logits)
    want_w, want_ids = reference(ops.moe_route, ld, top_k, scoring, renormalize, bias)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert w.shape == ids.shape == (logits.shape[0], top_k)
    assert torch.equal(ids.cpu(), want_ids.cpu()), "expert choice differs from the reference"
    assert_close(w, want_w, torch.float32, "weights", tol_scale=5)
    (want_dl,) = grads([want_w], [ld], [gw.double()])
    assert dl.dtype == logits.dtype
    assert_close(dl, want_dl, logits.dtype, "dlogits", tol_scale=2)
    return w, ids


@pytest.mark.parametrize("shape", ROUTE_SHAPES, ids=str)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_matches_reference(shape, scoring):
    t, e, k = shape
    logits = randn((t, e), torch.float32, requires_grad=True, scale=2.0)
    check_route(logits, k, scoring)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_dtypes_and_renormalize(dtype, renormalize, scoring):
    logits = randn((19, 6), dtype, requires_grad=True, scale=2.0)
    w, _ = check_route(logits, 3, scoring, renormalize)
    sums = w.sum(-1)
    if renormalize:
        torch.testing.assert_close(sums, torch.ones_like(sums))
    elif scoring == "softmax":
        assert (sums < 1).all()


@pytest.mark.parametrize("layout", ["padded", "strided"])
def test_route_non_contiguous_logits(layout):
    logits = randn((13, 9), torch.float16, layout=layout, requires_grad=True)
    check_route(logits, 2)


def test_route_bias_steers_the_choice_only():
    """DeepSeek-V3 style: the bias picks the experts, the weights stay the plain scores."""
    t, e = 21, 8
    logits = randn((t, e), torch.float32, requires_grad=True)
    bias = torch.zeros(e, device=DEVICE)
    bias[5] = 10.0  # expert 5 always wins
    w, ids = check_route(logits, 2, "sigmoid", False, bias)
    assert (ids[:, 0] == 5).all()
    torch.testing.assert_close(w[:, 0], torch.sigmoid(logits.detach()[:, 5]))
    check_route(logits, 3, "softmax", True, randn((e,), torch.bfloat16))


def test_route_ties_go_to_the_lower_expert():
    """Equal scores: the lower expert index wins, every time, on both backends."""
    e = 7
    rows = [
        [0.0] * e,  # all equal: experts 0, 1, 2
        [1.0, 2.0, 2.0, 0.5, 2.0, 2.0, -1.0],  # four at the max: 1, 2, 4
        [3.0, -1.0, 3.0, 3.0, -1.0, -1.0, 5.0],  # 6, then 0 and 2 of the three 3.0s
        [-1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0],
        [float("-inf"), 0.0, float("-inf"), 0.0, 0.0, float("-inf"), float("-inf")],
    ]
    want = [[0, 1, 2], [1, 2, 4], [6, 0, 2], [0, 1, 2], [1, 3, 4]]
    logits = torch.tensor(rows, device=DEVICE).repeat(3, 1)  # several rows of a tile
    expected = torch.tensor(want, dtype=torch.int32).repeat(3, 1)
    for scoring in ("softmax", "sigmoid"):
        for backend in ("triton", "torch"):
            for _ in range(2):
                with kf.backend(backend):
                    w, ids = ops.moe_route(logits, 3, scoring)
                assert torch.equal(ids.cpu(), expected), (scoring, backend, ids)
                assert torch.isfinite(w).all()
    # The extreme case: k = E with all-equal scores is the identity order.
    with kf.backend("triton"):
        _, ids = ops.moe_route(torch.zeros(2, e, device=DEVICE), e)
    assert torch.equal(ids.cpu(), torch.arange(e, dtype=torch.int32).repeat(2, 1))


def test_route_ties_in_bf16_logits_match_reference():
    """bf16 logits on a coarse grid: many exact ties, all broken the same way as the reference."""
    logits = (torch.randint(-3, 4, (200, 16), device=DEVICE) * 0.5).to(torch.bfloat16)
    logits.requires_grad_()
    check_route(logits, 4)


def test_route_empty():
    logits = randn((0, 5), torch.float32, requires_grad=True)
    with kf.backend("triton"):
        w, ids = ops.moe_route(logits, 2)
        w.sum().backward()
    assert w.shape == ids.shape == (0, 2)
    assert logits.grad.shape == (0, 5)


# ----------------------------------------------------------------------- permute / unpermute


def route_ids(t: int, e: int, k: int, dtype=torch.int32) -> torch.Tensor:
    """k distinct random experts per token (as routing gives), deliberately unbalanced."""
    scores = torch.rand(t, e, device=DEVICE) + torch.linspace(0, 1, e, device=DEVICE)
    return scores.topk(k, dim=-1).indices.to(dtype)


#: (tokens, hidden, experts, top_k): one token, hidden 1, k = 1, k = E, E = 1, odd sizes,
#: rows wider than one column tile under the interpreter (5000).
PERMUTE_SHAPES = sizes(
    cpu=[(1, 8, 4, 2), (17, 1, 5, 1), (33, 40, 8, 2), (9, 130, 3, 3), (6, 12, 1, 1),
         (50, 24, 64, 8), (3, 5000, 4, 2)],
    gpu=[(8192, 4096, 8, 2), (8192, 2048, 64, 8), (4097, 1000, 60, 4)],
)  # fmt: skip


def check_permute_roundtrip(x, ids, e):
    """permute on Triton against the reference (bitwise: it is a copy), the stable-sort
    invariants, unpermute against the reference, and both backwards against float64."""
    t, k = ids.shape
    dtype = x.dtype
    with kf.backend("triton"):
        xs, gs, order = ops.moe_permute(x, ids, e)
    with kf.backend("torch"):
        want_xs, want_gs, want_order = ops.moe_permute(x.detach(), ids, e)
    assert gs.dtype == torch.int32 and order.dtype == torch.int32 and xs.dtype == dtype
    assert torch.equal(gs.cpu(), want_gs.cpu()), (gs, want_gs)
    assert torch.equal(order.cpu(), want_order.cpu())
    assert torch.equal(xs.detach().cpu(), want_xs.cpu())
    # Invariants, independent of the reference: group sizes count the ids, each (token, choice)
    # row lands at its order, and rows are grouped by expert, by token within an expert.
    flat = ids.reshape(-1).long().cpu()
    assert torch.equal(gs.cpu().long(), torch.bincount(flat, minlength=e))
    assert torch.equal(xs.detach()[order.long()].cpu(), x.detach().repeat_interleave(k, 0).cpu())
    src = torch.empty_like(flat)
    src[order.long().cpu()] = torch.arange(flat.numel())
    key = flat[src] * flat.numel() + src  # (expert, flat index) must be increasing
    assert (key[1:] > key[:-1]).all()

    # Unpermute of the expert outputs (here a function of the sorted rows), weighted.
    w = torch.rand(t, k, device=DEVICE, requires_grad=True)
    ys = xs * 2 + 1
    with kf.backend("triton"):
        y = ops.moe_unpermute(ys, order, w)
        gy = randn(y.shape, dtype)
        dx, dw = grads([y], [x, w], [gy])
    xd, wd = f64(x, w)
    with kf.backend("torch"):
        xsd, _, od = ops.moe_permute(xd, ids, e)
        want = ops.moe_unpermute(xsd * 2 + 1, od, wd)
    want_dx, want_dw = grads([want], [xd, wd], [gy.double()])
    assert y.dtype == dtype and dx.dtype == dtype
    assert_close(y, want, dtype, "y")
    assert_close(dx, want_dx, dtype, "dx")
    assert_close(dw, want_dw, dtype, "dweights")


@pytest.mark.parametrize("shape", PERMUTE_SHAPES, ids=str)
def test_permute_unpermute_roundtrip(shape):
    t, h, e, k = shape
    x = randn((t, h), torch.float32, requires_grad=True)
    check_permute_roundtrip(x, route_ids(t, e, k), e)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
def test_permute_dtypes(dtype, id_dtype):
    x = randn((23, 37), dtype, requires_grad=True)
    check_permute_roundtrip(x, route_ids(23, 6, 2, id_dtype), 6)


@pytest.mark.parametrize("layout", ["padded", "strided"])
def test_permute_non_contiguous(layout):
    x = randn((15, 20), torch.float16, layout=layout, requires_grad=True)
    ids = route_ids(15, 5, 3, torch.int64).t().contiguous().t()  # transposed ids too
    check_permute_roundtrip(x, ids, 5)


def test_permute_many_blocks(monkeypatch):
    """Tiny counting blocks: the per-block offsets (cumulative over blocks) are exercised."""
    monkeypatch.setattr(moe, "_index_block", lambda e: (16, max(2, 1 << (e - 1).bit_length())))
    x = randn((77, 6), torch.float32, requires_grad=True)
    check_permute_roundtrip(x, route_ids(77, 9, 3), 9)


def test_permute_empty_experts_and_repeated_ids():
    """Experts nobody picked get group size 0; the ops do not need distinct ids per token."""
    ids = torch.tensor([[3, 3], [0, 3], [3, 0]], dtype=torch.int32, device=DEVICE)
    x = randn((3, 4), torch.float32, requires_grad=True)
    check_permute_roundtrip(x, ids, 6)
    with kf.backend("triton"):
        _, gs, order = ops.moe_permute(x, ids, 6)
    assert gs.tolist() == [2, 0, 0, 4, 0, 0]
    assert order.tolist() == [2, 3, 0, 4, 5, 1]


def test_unpermute_renormalized_weights_invert_permute():
    """With weights summing to 1 and identity experts, unpermute(permute(x)) == x."""
    t, e, k = 29, 7, 3
    logits = randn((t, e))
    x = randn((t, 33), torch.float32)
    with kf.backend("triton"):
        w, ids = ops.moe_route(logits, k)
        xs, _, order = ops.moe_permute(x, ids, e)
        y = ops.moe_unpermute(xs, order, w)
    torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", ["y_sorted", "weights"])
def test_unpermute_partial_requires_grad(which):
    t, e, k, h = 11, 4, 2, 9
    ids = route_ids(t, e, k)
    with kf.backend("torch"):
        _, _, order = ops.moe_permute(torch.zeros(t, h, device=DEVICE), ids, e)
    ys = randn((t * k, h), torch.float32, requires_grad=which == "y_sorted")
    w = randn((t, k), torch.bfloat16, requires_grad=which == "weights")
    inputs = [ys, w]
    with kf.backend("triton"):
        y = ops.moe_unpermute(ys, order, w)
        gy = randn(y.shape)
        got = grads([y], inputs, [gy])
    yd, wd = f64(ys, w)
    want = grads([reference(ops.moe_unpermute, yd, order, wd)], [yd, wd], [gy.double()])
    for g, ref, t_in, name in zip(got, want, inputs, ["dy_sorted", "dweights"], strict=True):
        if t_in.requires_grad:
            assert g.dtype == t_in.dtype
            assert_close(g, ref, t_in.dtype, name)
        else:
            assert g is None


def test_permute_empty():
    x = randn((0, 8), torch.float32, requires_grad=True)
    ids = torch.zeros(0, 2, dtype=torch.int32, device=DEVICE)
    w = torch.zeros(0, 2, device=DEVICE, requires_grad=True)
    with kf.backend("triton"):
        xs, gs, order = ops.moe_permute(x, ids, 4)
        y = ops.moe_unpermute(xs, order, w)
        y.sum().backward()
    assert xs.shape == (0, 8) and order.shape == (0,) and y.shape == (0, 8)
    assert gs.tolist() == [0, 0, 0, 0]
    assert x.grad.shape == (0, 8)


def test_deterministic_bitwise():
    """Same inputs, same bits: forward and every gradient (no atomics anywhere)."""
    t, e, k, h = 40, 8, 2, 24
    logits = randn((t, e), requires_grad=True)
    x = randn((t, h), torch.bfloat16, requires_grad=True)
    gy = randn((t, h), torch.bfloat16)

    def run():
        with kf.backend("triton"):
            w, ids = ops.moe_route(logits, k)
            xs, _, order = ops.moe_permute(x, ids, e)
            y = ops.moe_unpermute(xs * 3, order, w)
            return [y, *grads([y], [logits, x], [gy])]

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


def test_ops_compile_without_graph_breaks():
    """Route, permute and unpermute in one torch.compile(fullgraph=True), with backward."""
    t, e, k, h = 12, 5, 2, 16

    def f(logits, x):
        w, ids = ops.moe_route(logits, k)
        xs, _, order = ops.moe_permute(x, ids, e)
        return ops.moe_unpermute(torch.tanh(xs), order, w)

    logits = randn((t, e), requires_grad=True)
    x = randn((t, h), requires_grad=True)
    cfg = dataclasses.replace(config.settings, check_indices=False)
    with kf.backend("triton"), pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "settings", cfg)
        torch._dynamo.reset()
        out = torch.compile(f, fullgraph=True)(logits, x)
        got = grads([out], [logits, x], [torch.ones_like(out)])
    ld, xd = f64(logits, x)
    with kf.backend("torch"):
        ref = f(ld, xd)
    want = grads([ref], [ld, xd], [torch.ones_like(ref)])
    assert_close(out, ref, torch.float32, "out")
    for g, w, what in zip(got, want, ["dlogits", "dx"], strict=True):
        assert_close(g, w, torch.float32, what)


def test_custom_ops_opcheck():
    """The custom ops torch.compile traces: schema and fake kernels."""
    lib = torch.ops.kernforge
    logits = randn((6, 5))
    torch.library.opcheck(lib.moe_route_fwd.default, (logits, 2, False, True, None))
    torch.library.opcheck(lib.moe_route_fwd.default, (logits, 3, True, False, randn((5,))))
    w, ids = moe.moe_route_fwd(logits, 2, False, True, None)
    torch.library.opcheck(lib.moe_route_bwd.default, (randn((6, 2)), logits, ids, False, True))
    x = randn((6, 7))
    torch.library.opcheck(lib.moe_permute_fwd.default, (x, ids, 5))
    _, _, order = moe.moe_permute_fwd(x, ids, 5)
    ys = randn((12, 7))
    torch.library.opcheck(lib.moe_gather_rows.default, (ys, order, w, 6, 2))
    torch.library.opcheck(lib.moe_gather_rows.default, (ys, order, None, 6, 2))
    torch.library.opcheck(lib.moe_unpermute_bwd.default, (randn((6, 7)), ys, order, w, True, True))
    torch.library.opcheck(lib.moe_unpermute_bwd.default, (randn((6, 7)), ys, order, w, False, True))


def test_triton_supports():
    x = randn((4, 8))
    assert moe._supports_route(x, 2, "softmax", True, None) is None
    assert "float64" in moe._supports_route(x.double(), 2, "softmax", True, None)
    wide = torch.zeros(1, moe.MAX_EXPERTS + 1, device=DEVICE)
    assert "experts" in moe._supports_route(wide, 2, "softmax", True, None)
    assert moe._supports_permute(x, None, moe.MAX_EXPERTS + 1) is not None
    assert moe._supports_unpermute(x, None, x.double()) is not None


def test_float64_runs_on_torch_fallback():
    logits = randn((5, 4)).double()
    cfg = dataclasses.replace(config.settings, disable_fallback=False)
    with pytest.MonkeyPatch.context() as mp, pytest.warns(kf.FallbackWarning):
        mp.setattr(config, "settings", cfg)
        mp.setattr(dispatch, "_warned", set())  # the warning is once per process
        w, ids = ops.moe_route(logits, 2)
    assert w.dtype == torch.float64 and ids.dtype == torch.int32


# ---------------------------------------------------------------------------------- bad input


def _ids(*rows):
    return torch.tensor(rows, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize(
    "call, error, word",
    [
        (lambda: ops.moe_route(randn((4, 3)), 4), kf.ArgumentError, "top_k"),
        (lambda: ops.moe_route(randn((4, 3)), 0), kf.ArgumentError, "top_k"),
        (lambda: ops.moe_route(randn((4, 3)), 2.0), kf.ArgumentError, "top_k"),
        (lambda: ops.moe_route(randn((4, 3)), 1, "relu"), kf.ArgumentError, "scoring"),
        (lambda: ops.moe_route(randn((4, 3)), 1, renormalize=1), kf.ArgumentError, "renormalize"),
        (lambda: ops.moe_route(randn((2, 4, 3)), 1), kf.ShapeError, "2-D"),
        (lambda: ops.moe_route(_ids([1, 2]), 1), kf.DTypeError, "logits"),
        (lambda: ops.moe_route(randn((4, 3)), 1, bias=randn((4,))), kf.ShapeError, "bias"),
        (lambda: ops.moe_route([[1.0]], 1), TypeError, "logits"),
        (lambda: ops.moe_permute(randn((2, 4)), _ids([0], [1]).float(), 2), kf.DTypeError, "ids"),
        (lambda: ops.moe_permute(randn((2, 4)), _ids([0], [1], [1]), 2), kf.ShapeError, "ids"),
        (lambda: ops.moe_permute(randn((2, 4)), _ids(0, 1), 2), kf.ShapeError, "ids"),
        (lambda: ops.moe_permute(randn((2, 4)), _ids([0], [2]), 2), kf.ShapeError, "range"),
        (lambda: ops.moe_permute(randn((2, 4)), _ids([-1], [0]), 2), kf.ShapeError, "range"),
        (lambda: ops.moe_permute(randn((2, 4)), _ids([0], [1]), 0), kf.ArgumentError, "num_exp"),
        (lambda: ops.moe_permute(randn((2, 2, 4)), _ids([0], [1]), 2), kf.ShapeError, "2-D"),
        (lambda: ops.moe_unpermute(randn((4, 3)), _ids(0, 1, 2, 3), randn((2, 3))),
         kf.ShapeError, "T*k"),
        (lambda: ops.moe_unpermute(randn((4, 3)), _ids(0, 1, 2), randn((2, 2))),
         kf.ShapeError, "T*k"),
        (lambda: ops.moe_unpermute(randn((4, 3)), _ids(0, 1, 2, 4), randn((2, 2))),
         kf.ShapeError, "range"),
        (lambda: ops.moe_unpermute(randn((4, 3)), _ids(0, 1, 2, 3).float(), randn((2, 2))),
         kf.DTypeError, "order"),
        (lambda: ops.moe_unpermute(randn((4, 3)), _ids(0, 1, 2, 3), _ids([1, 1], [1, 1])),
         kf.DTypeError, "weights"),
    ],
)  # fmt: skip
def test_bad_input_raises_clear_errors(call, error, word):
    with pytest.raises(error, match=word):
        call()


def test_index_check_can_be_turned_off_and_is_skipped_when_trusted():
    ids = _ids([0], [5])  # out of range for 2 experts; only the check runs, never a kernel
    with pytest.raises(kf.ShapeError, match="KERNFORGE_CHECK_INDICES"):
        ops._moe_range("moe_permute", "ids", ids, 2, "expert ids")
    with checks.trusted_indices():
        ops._moe_range("moe_permute", "ids", ids, 2, "expert ids")
    assert checks.index_checks_on()  # trust ends with the block
    off = dataclasses.replace(config.settings, check_indices=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "settings", off)
        ops._moe_range("moe_permute", "ids", ids, 2, "expert ids")
