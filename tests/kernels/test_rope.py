"""rope (rotate-half rotary embedding) against a float64 reference, forward and backward."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kernforge as kf
from kernforge import config, ops
from kernforge.kernels import rope as rope_mod
from tests.helpers import (
    DEVICE,
    DTYPES,
    LAYOUTS,
    assert_close,
    f64,
    grads,
    randn,
    reference,
    sizes,
)

# (batch, seq, q heads, k heads, head dim, rot dim)
SHAPES = sizes(
    cpu=[(1, 1, 1, 1, 2, 2), (2, 5, 4, 2, 16, 16), (2, 7, 3, 1, 20, 12), (1, 9, 2, 3, 127, 64)],
    gpu=[(1, 4096, 32, 8, 128, 128), (2, 1000, 12, 12, 96, 64), (1, 2048, 112, 112, 128, 128)],
)


def qk_shape(b, s, h, d, layout):
    return (b, s, h, d) if layout == "bshd" else (b, h, s, d)


def tables(rows, rot, dtype=torch.float32, batch=None, layout="contiguous"):
    """Random cos/sin tables (not a real rotation, so that every term of the formula shows)."""
    shape = (rows, rot) if batch is None else (batch, rows, rot)
    return randn(shape, dtype, layout=layout), randn(shape, dtype, layout=layout)


def check(q, k, cos, sin, position_ids=None, layout="bshd", tol_scale=1.0):
    """Forward and backward on Triton against the float64 torch reference."""
    with kf.backend("triton"):
        q_rot, k_rot = ops.rope(q, k, cos, sin, position_ids, layout)
        gq, gk = torch.randn_like(q_rot), torch.randn_like(k_rot)
        got = grads([q_rot, k_rot], [q, k], [gq, gk])
    qd, kd, cd, sd = f64(q, k, cos, sin)
    ref_q, ref_k = reference(ops.rope, qd, kd, cd, sd, position_ids, layout)
    want = grads([ref_q, ref_k], [qd, kd], [gq.double(), gk.double()])
    dtype = q.dtype
    assert q_rot.dtype == k_rot.dtype == dtype
    assert_close(q_rot, ref_q, dtype, "q_rot", tol_scale)
    assert_close(k_rot, ref_k, dtype, "k_rot", tol_scale)
    assert_close(got[0], want[0], dtype, "dq", tol_scale)
    assert_close(got[1], want[1], dtype, "dk", tol_scale)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_rope_matches_reference(shape, dtype, layout):
    b, s, hq, hk, d, rot = shape
    q = randn(qk_shape(b, s, hq, d, layout), dtype, requires_grad=True)
    k = randn(qk_shape(b, s, hk, d, layout), dtype, requires_grad=True)
    cos, sin = tables(s + 3, rot, dtype)
    pos = torch.randperm(s + 3, device=DEVICE)[:s]  # shuffled, non-monotonic
    check(q, k, cos, sin, pos, layout)


@pytest.mark.parametrize("pos_shape", ["none", "BS", "1S", "S"])
@pytest.mark.parametrize("table", ["2d", "3d-batch", "3d-one"])
def test_rope_positions_and_tables(pos_shape, table):
    b, s, hq, hk, d, rot, rows = 3, 6, 2, 1, 24, 16, 11
    q = randn((b, s, hq, d), torch.float32, requires_grad=True)
    k = randn((b, s, hk, d), torch.float32, requires_grad=True)
    batch = {"2d": None, "3d-batch": b, "3d-one": 1}[table]
    cos, sin = tables(rows, rot, batch=batch)
    # Each batch row its own shuffle, repeats allowed across rows.
    full = torch.stack([torch.randperm(rows, device=DEVICE)[:s] for _ in range(b)])
    pos = {"none": None, "BS": full, "1S": full[:1], "S": full[0]}[pos_shape]
    check(q, k, cos, sin, pos)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_rope_fp32_tables(dtype, layout):
    q = randn(qk_shape(2, 5, 4, 32, layout), dtype, requires_grad=True)
    k = randn(qk_shape(2, 5, 2, 32, layout), dtype, requires_grad=True)
    cos, sin = tables(8, 32, torch.float32)
    check(q, k, cos, sin, torch.tensor([[7, 0, 3, 3, 1]], device=DEVICE), layout)


def test_rope_low_precision_tables_fp32_q():
    q = randn((2, 5, 4, 32), torch.float32, requires_grad=True)
    k = randn((2, 5, 2, 32), torch.float32, requires_grad=True)
    cos, sin = tables(5, 32, torch.bfloat16)
    check(q, k, cos, sin)


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_rope_strided_inputs(layout):
    """q/k/cos/sin with padded heads (read in place) or feature stride 2 (copied), and
    upstream gradients in the same layout."""
    dtype = torch.float16
    q = randn((2, 5, 3, 20), dtype, layout=layout, requires_grad=True)
    k = randn((2, 5, 1, 20), dtype, layout=layout, requires_grad=True)
    cos, sin = tables(7, 12, dtype, layout=layout)
    with kf.backend("triton"):
        q_rot, k_rot = ops.rope(q, k, cos, sin)
        gq, gk = randn(q.shape, dtype, layout=layout), randn(k.shape, dtype, layout=layout)
        got = grads([q_rot, k_rot], [q, k], [gq, gk])
    qd, kd, cd, sd = f64(q, k, cos, sin)
    ref = reference(ops.rope, qd, kd, cd, sd)
    want = grads(list(ref), [qd, kd], [gq.double(), gk.double()])
    names = ["q_rot", "k_rot", "dq", "dk"]
    for out, r, name in zip([q_rot, k_rot, *got], [*ref, *want], names, strict=True):
        assert_close(out, r, dtype, name)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_rope_views_of_fused_qkv(layout):
    """q and k as slices of one fused qkv projection, then transposed to bhsd: no copies."""
    b, s, hq, hk, d = 2, 6, 4, 2, 16
    qkv = randn((b, s, (hq + 2 * hk) * d), torch.bfloat16, requires_grad=True)
    heads = qkv.view(b, s, hq + 2 * hk, d)
    q, k = heads[:, :, :hq], heads[:, :, hq : hq + hk]
    if layout == "bhsd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = tables(s, d, torch.float32)
    check(q, k, cos, sin, layout=layout)


def test_rope_head_groups(monkeypatch):
    """The GPU launch shape: programs split into groups of heads, several steps per group,
    ragged last groups of q and of k, several tokens per program (forced here, since the
    interpreter's own sizes put every head in one program)."""
    cfg = rope_mod.RopeLaunch(
        block_t=2, block_hq=2, block_hk=2, hpp_q=4, hpp_k=2, block_r=8, block_p=4, num_warps=1
    )
    monkeypatch.setattr(rope_mod, "rope_launch", lambda *args: cfg)
    q = randn((2, 5, 7, 20), torch.bfloat16, requires_grad=True)
    k = randn((2, 5, 3, 20), torch.bfloat16, requires_grad=True)
    cos, sin = tables(5, 16)
    check(q, k, cos, sin)


def test_rope_grad_of_one_output():
    """Only k_rot reaches the loss: k gets its gradient, q none (no work done for it)."""
    q = randn((1, 4, 2, 8), requires_grad=True)
    k = randn((1, 4, 2, 8), requires_grad=True)
    cos, sin = tables(4, 8)
    with kf.backend("triton"):
        _, k_rot = ops.rope(q, k, cos, sin)
        gk = torch.randn_like(k_rot)
        dq, dk = grads([k_rot], [q, k], [gk])
    kd, cd, sd = f64(k, cos, sin)
    _, ref_k = reference(ops.rope, kd.detach(), kd, cd, sd)
    (want,) = grads([ref_k], [kd], [gk.double()])
    assert dq is None
    assert_close(dk, want, torch.float32, "dk")


def test_rope_no_grad_to_tables():
    q = randn((1, 3, 2, 8), requires_grad=True)
    k = randn((1, 3, 2, 8), requires_grad=True)
    cos, sin = tables(3, 8)
    cos.requires_grad_(True)
    with kf.backend("triton"):
        q_rot, k_rot = ops.rope(q, k, cos, sin)
        (q_rot.sum() + k_rot.sum()).backward()
    assert cos.grad is None
    assert q.grad is not None and k.grad is not None


def test_rope_empty():
    q = randn((2, 0, 3, 8), requires_grad=True)
    k = randn((2, 0, 1, 8), requires_grad=True)
    cos, sin = tables(4, 8)
    with kf.backend("triton"):
        q_rot, k_rot = ops.rope(q, k, cos, sin)
        (q_rot.sum() + k_rot.sum()).backward()
    assert q_rot.shape == q.shape and k_rot.shape == k.shape
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


def test_rope_unchecked_out_of_range_positions_give_nan(monkeypatch):
    """With the index check off, a bad position reads NaN, never memory outside the table."""
    monkeypatch.setattr(
        config, "settings", dataclasses.replace(config.settings, check_indices=False)
    )
    q, k = randn((1, 3, 2, 8)), randn((1, 3, 1, 8))
    cos, sin = tables(4, 8)
    with kf.backend("triton"):
        q_rot, k_rot = ops.rope(q, k, cos, sin, torch.tensor([0, 4, -1], device=DEVICE))
    assert torch.isfinite(q_rot[:, 0]).all() and torch.isfinite(k_rot[:, 0]).all()
    assert torch.isnan(q_rot[:, 1:]).all() and torch.isnan(k_rot[:, 1:]).all()


def test_rope_compiles_without_graph_break():
    q = randn((1, 4, 2, 8), requires_grad=True)  # bhsd: 4 heads, 2 positions
    k = randn((1, 2, 2, 8), requires_grad=True)
    cos, sin = tables(4, 8)
    pos = torch.tensor([3, 1], device=DEVICE)

    def f(q, k):
        q_rot, k_rot = ops.rope(q, k, cos, sin, pos, "bhsd")
        return q_rot.sum(1) * k_rot.sum(1)

    with kf.backend("triton"):
        out = torch.compile(f, fullgraph=True)(q, k)
        (dq,) = torch.autograd.grad(out.sum(), [q])
        want = f(q, k)
        (want_dq,) = torch.autograd.grad(want.sum(), [q])
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(dq, want_dq)


def test_rope_custom_ops_opcheck():
    """The custom ops torch.compile traces (eager calls bypass them): schema, fake kernels,
    and their use under AOT autograd."""
    q, k = randn((1, 3, 2, 8)), randn((1, 3, 1, 8))
    cos, sin = tables(4, 8)
    pos = torch.tensor([3, 0, 1], device=DEVICE)
    torch.library.opcheck(torch.ops.kernforge.rope_fwd.default, (q, k, cos, sin, pos, "bshd"))
    dq = randn((1, 2, 3, 8))  # bhsd, and no gradient for k
    torch.library.opcheck(torch.ops.kernforge.rope_bwd.default, (dq, None, cos, sin, None, "bhsd"))


def _inputs(**over):
    args = {
        "q": randn((2, 4, 3, 8)),
        "k": randn((2, 4, 1, 8)),
        "cos": randn((6, 8)),
        "sin": randn((6, 8)),
        "position_ids": None,
        "layout": "bshd",
    }
    args.update(over)
    return args


def _long(*values):
    return torch.tensor(values, device=DEVICE)


@pytest.mark.parametrize(
    "over, error, word",
    [
        ({"q": [1.0]}, TypeError, "q"),
        ({"q": torch.ones(2, 4, 3, 8, dtype=torch.int32, device=DEVICE)}, kf.DTypeError, "q"),
        ({"layout": "sbhd"}, kf.ArgumentError, "layout"),
        ({"q": randn((2, 4, 8))}, kf.ShapeError, "4-D"),
        ({"k": randn((2, 4, 1, 8), torch.float16)}, kf.DTypeError, "dtype"),
        ({"sin": randn((6, 8), torch.float16)}, kf.DTypeError, "dtype"),
        ({"k": randn((2, 5, 1, 8))}, kf.ShapeError, "k"),
        ({"k": randn((1, 4, 1, 8))}, kf.ShapeError, "k"),
        ({"k": randn((2, 4, 1, 6))}, kf.ShapeError, "k"),
        ({"sin": randn((6, 6))}, kf.ShapeError, "sin"),
        ({"cos": randn((8,)), "sin": randn((8,))}, kf.ShapeError, "cos"),
        ({"cos": randn((3, 6, 8)), "sin": randn((3, 6, 8))}, kf.ShapeError, "batch"),
        ({"cos": randn((6, 5)), "sin": randn((6, 5))}, kf.ShapeError, "rot_dim"),
        ({"cos": randn((6, 10)), "sin": randn((6, 10))}, kf.ShapeError, "rot_dim"),
        ({"cos": randn((3, 8)), "sin": randn((3, 8))}, kf.ShapeError, "positions"),
        ({"position_ids": _long(0.0, 1.0, 2.0, 3.0)}, kf.DTypeError, "integers"),
        ({"position_ids": _long(True, False, True, True)}, kf.DTypeError, "integers"),
        ({"position_ids": _long(0, 1, 2)}, kf.ShapeError, "position_ids"),
        ({"position_ids": _long([0, 1, 2, 3]).expand(3, 4)}, kf.ShapeError, "position_ids"),
        ({"position_ids": _long(0, 1, 2, 6)}, kf.ShapeError, "range"),
        ({"position_ids": _long(0, -1, 2, 3)}, kf.ShapeError, "range"),
    ],
    ids=[
        "not-tensor", "int-q", "layout", "rank", "k-dtype", "sin-dtype", "k-seq", "k-batch",
        "k-dim", "sin-shape", "cos-rank", "cos-batch", "odd-rot", "rot-over-dim",
        "short-table", "float-pos", "bool-pos", "pos-len", "pos-batch", "pos-high", "pos-neg",
    ],
)  # fmt: skip
def test_rope_bad_input(over, error, word):
    with pytest.raises(error, match=word):
        ops.rope(**_inputs(**over))


@pytest.mark.gpu
def test_rope_tables_on_other_device():
    with pytest.raises(kf.DeviceError, match="cos"):
        ops.rope(**_inputs(cos=torch.ones(6, 8), sin=torch.ones(6, 8)))
