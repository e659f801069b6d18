"""The pieces of kernforge.hf on their own: the loss drop-in against transformers'
ForCausalLMLoss, the attention function against eager attention, the mask function's
decisions, and the errors for what cannot be patched."""

from __future__ import annotations

import pytest
import torch

import kernforge as kf
from kernforge.hf import attention, loss
from kernforge.hf.architectures import by_name
from tests.helpers import DEVICE, assert_close, grads, randn, rel_err

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::kernforge.FallbackWarning")


# --- loss ---------------------------------------------------------------------------------------


def _labels(b: int, s: int, v: int) -> torch.Tensor:
    labels = torch.randint(0, v, (b, s), device=DEVICE)
    labels[0, :3] = -100  # a prompt that is not trained on
    labels[-1, -2] = -100
    return labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("items", [None, "tensor", "int"])
def test_causal_lm_loss_matches_transformers(dtype, items):
    from transformers.loss.loss_utils import ForCausalLMLoss

    b, s, v = 2, 7, 101
    logits = randn((b, s, v), dtype, requires_grad=True)
    labels = _labels(b, s, v)
    n = None if items is None else int((labels[:, 1:] != -100).sum()) + 3  # as accumulation
    n = torch.tensor(n) if items == "tensor" else n
    got = loss.causal_lm_loss(logits, labels, v, num_items_in_batch=n)
    want = ForCausalLMLoss(logits, labels, v, num_items_in_batch=n)
    assert got.dtype == torch.float32 and got.shape == ()
    (g,) = grads([got], [logits], None)
    (wg,) = grads([want], [logits], None)
    assert g.dtype == dtype  # no fp32 copy of the logits: the gradient is in their dtype
    assert rel_err(got, want) <= 1e-6
    assert_close(g, wg, dtype, "dlogits")


def test_causal_lm_loss_shift_labels_and_ignore_index():
    from transformers.loss.loss_utils import ForCausalLMLoss

    b, s, v = 3, 5, 37
    logits = randn((b, s, v))
    shift = torch.randint(0, v, (b, s), device=DEVICE)
    shift[1, :] = 7  # ignore_index=7 drops this row
    got = loss.causal_lm_loss(logits, None, v, shift_labels=shift, ignore_index=7)
    want = ForCausalLMLoss(logits, None, v, shift_labels=shift, ignore_index=7)
    assert rel_err(got, want) <= 1e-6


def test_causal_lm_loss_all_ignored_is_zero():
    logits = randn((1, 4, 11))
    got = loss.causal_lm_loss(logits, torch.full((1, 4), -100, device=DEVICE), 11)
    assert got.item() == 0.0  # transformers' mean gives NaN here (documented difference)


def test_fused_causal_lm_loss_matches_logits_path():
    b, s, h, v = 2, 6, 32, 53
    hidden = randn((b, s, h), requires_grad=True)
    head = torch.nn.Linear(h, v, bias=True, device=DEVICE)
    labels = _labels(b, s, v)
    got = loss.fused_causal_lm_loss(hidden, head, labels, num_items_in_batch=9)
    want = loss.causal_lm_loss(head(hidden), labels, v, num_items_in_batch=9)
    params = [hidden, head.weight, head.bias]
    g = grads([got], params, None)
    wg = grads([want], params, None)
    assert rel_err(got, want) <= 1e-6
    for a, w, name in zip(g, wg, ["dhidden", "dweight", "dbias"], strict=True):
        assert_close(a, w, torch.float32, name, tol_scale=5)


# --- attention ----------------------------------------------------------------------------------


class _Module(torch.nn.Module):
    def __init__(self, causal: bool = True, groups: int = 2):
        super().__init__()
        self.is_causal, self.num_key_value_groups = causal, groups


def _eager(q, k, v, scale, causal, window, softcap):
    """Attention in float64, bottom-right causal mask, transformers' window convention."""
    q, k, v = (t.double() for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    sq, sk = q.shape[2], k.shape[2]
    i = torch.arange(sq, device=q.device)[:, None] + sk - sq
    j = torch.arange(sk, device=q.device)[None, :]
    keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        keep &= j <= i
    if window:
        keep &= j > i - window
    s = s.masked_fill(~keep, float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


CASES = [  # (Sq, Sk, causal, sliding_window, softcap)
    (9, 9, True, None, None),
    (1, 13, True, None, None),  # decode step over a cache
    (4, 11, True, None, None),  # chunked prefill: bottom-right
    (12, 12, True, 5, None),
    (7, 7, False, None, 30.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_attention_forward_matches_eager(dtype, case):
    sq, sk, causal, window, softcap = case
    b, hq, hk, d = 2, 4, 2, 16
    # [B, S, H, D] projections seen as [B, H, S, D], as transformers passes them.
    q = randn((b, sq, hq, d), dtype, requires_grad=True)
    k = randn((b, sk, hk, d), dtype, requires_grad=True)
    v = randn((b, sk, hk, d), dtype, requires_grad=True)
    scale = d**-0.5
    out, weights = attention.attention_forward(
        _Module(causal), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None,
        scaling=scale, sliding_window=window, softcap=softcap,
    )  # fmt: skip
    want = _eager(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, causal,
                  window, softcap)  # fmt: skip
    assert weights is None and out.shape == (b, sq, hq, d) and out.dtype == dtype
    assert_close(out, want, dtype, "out", tol_scale=2)
    dout = randn(out.shape, dtype)
    got_g = grads([out], [q, k, v], [dout])
    want_g = grads([want], [q, k, v], [dout.double()])
    for g, w, name in zip(got_g, want_g, "qkv", strict=True):
        assert_close(g, w, dtype, f"d{name}", tol_scale=4)


def test_attention_forward_with_mask_runs_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, s, d = 2, 4, 6, 16
    q, k, v = (randn((b, h, s, d)) for _ in range(3))
    mask = torch.ones(b, 1, s, s, dtype=torch.bool, device=q.device).tril()
    mask[1, :, :, :2] = False  # left padding of the second row
    mask[1, :, :2, 0] = True  # (keep fully padded query rows finite)
    m = _Module(groups=1)
    with pytest.warns(kf.FallbackWarning, match="explicit attention mask"):
        out, _ = attention.attention_forward(m, q, k, v, mask, scaling=0.3)
    want, _ = sdpa_attention_forward(m, q, k, v, mask, scaling=0.3)
    assert torch.equal(out, want)


def test_mask_function_decisions():
    from transformers.masking_utils import causal_mask_function

    mask = attention.attention_mask
    kw = dict(batch_size=2, mask_function=causal_mask_function, dtype=torch.float32)
    # Plain causal, aligned: None (fmha's own causal mask), with or without an all-ones mask.
    assert mask(q_length=5, kv_length=5, **kw) is None
    assert mask(q_length=1, kv_length=9, q_offset=8, **kw) is None  # decode step
    assert (
        mask(
            q_length=3,
            kv_length=9,
            q_offset=6,
            attention_mask=torch.ones(2, 9, dtype=torch.bool),
            **kw,
        )
        is None
    )  # noqa: E501
    # Padding: sdpa's boolean mask.
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[0, 0] = False
    got = mask(q_length=3, kv_length=9, q_offset=6, attention_mask=pad, **kw)
    assert got is not None and got.shape == (2, 1, 3, 9) and not got[0, 0, :, 0].any()
    assert got[1, 0].sum() == 7 + 8 + 9
    # A static cache's unfilled tail (kv longer than the tokens so far): materialised, so the
    # tail is masked (fmha would align bottom-right and see it).
    got = mask(q_length=4, kv_length=16, q_offset=0, **kw)
    assert got is not None and not got[..., 4:].any()
    # Packed sequences / custom masks (transformers turns the skip off): materialised.
    assert mask(q_length=5, kv_length=5, allow_is_causal_skip=False, **kw) is not None


# --- what cannot be patched ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "bert", "gemma2", "", "Llama4ForCausalLM"])
def test_unsupported_names_raise(name):
    with pytest.raises(kf.UnsupportedError, match="llama, mistral, qwen2, qwen3, mixtral"):
        kf.patch(name)
    with pytest.raises(kf.UnsupportedError, match="supported architectures"):
        kf.unpatch(name)


def test_names_are_case_and_separator_insensitive():
    for name in ("llama", "LLAMA", "LlamaForCausalLM", "Llama"):
        assert by_name(name).model_type == "llama"
    for name in ("qwen3_moe", "Qwen3-MoE", "qwen3moe", "Qwen3MoeForCausalLM"):
        assert by_name(name).model_type == "qwen3_moe"
    assert kf.hf.supported_architectures() == [
        "llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe",
    ]  # fmt: skip


def test_unsupported_models_raise():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(kf.UnsupportedError, match="'gpt2'.*llama, mistral"):
        kf.patch(gpt2)
    assert not any(type(m).__name__.startswith("Kernforge") for m in gpt2.modules())
    with pytest.raises(kf.UnsupportedError, match="Linear"):
        kf.patch(torch.nn.Linear(2, 2))
    with pytest.raises(kf.UnsupportedError):
        kf.patch(42)


def test_importing_kernforge_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, kernforge; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
