"""kernforge.llm.loader / tokenizer: tiny Hugging Face models saved with save_pretrained, loaded
into the fused layout and mapped back; random weights; bad folders; tokenizers."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from kernforge.errors import ConfigError, ShapeError, UnsupportedError  # noqa: E402
from kernforge.llm.loader import (  # noqa: E402
    hf_state_dict,
    load_config,
    load_weights,
    random_weights,
    weight_files,
)
from kernforge.llm.tokenizer import (  # noqa: E402
    ByteTokenizer,
    StreamDecoder,
    Tokenizer,
    load_tokenizer,
)

CPU = "cpu"
SMALL = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=200, max_position_embeddings=128,
)  # fmt: skip
#: name -> (config class, model class, extra config, save_pretrained kwargs)
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False), {}),
    "qwen2_tied": (
        "Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True), {},
    ),
    "qwen3": (
        "Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=False), {},
    ),
    "mistral": (
        "MistralConfig", "MistralForCausalLM", dict(sliding_window=16), {},
    ),
    "llama_sharded": (
        "LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False),
        dict(max_shard_size="50KB"),
    ),
}  # fmt: skip


def _build(name: str, seed: int = 0):
    cfg_cls, model_cls, extra, _ = MODELS[name]
    cfg = getattr(transformers, cfg_cls)(**SMALL, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    # HF initialises norms to 1 and biases to 0: randomise everything so that a tensor loaded
    # into the wrong slot cannot go unnoticed.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1 and "bias" not in pname:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


def _save(model, folder, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder, **kwargs)
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (folder, HF model); built once per module (each save takes ~50 ms)."""
    out = {}
    for name in MODELS:
        model = _build(name)
        folder = _save(model, tmp_path_factory.mktemp(name), **MODELS[name][3])
        out[name] = (folder, model)
    return out


def _hf_reference(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "rotary_emb" not in k}


def _load_folder_copy(src, dst, drop=(), add=None, rename=None):
    """Copy a single-file save to ``dst`` with tensors dropped / added (re-saved)."""
    dst.mkdir(exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = safetensors_torch.load_file(str(src / "model.safetensors"))
    for k in drop:
        del tensors[k]
    tensors.update(add or {})
    safetensors_torch.save_file(tensors, str(dst / (rename or "model.safetensors")))
    return dst


# --- loading -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_load_matches_hf_fp32(saved, name):
    folder, model = saved[name]
    config = load_config(folder)
    w = load_weights(folder, config, dtype=torch.float32, device=CPU, progress=False)
    ref = _hf_reference(model)
    got = hf_state_dict(w, config)
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v), k
    assert len(w.layers) == 2 and w.embed.device.type == "cpu"


@pytest.mark.parametrize("name", ["llama", "qwen2_tied", "qwen3"])
def test_load_bf16_casts(saved, name):
    folder, model = saved[name]
    config = load_config(folder)
    w = load_weights(folder, config, dtype=torch.bfloat16, device=CPU, progress=False)
    got = hf_state_dict(w, config)
    for k, v in _hf_reference(model).items():
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], v.to(torch.bfloat16)), k


def test_config_fields(saved):
    assert load_config(saved["qwen3"][0]).qk_norm
    qwen2 = load_config(saved["qwen2_tied"][0])
    assert qwen2.arch == "qwen2" and qwen2.attention_bias and qwen2.tie_word_embeddings
    assert load_config(saved["mistral"][0]).sliding_window == 16
    llama = load_config(saved["llama"][0])
    assert (llama.arch, llama.num_kv_heads, llama.head_dim) == ("llama", 2, 16)


def test_fused_layout_and_tied_head(saved):
    folder, model = saved["qwen2_tied"]
    config = load_config(folder)
    w = load_weights(folder, config, dtype=torch.float32, device=CPU, progress=False)
    assert w.lm_head is w.embed  # same storage, counted once
    assert w.nbytes() == config.num_params() * 4
    attn = model.model.layers[1].self_attn
    layer = w.layers[1]
    q, kv = config.q_size, config.kv_size
    assert layer.qkv.shape == (q + 2 * kv, 64) and layer.qkv.is_contiguous()
    assert torch.equal(layer.qkv[q + kv :], attn.v_proj.weight)
    assert torch.equal(layer.qkv_bias[q : q + kv], attn.k_proj.bias)
    mlp = model.model.layers[1].mlp
    # gate and up rows interleaved: gate j is row 2j, up j row 2j + 1
    gate_up = torch.stack([mlp.gate_proj.weight, mlp.up_proj.weight], 1).flatten(0, 1)
    assert layer.gate_up.is_contiguous() and torch.equal(layer.gate_up, gate_up)


def test_cross_shard_fused_tensors(saved):
    folder, model = saved["llama_sharded"]
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    files = weight_files(folder)
    assert len(files) > 2
    # Precondition: some fused matrix really has its parts in different shards.
    split = [
        i for i in range(2)
        if len({weight_map[f"model.layers.{i}.self_attn.{p}_proj.weight"] for p in "qkv"}) > 1
        or weight_map[f"model.layers.{i}.mlp.gate_proj.weight"]
        != weight_map[f"model.layers.{i}.mlp.up_proj.weight"]
    ]  # fmt: skip
    assert split
    config = load_config(folder)
    w = load_weights(folder, config, dtype=torch.float32, device=CPU, progress=False)
    for i in split:
        attn, mlp = model.model.layers[i].self_attn, model.model.layers[i].mlp
        want_qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        assert torch.equal(w.layers[i].qkv, want_qkv)
        want_gate_up = torch.stack([mlp.gate_proj.weight, mlp.up_proj.weight], 1).flatten(0, 1)
        assert torch.equal(w.layers[i].gate_up, want_gate_up)


@pytest.mark.parametrize("name", ["llama", "qwen2_tied", "qwen3", "mistral"])
def test_hf_state_dict_round_trip(saved, name):
    folder, model = saved[name]
    config = load_config(folder)
    w = load_weights(folder, config, dtype=torch.float32, device=CPU, progress=False)
    fresh = _build(name, seed=1)  # different weights until loaded
    fresh.load_state_dict(hf_state_dict(w, config), strict=True)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 7))
    with torch.no_grad():
        want, got = model(ids).logits, fresh(ids).logits
    assert torch.equal(got, want)


def test_progress_line_per_shard(saved, capsys):
    folder, _ = saved["llama_sharded"]
    files = weight_files(folder)
    load_weights(folder, load_config(folder), dtype=torch.float32, device=CPU, progress=True)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("load [")]
    assert len(lines) == len(files)
    for line, path in zip(lines, files, strict=True):
        assert line.endswith(path.name)
    assert lines[-1].split("]")[1].split()[0] == f"{len(files)}/{len(files)}"
    load_weights(folder, load_config(folder), dtype=torch.float32, device=CPU, progress=False)
    assert "load [" not in capsys.readouterr().err


def test_any_safetensors_file_and_extras(saved, tmp_path):
    src, model = saved["qwen2_tied"]
    extra = {
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),  # known: silent
        "lm_head.weight": torch.randn(200, 64),  # tied: a stored head is ignored
    }
    folder = _load_folder_copy(src, tmp_path, add=extra, rename="weights-a.safetensors")
    config = load_config(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = load_weights(folder, config, dtype=torch.float32, device=CPU, progress=False)
    assert w.lm_head is w.embed and torch.equal(w.embed, model.model.embed_tokens.weight)


def test_unknown_tensor_warns_once(saved, tmp_path):
    src, model = saved["llama"]
    extra = {f"model.vision.{i}.weight": torch.zeros(3) for i in range(3)}
    folder = _load_folder_copy(src, tmp_path, add=extra)
    with pytest.warns(UserWarning, match=r"3 tensor\(s\).*model\.vision\.0\.weight") as rec:
        w = load_weights(folder, load_config(folder), dtype=torch.float32, device=CPU,
                         progress=False)  # fmt: skip
    assert len([r for r in rec if "not used" in str(r.message)]) == 1
    assert torch.equal(w.final_norm, model.model.norm.weight)


@pytest.mark.gpu
def test_load_and_random_on_gpu(saved):
    folder, model = saved["qwen2_tied"]
    config = load_config(folder)
    w = load_weights(folder, config, dtype=torch.bfloat16, device="cuda", progress=False)
    assert w.embed.is_cuda and w.lm_head is w.embed
    for k, v in _hf_reference(model).items():
        assert torch.equal(hf_state_dict(w, config)[k].cpu(), v.to(torch.bfloat16)), k
    a, b = (random_weights(config, device="cuda", seed=5) for _ in range(2))
    assert a.layers[1].qkv.is_cuda and torch.equal(a.layers[1].qkv, b.layers[1].qkv)


# --- random weights ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "qwen2_tied", "qwen3"])
def test_random_weights(saved, name):
    folder, model = saved[name]
    config = load_config(folder)
    a = random_weights(config, dtype=torch.bfloat16, device=CPU, seed=3)
    b = random_weights(config, dtype=torch.bfloat16, device=CPU, seed=3)
    c = random_weights(config, dtype=torch.bfloat16, device=CPU, seed=4)
    sa, sb, sc = (hf_state_dict(x, config) for x in (a, b, c))
    ref = _hf_reference(model)
    assert {k: tuple(v.shape) for k, v in sa.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    for k in sa:
        assert sa[k].dtype == torch.bfloat16 and torch.isfinite(sa[k].float()).all(), k
        assert torch.equal(sa[k], sb[k]), k
        assert not torch.equal(sa[k], sc[k]), k
    assert (a.lm_head is a.embed) == config.tie_word_embeddings
    norm = a.layers[0].attn_norm.float()
    assert 0.8 < norm.mean() < 1.2 and 0.02 < norm.std() < 0.3


def test_random_weights_run_in_hf_with_unit_activations(saved):
    folder, model = saved["qwen3"]
    config = load_config(folder)
    w = random_weights(config, dtype=torch.float32, device=CPU, seed=0)
    fresh = _build("qwen3", seed=2)
    fresh.load_state_dict(hf_state_dict(w, config), strict=True)
    with torch.no_grad():
        logits = fresh(torch.randint(0, SMALL["vocab_size"], (1, 9))).logits
    assert torch.isfinite(logits).all()
    assert 0.3 < logits.std() < 3.0  # O(1) logits, as documented


# --- errors ------------------------------------------------------------------------------


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope")
    with pytest.raises(ConfigError, match="config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)


def test_unknown_architecture(tmp_path):
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100)
    cfg.architectures = ["GPT2LMHeadModel"]
    cfg.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        load_config(tmp_path)


def test_no_weight_files(saved, tmp_path):
    (tmp_path / "config.json").write_text((saved["llama"][0] / "config.json").read_text())
    with pytest.raises(ConfigError, match="no weight files"):
        load_weights(tmp_path, load_config(tmp_path), device=CPU)


def test_missing_shard_file(saved, tmp_path):
    src, _ = saved["llama_sharded"]
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    victim = weight_files(tmp_path)[2]
    victim.unlink()
    with pytest.raises(ConfigError, match=f"do not exist: {victim.name}"):
        load_weights(tmp_path, load_config(tmp_path), device=CPU)


def test_missing_tensors(saved, tmp_path):
    src, _ = saved["llama"]
    gone = ["model.layers.1.self_attn.k_proj.weight", "lm_head.weight"]
    folder = _load_folder_copy(src, tmp_path, drop=gone)
    with pytest.raises(ConfigError, match=r"2 tensor\(s\) missing") as e:
        load_weights(folder, load_config(folder), device=CPU)
    assert all(name in str(e.value) for name in gone)


def test_wrong_shape(saved, tmp_path):
    src, _ = saved["qwen2_tied"]
    name = "model.layers.0.mlp.up_proj.weight"
    folder = _load_folder_copy(src, tmp_path, add={name: torch.randn(95, 64)})
    with pytest.raises(ShapeError) as e:
        load_weights(folder, load_config(folder), device=CPU)
    msg = str(e.value)
    assert name in msg and "[95, 64]" in msg and "[96, 64]" in msg and "model.safetensors" in msg


def test_quantized_tensor_refused(saved, tmp_path):
    src, _ = saved["llama"]
    name = "model.layers.0.mlp.down_proj.weight"
    q = torch.randint(-8, 8, (64, 96), dtype=torch.int8)
    folder = _load_folder_copy(src, tmp_path, add={name: q})
    with pytest.raises(UnsupportedError, match="I8"):
        load_weights(folder, load_config(folder), device=CPU)


def test_untied_head_missing_is_error(saved, tmp_path):
    src, _ = saved["mistral"]
    folder = _load_folder_copy(src, tmp_path, drop=["lm_head.weight"])
    with pytest.raises(ConfigError, match="lm_head.weight"):
        load_weights(folder, load_config(folder), device=CPU)


# --- tokenizers --------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["hello, world 123", "héllo wörld — €5 😀 日本語", ""])
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer(512)
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert isinstance(tok, Tokenizer)


def test_byte_tokenizer_specials_and_placeholders():
    tok = ByteTokenizer(512, eos_token_ids=(300,), bos_token_id=301)
    ids = tok.encode("ab")
    assert ids == [301, 97, 98]
    assert tok.decode(ids + [400, 99, 300]) == "ab<|400|>c"
    assert tok.decode(ids, skip_special_tokens=False) == "<|301|>ab"
    assert tok.encode("ab", add_special_tokens=False) == [97, 98]
    small = ByteTokenizer(100)
    assert small.encode("é") == [0xC3 % 100, 0xA9 % 100]  # folded: documented lossy


def test_stream_decoder_never_splits_characters():
    tok = ByteTokenizer(512)
    text = "a€😀b日"
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in tok.encode(text)] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[1:4] == ["", "", "€"]


def test_load_tokenizer_none_without_files(saved, tmp_path):
    assert load_tokenizer(tmp_path) is None
    assert load_tokenizer(saved["llama"][0]) is None  # config + weights, no tokenizer


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<eot>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    corpus = ["the quick brown fox jumps over the lazy dog", "héllo wörld € 😀"] * 20
    tok.train_from_iterator(corpus, trainer)
    # A Llama-style post-processor that adds BOS itself.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    folder = tmp_path_factory.mktemp("tok")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "<eot>"}, "add_bos_token": True})
    )
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1]}))
    return folder


def test_load_tokenizer_bpe(bpe_folder):
    tok = load_tokenizer(bpe_folder)
    assert isinstance(tok, Tokenizer)
    assert tok.bos_token_id == 0 and tok.eos_token_ids == (1, 2)
    text = "the lazy fox: héllo € 😀!"
    ids = tok.encode(text)
    assert ids[0] == 0 and ids[1] != 0  # BOS once, though both the template and config add it
    assert len(ids) < len(text.encode()) + 1  # merges happened
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids + [2]) == text  # EOS skipped
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


def test_load_tokenizer_add_bos_false_and_config_fallback(bpe_folder, tmp_path):
    (tmp_path / "tokenizer.json").write_text((bpe_folder / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2, "bos_token_id": 0}))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token_ids == (2,) and tok.bos_token_id == 0
    assert tok.encode("the fox")[0] != 0  # the template's BOS is turned off
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ConfigError, match="tokenizer"):
        load_tokenizer(tmp_path)
