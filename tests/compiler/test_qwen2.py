"""A tiny random-weight Hugging Face Qwen2: prefill and decode steps (static KV cache written
with index_copy) through compiled programs, against HF's own logits."""

from __future__ import annotations

import pytest
import torch

from kernforge.compiler import compile_model

from .nets import modes, on, pearson
from .qwen2_step import Qwen2Step, empty_cache, tiny_qwen2

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf():
    return tiny_qwen2()


def _hf_steps(hf, ids):
    with torch.no_grad():
        pre = hf(ids, use_cache=True)
        nxt = pre.logits[:, -1].argmax(-1, keepdim=True)
        dec = hf(nxt, past_key_values=pre.past_key_values, use_cache=True)
    return pre.logits, nxt, dec.logits


@pytest.mark.parametrize("mode", modes("numpy", "interpret", "gpu"))
def test_qwen2_prefill_and_decode_fp32(hf, mode):
    step = Qwen2Step(hf)
    ids = torch.randint(0, hf.config.vocab_size, (1, 5))
    pos = torch.arange(5)
    kc, vc = empty_cache(hf, 1, 12)
    ref_pre, nxt, ref_dec = _hf_steps(hf, ids)
    prefill = compile_model(step, (ids, pos, kc, vc))
    assert "rms_norm x5" in prefill.describe() and "sdpa x2" in prefill.describe()
    logits, kc2, vc2 = (t.cpu() for t in prefill.run(*on(mode, ids, pos, kc, vc), mode=mode))
    torch.testing.assert_close(logits, ref_pre, rtol=1e-4, atol=1e-4)
    assert kc2[:, :, :, 5:].abs().max() == 0 and (kc2[:, :, :, :5].abs().amax(-1) > 0).all()
    p5 = torch.tensor([5])
    decode = compile_model(step, (nxt, p5, kc2, vc2))
    logits2, kc3, _ = (t.cpu() for t in decode.run(*on(mode, nxt, p5, kc2, vc2), mode=mode))
    torch.testing.assert_close(logits2, ref_dec, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kc3[:, :, :, :5], kc2[:, :, :, :5])  # old rows kept


@pytest.mark.parametrize("mode", modes("interpret", "gpu"))
def test_qwen2_bf16(hf, mode):
    step = Qwen2Step(hf)
    ids = torch.randint(0, hf.config.vocab_size, (1, 4))
    kc, vc = empty_cache(hf, 1, 8)
    ref_pre, _, _ = _hf_steps(hf, ids)
    prog = compile_model(step, (ids, torch.arange(4), kc, vc), dtype=torch.bfloat16)
    logits = prog.run(*on(mode, ids, torch.arange(4), kc, vc), mode=mode)[0].cpu()
    assert logits.dtype == torch.bfloat16
    assert pearson(logits, ref_pre) > 0.999
    assert (logits.float().argmax(-1) == ref_pre.argmax(-1)).float().mean() >= 0.75
