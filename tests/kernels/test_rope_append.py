"""ops.rope_append_kv: the fused decode q/k/v step against the unfused torch reference."""

from __future__ import annotations

import pytest
import torch

from kernforge import backend, ops
from kernforge.errors import ArgumentError, ShapeError
from kernforge.llm.config import preset
from kernforge.llm.model import rope_tables
from tests.helpers import DEVICE


def _case(bsz, hq, hk, d, dtype, paged, device=DEVICE):
    cfg = preset("tiny").replace(num_heads=hq, num_kv_heads=hk, head_dim=d)
    cos, sin = rope_tables(cfg, 64, dtype, torch.device(device))
    qkv = torch.randn(bsz, (hq + 2 * hk) * d + 3, dtype=dtype, device=device)[:, :-3]  # strided
    lens = torch.randint(0, 40, (bsz,), dtype=torch.int32, device=device)
    if paged:
        cache = torch.randn(2 * bsz * 3 + 1, 16, hk, d, dtype=dtype, device=device)
        table = torch.randperm(2 * bsz * 3, dtype=torch.int32, device=device)[: bsz * 3]
        table = (table + 1).view(bsz, 3)
    else:
        cache = torch.randn(bsz, 48, hk, d, dtype=dtype, device=device)
        table = None
    return qkv, cos, sin, lens, cache, table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("shape", [(1, 4, 2, 16), (3, 6, 1, 24), (2, 2, 2, 8)])
def test_matches_unfused_reference(shape, norm, paged, dtype):
    bsz, hq, hk, d = shape
    qkv, cos, sin, lens, k_cache, table = _case(bsz, hq, hk, d, dtype, paged)
    v_cache = torch.randn_like(k_cache)
    qn = kn = None
    if norm:
        qn = 1 + 0.1 * torch.randn(d, dtype=dtype, device=DEVICE)
        kn = 1 + 0.1 * torch.randn(d, dtype=dtype, device=DEVICE)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    with backend("torch"):
        want = ops.rope_append_kv(qkv, cos, sin, lens, ref_k, ref_v, hq, table, qn, kn)
    with backend("triton"):
        got = ops.rope_append_kv(qkv, cos, sin, lens, k_cache, v_cache, hq, table, qn, kn)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(k_cache, ref_k, **tol)
    torch.testing.assert_close(v_cache, ref_v, rtol=0, atol=0)
    # the reference itself: position lens[b] of sequence b, rotate-half formula
    b = bsz - 1
    x = qkv[b, :d].double()
    if norm:
        x = x * torch.rsqrt(x.pow(2).mean() + 1e-6) * qn.double()
    pos = int(lens[b])
    rot = torch.cat((-x[d // 2 :], x[: d // 2]))
    manual = x * cos[pos].double() + rot * sin[pos].double()
    torch.testing.assert_close(got[b, 0].double(), manual, rtol=3e-2, atol=3e-2)


def test_errors():
    qkv, cos, sin, lens, k_cache, _ = _case(2, 4, 2, 16, torch.float32, False)
    v_cache = torch.randn_like(k_cache)
    with pytest.raises(ShapeError, match="features"):
        ops.rope_append_kv(qkv[:, :-16], cos, sin, lens, k_cache, v_cache, 4)
    with pytest.raises(ArgumentError, match="num_heads"):
        ops.rope_append_kv(qkv, cos, sin, lens, k_cache, v_cache, 3)
    with pytest.raises(ArgumentError, match="together"):
        ops.rope_append_kv(qkv, cos, sin, lens, k_cache, v_cache, 4,
                           q_norm=torch.ones(16, device=DEVICE))  # fmt: skip
    with pytest.raises(ShapeError, match="cos"):
        ops.rope_append_kv(qkv, cos[:, :8], sin[:, :8], lens, k_cache, v_cache, 4)
