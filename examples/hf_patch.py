"""kernforge.patch on a Hugging Face model: a tiny random-weight Llama built from a config (no
download), patched in place, checked against the unpatched model (logits, a training step's
loss and gradients, greedy generation), trained for a few steps, unpatched. Then the same by
name, before the model is built. Runs on the CPU (Triton's interpreter) or a GPU.

    python examples/hf_patch.py
"""

from __future__ import annotations

import os
import warnings

import torch

import kernforge

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

dev = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 on the GPU; fp32 on the CPU (the interpreter's attention kernels take fp16/bf16, so the
# attention runs its torch reference there, with a one-time FallbackWarning: silenced here).
dtype = torch.bfloat16 if dev == "cuda" else torch.float32
warnings.simplefilter("ignore", kernforge.FallbackWarning)

config = LlamaConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=101, max_position_embeddings=64,
)  # fmt: skip
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config).to(dev, dtype)
ids = torch.randint(1, config.vocab_size, (2, 12), device=dev)


def train_step(m):
    m.zero_grad(set_to_none=True)
    out = m(input_ids=ids, labels=ids)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in m.named_parameters()}


with torch.no_grad():
    ref_logits = model(ids).logits
ref, ref_grads = train_step(model)
ref_tokens = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)

kernforge.patch(model)  # RMSNorm, MLP, rope, attention, loss, fused linear cross-entropy
print("patched classes:", sorted({type(m).__name__ for m in model.modules()
                                  if type(m).__name__.startswith("Kernforge")}))  # fmt: skip
print("attention implementation:", model.config._attn_implementation)

with torch.no_grad():
    logits = model(ids).logits
out, grads = train_step(model)  # labels + grad on: fused loss, no [tokens, vocab] logits
print(f"max |logits - transformers| = {(logits - ref_logits).abs().max().item():.2e}")
print(f"loss {out.loss.item():.6f} (transformers {ref.loss.item():.6f}); logits: {out.logits}")
worst = max((grads[n] - g).norm().item() / g.norm().item() for n, g in ref_grads.items())
print(f"worst relative gradient difference over {len(grads)} parameters: {worst:.2e}")
tokens = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
print("greedy generation identical:", torch.equal(tokens, ref_tokens))

opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
for step in range(3):
    opt.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    print(f"step {step}: loss {loss.item():.4f}")

kernforge.unpatch(model)
print("after unpatch:", model.config._attn_implementation,
      any(type(m).__name__.startswith("Kernforge") for m in model.modules()))  # fmt: skip

# By name: models built afterwards use kernforge (and "kernforge" attention by default).
kernforge.patch("llama")
built = AutoModelForCausalLM.from_config(LlamaConfig(**config.to_dict()))
print("built after patch('llama'):", built.config._attn_implementation,
      type(built.model.norm).__name__)  # fmt: skip
kernforge.unpatch("llama")
kernforge.unpatch(built)
print("supported:", ", ".join(kernforge.hf.supported_architectures()))
