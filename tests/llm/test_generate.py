"""kernforge.llm end to end: greedy generation equals Hugging Face ``generate`` on tiny
random-weight models saved with ``save_pretrained``; caches, batching, sampling, the CLI."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kernforge import cli  # noqa: E402
from kernforge.errors import ArgumentError  # noqa: E402
from kernforge.llm import LLM, SamplingParams  # noqa: E402
from kernforge.llm.loader import hf_state_dict  # noqa: E402

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, head_dim=16, max_position_embeddings=256,
             eos_token_id=None, bos_token_id=None, pad_token_id=None)  # fmt: skip
ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              {"tie_word_embeddings": True}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                {"sliding_window": 6}),
}  # fmt: skip
STEPS = 20


def _hf_model(arch: str, tmp_path, **extra):
    cfg_cls, model_cls, kw = ARCHS[arch]
    torch.manual_seed(1234)
    model = model_cls(cfg_cls(**{**SMALL, **kw, **extra})).eval()
    with torch.no_grad():  # HF initializes norms to ones and biases to zeros: make them matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path / arch
    model.save_pretrained(folder)
    return model, folder


def _hf_greedy(model, prompt: list[int], steps: int = STEPS):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                             min_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
    return out.sequences[0, len(prompt) :].tolist(), [lg[0] for lg in out.logits]


def _llm(folder, **kw) -> LLM:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp32 runs some ops on the torch fallback
        return LLM(folder, dtype=torch.float32, device="cpu", progress=False, **kw)


def _generate(llm: LLM, prompts, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return llm.generate(prompts, **kw)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_matches_hf_generate(arch, tmp_path):
    model, folder = _hf_model(arch, tmp_path)
    prompt = [7, 3, 100, 42, 9]
    want, want_logits = _hf_greedy(model, prompt)
    out = _generate(_llm(folder), prompt, max_new_tokens=STEPS, return_logits=True)
    assert out.token_ids[0] == want
    assert out.finish_reasons == ["length"]
    assert len(out.logits) == STEPS
    for step, (got, ref) in enumerate(zip(out.logits, want_logits, strict=True)):
        torch.testing.assert_close(got[0], ref.float(), rtol=1e-4, atol=1e-4,
                                   msg=lambda m, s=step: f"step {s}: {m}")  # fmt: skip


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_paged_ragged_batch_matches_each_prompt_alone(arch, tmp_path):
    model, folder = _hf_model(arch, tmp_path)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [200], [1, 2, 3]]
    alone = [_hf_greedy(model, p, 12)[0] for p in prompts]
    for paged in (False, True):
        llm = _llm(folder, paged=paged, page_size=4)
        out = _generate(llm, prompts, max_new_tokens=12)
        assert out.token_ids == alone, f"paged={paged}"
        if paged:  # every page went back to the pool
            assert len(llm.cache.free_pages) == llm.cache.k.shape[1] - 1


def test_stop_tokens_end_rows(tmp_path):
    _, folder = _hf_model("llama", tmp_path)
    llm = _llm(folder)
    free = _generate(llm, [[4, 5, 6], [9, 9]], max_new_tokens=10)
    stop = free.token_ids[0][3]  # the 4th token of row 0 becomes a stop token
    out = _generate(llm, [[4, 5, 6], [9, 9]], max_new_tokens=10, stop_token_ids=[stop])
    first = free.token_ids[0].index(stop)
    assert out.token_ids[0] == free.token_ids[0][: first + 1]
    assert out.finish_reasons[0] == "stop"
    if stop in free.token_ids[1]:
        assert out.token_ids[1][-1] == stop
    else:
        assert out.token_ids[1] == free.token_ids[1] and out.finish_reasons[1] == "length"


def test_sampling_is_reproducible_with_a_seed(tmp_path):
    _, folder = _hf_model("qwen2", tmp_path)
    llm = _llm(folder)
    kw = dict(max_new_tokens=10, temperature=1.5, top_k=50, top_p=0.95, repetition_penalty=1.2)
    a = _generate(llm, [[1, 2, 3], [4]], seed=7, **kw)
    b = _generate(
        llm,
        [[1, 2, 3], [4]],
        sampling=SamplingParams(
            temperature=1.5, top_k=50, top_p=0.95, repetition_penalty=1.2, seed=7
        ),
        max_new_tokens=10,
    )
    c = _generate(llm, [[1, 2, 3], [4]], seed=8, **kw)
    assert a.token_ids == b.token_ids and a.stats.seed == 7
    assert a.token_ids != c.token_ids
    greedy = _generate(llm, [[1, 2, 3]], max_new_tokens=10)
    assert a.token_ids[0] != greedy.token_ids[0]


def test_streaming_and_text(capsys):
    llm = LLM(progress=False, device="cpu")  # the embedded random:tiny model
    assert llm.name == "random:tiny"
    seen: list[tuple[int, int]] = []
    out = llm.generate(["hi", "hello there"], max_new_tokens=5, ignore_eos=True,
                       on_token=lambda r, t: seen.append((r, t)))  # fmt: skip
    for r in range(2):
        assert [t for rr, t in seen if rr == r] == out.token_ids[r]
    assert out.texts is not None and len(out.texts) == 2
    pieces = list(llm.stream([3, 4, 5], max_new_tokens=4, ignore_eos=True))
    assert len(pieces) <= 4 and all(isinstance(p, str) for p in pieces)
    assert out.stats.new_tokens == 10 and out.stats.decode_steps == 4


def test_bf16_through_the_kernels_tracks_fp32():
    """bfloat16 runs the Triton kernels (the interpreter here); its logits stay close to the
    float32 run of the same weights (copied: random draws in bf16 and fp32 differ on some torch
    versions, 2.11's CPU normal_ for one)."""
    ref = LLM("random:tiny", dtype=torch.float32, device="cpu", progress=False)
    low = LLM("random:tiny", dtype=torch.bfloat16, device="cpu", progress=False)
    src = hf_state_dict(ref.decoder.weights, ref.config)
    with torch.no_grad():
        for name, t in hf_state_dict(low.decoder.weights, low.config).items():
            t.copy_(src[name])
    prompts = [[10, 20, 30, 40], [7]]
    a = _generate(ref, prompts, max_new_tokens=3, return_logits=True)
    b = _generate(low, prompts, max_new_tokens=3, return_logits=True)
    torch.testing.assert_close(b.logits[0], a.logits[0], rtol=0.05, atol=0.05)


def test_bad_arguments(tmp_path):
    llm = LLM("random:tiny", device="cpu", progress=False, max_seq_len=32)
    with pytest.raises(ArgumentError, match="max_seq_len"):
        llm.generate([1] * 30, max_new_tokens=5)
    with pytest.raises(ArgumentError, match="vocabulary"):
        llm.generate([[1, 2, 10**6]])
    with pytest.raises(ArgumentError, match="max_new_tokens"):
        llm.generate([1], max_new_tokens=0)
    with pytest.raises(ArgumentError, match="empty"):
        llm.generate([[]])
    with pytest.raises(ArgumentError):
        llm.generate([1], temperature=-1.0)


def test_cli_generate(capsys):
    assert cli.main(["generate", "--max-new-tokens", "4", "--prompt", "abc", "--device", "cpu",
                     "--ignore-eos"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "time to first token" in out and "tokens/s" in out and out.startswith("abc")
    assert cli.main(["generate", "--model", "random:nope", "--device", "cpu"]) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True])
def test_cuda_graphs_match_eager_on_gpu(paged, tmp_path):
    """The graphed prefill/decode (decode kernels as programmatic dependent launches) give the
    tokens and logits of the eager run launched plainly (same kernels), for ragged batches in
    two bucket sizes, and the bf16 model tracks HF's fp32 logits."""
    model, folder = _hf_model("qwen2", tmp_path)
    graphed = LLM(folder, dtype=torch.bfloat16, paged=paged, page_size=16, progress=False)
    eager = LLM(folder, dtype=torch.bfloat16, paged=paged, page_size=16, cuda_graphs=False,
                progress=False)  # fmt: skip
    eager.decoder.dependent_launches = False
    for prompts in ([[5, 6, 7, 8, 9]], [[1, 2, 3], [9] * 17, [4], [8, 8, 8, 8, 8, 8]]):
        for _ in range(2):  # the second call replays captured graphs
            a = graphed.generate(prompts, max_new_tokens=STEPS, return_logits=True)
        b = eager.generate(prompts, max_new_tokens=STEPS, return_logits=True)
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logits, b.logits, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    want, want_logits = _hf_greedy(model, [5, 6, 7, 8, 9], 1)
    out = graphed.generate([5, 6, 7, 8, 9], max_new_tokens=1, return_logits=True)
    torch.testing.assert_close(out.logits[0][0].cpu(), want_logits[0].float(), rtol=0.05,
                               atol=0.05)  # fmt: skip
