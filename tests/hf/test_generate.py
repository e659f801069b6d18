"""Inference with a patched model: greedy generation with a KV cache gives transformers'
tokens (sliding windows past their size included), and padded batches (which run sdpa for the
masked calls) give transformers' logits, loss and gradients."""

from __future__ import annotations

import warnings

import pytest
import torch

import kernforge as kf
from tests.helpers import rel_err

from .models import model, tokens
from .test_patch import TOL_OUT, check_grads, step

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::kernforge.FallbackWarning")

GREEDY = dict(max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0)


# llama: plain; mistral: a window of 8 on every layer (6 + 10 tokens pass it, with the
# sliding cache); qwen2: one windowed layer, one full; qwen3_moe: routed experts, a dense layer.
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3_moe"])
def test_greedy_generation_same_tokens(arch):
    m = model(arch).eval()
    ids = tokens(2, 6, m.config.vocab_size)
    want = m.generate(ids, **GREEDY)
    kf.patch(m)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = m.generate(ids, **GREEDY)
    assert torch.equal(got, want)
    # No padding: every attention call ran ops.fmha (no sdpa fallback).
    fallbacks = [str(w.message) for w in seen if "kernforge attention" in str(w.message)]
    assert not fallbacks
    kf.unpatch(m)


def test_padded_generation_same_tokens():
    m = model("llama").eval()
    ids = tokens(2, 6, m.config.vocab_size)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    want = m.generate(ids, attention_mask=mask, **GREEDY)
    kf.patch(m)
    assert torch.equal(m.generate(ids, attention_mask=mask, **GREEDY), want)
    kf.unpatch(m)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_padded_batch_matches(arch):
    m = model(arch)
    ids = tokens(2, 12, m.config.vocab_size)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0  # right padding (training batches)
    mask[1, :3] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ref_logits = m(ids, attention_mask=mask).logits
    ref, ref_g = step(m, ids, labels, attention_mask=mask)
    kf.patch(m)
    with pytest.warns(kf.FallbackWarning, match="explicit attention mask"), torch.no_grad():
        logits = m(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert rel_err(logits[keep], ref_logits[keep]) <= TOL_OUT
    out, g = step(m, ids, labels, attention_mask=mask)
    assert rel_err(out.loss, ref.loss) <= TOL_OUT
    check_grads(g, ref_g, f"{arch} padded")
    # An all-ones mask is no padding: ops.fmha runs (the mask function returns None).
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with torch.no_grad():
            m(ids, attention_mask=torch.ones_like(ids))
    fallbacks = [str(w.message) for w in seen if "kernforge attention" in str(w.message)]
    assert not fallbacks
    kf.unpatch(m)
