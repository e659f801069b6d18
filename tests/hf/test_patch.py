"""kernforge.patch on tiny random-weight transformers models (fp32 on the CPU, the kernels in
Triton's interpreter): patched against unpatched logits, losses and every parameter's
gradient; unpatch restores everything exactly; patch by name; the flags."""

from __future__ import annotations

import pytest
import torch

import kernforge as kf
from kernforge.hf import patching
from kernforge.hf.architectures import ARCHITECTURES
from tests.helpers import DEVICE, rel_err

from .models import ARCHS, MOE_ARCHS, config, model, tokens

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::kernforge.FallbackWarning")

#: Patched vs unpatched in fp32: the same math in another order (fp32 statistics, fused
#: kernels, chunked losses); measured <= 1e-6 relative.
TOL_OUT, TOL_GRAD = 2e-5, 1e-4


def labels_of(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[0, :4] = -100  # an untrained prompt
    return labels


def step(m, ids, labels, **kw):
    """One training step's loss and every parameter's gradient."""
    m.zero_grad(set_to_none=True)
    out = m(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    g = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
    return out, g


def kernforge_classes(m) -> set[str]:
    return {type(x).__name__ for x in m.modules() if type(x).__name__.startswith("Kernforge")}


def check_grads(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), f"{what}: parameters with gradients differ"
    for name in want:
        err = rel_err(got[name], want[name])
        assert err <= TOL_GRAD, f"{what}: grad of {name}: relative error {err:.3g}"


@pytest.mark.parametrize("arch", ARCHS)
def test_patched_matches_unpatched(arch):
    m = model(arch)
    ids = tokens(2, 12, m.config.vocab_size)
    labels = labels_of(ids)
    module = ARCHITECTURES[arch].module()
    rope_before = module.apply_rotary_pos_emb
    with torch.no_grad():
        ref_logits = m(ids).logits
    ref, ref_g = step(m, ids, labels)
    assert m.config._attn_implementation == "sdpa"

    assert kf.patch(m) is m
    classes = kernforge_classes(m)
    assert f"Kernforge{ARCHITECTURES[arch].prefix}RMSNorm" in classes
    assert (f"Kernforge{ARCHITECTURES[arch].prefix}MLP" in classes) == (arch != "mixtral")
    hf_norm = getattr(module, f"{ARCHITECTURES[arch].prefix}RMSNorm")
    assert all(isinstance(x, hf_norm) for x in m.modules() if "RMSNorm" in type(x).__name__)
    assert m.config._attn_implementation == "kernforge"
    if arch in MOE_ARCHS:
        assert m.config._experts_implementation == "kernforge"
    assert module.apply_rotary_pos_emb is kf.nn.apply_rotary_pos_emb

    with torch.no_grad():
        logits = m(ids).logits
    assert rel_err(logits, ref_logits) <= TOL_OUT
    # Training with labels: the fused linear cross-entropy, no logits.
    out, g = step(m, ids, labels)
    assert out.logits is None
    assert rel_err(out.loss, ref.loss) <= TOL_OUT
    check_grads(g, ref_g, arch)
    # The logits path (kernforge's loss_function on the logits) gives the same loss.
    with torch.no_grad():
        out = m(input_ids=ids, labels=labels, skip_logits=False)
    assert out.logits is not None and rel_err(out.loss, ref.loss) <= TOL_OUT

    assert kf.unpatch(m) is m
    assert not kernforge_classes(m)
    assert m.config._attn_implementation == "sdpa"
    assert "forward" not in m.__dict__ and "_loss_function" not in m.__dict__
    assert module.apply_rotary_pos_emb is rope_before
    with torch.no_grad():
        assert torch.equal(m(ids).logits, ref_logits)  # bit for bit: transformers' code again


def test_moe_router_aux_loss():
    m = model("mixtral")
    ids = tokens(2, 10, m.config.vocab_size)
    labels = labels_of(ids)
    ref, ref_g = step(m, ids, labels, output_router_logits=True)
    kf.patch(m)
    out, g = step(m, ids, labels, output_router_logits=True)
    assert out.aux_loss is not None and rel_err(out.aux_loss, ref.aux_loss) <= TOL_OUT
    assert rel_err(out.loss, ref.loss) <= TOL_OUT
    check_grads(g, ref_g, "mixtral with aux loss")  # the router's gradient included
    kf.unpatch(m)


def test_patch_twice_is_a_no_op_and_flags_leave_parts_alone():
    m = model("qwen3")
    kf.patch(m, rms_norm=False, attention=False, fused_linear_cross_entropy=False)
    assert kernforge_classes(m) == {"KernforgeQwen3MLP"}
    assert m.config._attn_implementation == "sdpa"
    assert "forward" not in m.__dict__
    assert m.loss_function is kf.hf.loss.causal_lm_loss
    kf.patch(m)  # already patched: nothing changes
    assert kernforge_classes(m) == {"KernforgeQwen3MLP"}
    ids = tokens(1, 6, m.config.vocab_size)
    out = m(input_ids=ids, labels=ids)
    assert out.logits is not None  # the forward is transformers'
    kf.unpatch(m)
    assert not kernforge_classes(m) and "_loss_function" not in m.__dict__
    kf.unpatch(m)  # not patched: nothing happens


def test_rope_is_reference_counted():
    module = ARCHITECTURES["llama"].module()
    original = module.apply_rotary_pos_emb
    a, b = model("llama"), model("llama")
    kf.patch(a)
    kf.patch(b)
    kf.unpatch(a)
    assert module.apply_rotary_pos_emb is kf.nn.apply_rotary_pos_emb  # b still holds it
    kf.patch("llama")
    kf.unpatch(b)
    assert module.apply_rotary_pos_emb is kf.nn.apply_rotary_pos_emb  # the name still does
    kf.unpatch("llama")
    assert module.apply_rotary_pos_emb is original


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_patch_by_name_then_load(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = model(arch)
    ref.save_pretrained(tmp_path)
    ids = tokens(2, 10, ref.config.vocab_size)
    labels = labels_of(ids)
    with torch.no_grad():
        ref_logits = ref(ids).logits
    ref_out, ref_g = step(ref, ids, labels)
    arch_info = ARCHITECTURES[arch]
    module = arch_info.module()
    before = {n: getattr(module, n) for n in (*arch_info.rms_norms, *arch_info.mlps,
                                              "apply_rotary_pos_emb")}  # fmt: skip
    causal_lm = getattr(module, arch_info.causal_lm)
    forward = causal_lm.forward

    assert kf.patch(arch.upper()) == arch.upper()
    assert kf.hf.is_patched(arch)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).to(DEVICE)
    built = AutoModelForCausalLM.from_config(config(arch))
    for name, m in (("from_pretrained", loaded), ("from_config", built)):
        assert kernforge_classes(m), name
        assert m.config._attn_implementation == "kernforge", name
        if arch in MOE_ARCHS:
            assert m.config._experts_implementation == "kernforge"
    m = loaded  # the saved weights, loaded into kernforge classes
    with torch.no_grad():
        assert rel_err(m(ids).logits, ref_logits) <= TOL_OUT
    out, g = step(m, ids, labels)
    assert out.logits is None and rel_err(out.loss, ref_out.loss) <= TOL_OUT
    check_grads(g, ref_g, f"{arch} by name")
    explicit = AutoModelForCausalLM.from_config(config(arch), attn_implementation="eager")
    assert explicit.config._attn_implementation == "eager"  # an explicit choice wins
    # So does the implementation a config carries from a model built from it before.
    assert AutoModelForCausalLM.from_config(ref.config).config._attn_implementation == "sdpa"

    kf.unpatch(arch)
    assert not kf.hf.is_patched(arch)
    assert all(getattr(module, n) is v for n, v in before.items())
    assert causal_lm.forward is forward and "_loss_function" not in causal_lm.__dict__
    pretrained = getattr(module, arch_info.pretrained)
    assert "_check_and_adjust_attn_implementation" not in pretrained.__dict__
    plain = AutoModelForCausalLM.from_config(config(arch))
    assert not kernforge_classes(plain) and plain.config._attn_implementation == "sdpa"
    # A model built while patched keeps its layers until unpatched itself.
    kf.unpatch(m)
    assert not kernforge_classes(m) and m.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert rel_err(m(ids).logits, ref_logits) <= TOL_OUT


def test_patched_model_pickles(tmp_path):
    m = kf.patch(model("llama"))
    path = tmp_path / "m.pt"
    torch.save(m, path)
    # A fresh mixed-class registry, as in another process: the class is rebuilt by name.
    name = "KernforgeLlamaRMSNorm"
    saved = patching.__dict__.pop(name)
    try:
        back = torch.load(path, weights_only=False)
    finally:
        patching.__dict__.setdefault(name, saved)
    assert type(back.model.norm).__name__ == name
    ids = tokens(1, 5, m.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, m(ids).logits)
    kf.unpatch(m)
    kf.unpatch(back)


def test_training_forward_skips_the_packed_sequence_sync(monkeypatch):
    """With no position ids, mask or cache, the fused-loss forward tells transformers' packed-
    sequence check that its arange positions are not packed, without the check's device sync;
    explicit (packed) position ids are still checked, and give unpatched transformers' loss."""
    from transformers import masking_utils

    from kernforge.hf import loss as hf_loss

    m = model("llama")
    ids = tokens(2, 12, m.config.vocab_size)
    labels = labels_of(ids)
    packed = torch.tensor([list(range(5)) + list(range(7))] * 2, device=ids.device)
    # Unpatched transformers finds packing only without a cache.
    ref_packed, ref_packed_g = step(m, ids, labels, position_ids=packed, use_cache=False)
    kf.patch(m)
    wrapped = masking_utils.find_packed_sequence_indices
    original = wrapped._kernforge_original
    calls = []

    def spy(position_ids):
        calls.append(position_ids)
        return original(position_ids)

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices",
                        hf_loss._skip_packed_check(spy))  # fmt: skip
    out, _ = step(m, ids, labels)
    assert out.logits is None and calls == []  # the fused path: not checked, no sync
    out, g = step(m, ids, labels, position_ids=packed)
    assert len(calls) == 1 and original(packed) is not None  # checked: packed
    assert rel_err(out.loss, ref_packed.loss) <= TOL_OUT
    check_grads(g, ref_packed_g, "packed position ids")
    with torch.no_grad():
        m(ids)  # inference builds a cache: transformers checks nothing either way
    out, _ = step(m, ids, labels, use_cache=True)  # a cache asked for: no check either
    assert len(calls) == 1
    kf.unpatch(m)
    # The wrapper stays installed (like the attention registration) and is transparent.
    assert masking_utils.find_packed_sequence_indices is not None
    assert wrapped(packed) is not None and wrapped(torch.arange(6)[None]) is None
