"""Generate text with kernforge.llm: a built-in random-weight model (no download), greedy and
sampled, batched and streamed. Pass a Hugging Face folder as the first argument to use it.

    python examples/llm_generate.py [MODEL_FOLDER]
"""

import sys

from kernforge.llm import LLM

model = sys.argv[1] if len(sys.argv) > 1 else "random:tiny"
llm = LLM(model)
print(f"{llm.name}: {llm.config.arch}, {llm.config.num_params() / 1e6:.1f}M params on {llm.device}")

# A ragged batch in one call: greedy, the model's end-of-sequence tokens ignored.
out = llm.generate([[1, 2, 3], [7, 8, 9, 10, 11]], max_new_tokens=8, ignore_eos=True)
for ids, reason in zip(out.token_ids, out.finish_reasons, strict=True):
    print("greedy:", ids, reason)
print(f"time to first token {1e3 * out.stats.time_to_first_token_s:.1f} ms")

# Sampling with a seed reproduces the same tokens.
a = llm.generate([5, 6, 7], max_new_tokens=8, temperature=0.9, top_p=0.9, seed=3)
b = llm.generate([5, 6, 7], max_new_tokens=8, temperature=0.9, top_p=0.9, seed=3)
assert a.token_ids == b.token_ids
print("sampled:", a.token_ids[0])

# Streaming: text pieces as they are produced (token ids when there is no tokenizer).
for piece in llm.stream("Hello", max_new_tokens=8, ignore_eos=True):
    print(repr(piece), end=" ", flush=True)
print()
