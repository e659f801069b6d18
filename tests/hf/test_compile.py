"""torch.compile of a patched model: a training step traces with no graph break coming from
kernforge, and the compiled model (aot_eager backend on the CPU) gives the eager loss and
gradients.

What can be verified on the CPU: the dense model in fp32 (attention and grouped GEMMs run on
their torch fallbacks there, whose one-time FallbackWarning is issued by an eager warm-up step
first, as in any real run) and the MoE model in fp16 (every kernforge op on its Triton kernel in
the interpreter). Inductor on the GPU is in test_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

import kernforge as kf
from tests.helpers import rel_err

from .models import model, tokens
from .test_patch import TOL_GRAD, labels_of, step

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::kernforge.FallbackWarning")


def kernforge_breaks(explanation) -> list[str]:
    """Graph-break reasons whose stack passes through kernforge's source."""
    out = []
    for b in explanation.break_reasons:
        frames = [f"{f.filename}:{f.lineno}" for f in b.user_stack]
        if any("/kernforge/" in f for f in frames):
            out.append(f"{b.reason.splitlines()[0]} at {frames[-3:]}")
    return out


@pytest.mark.parametrize(("arch", "dtype"), [("llama", torch.float32),
                                             ("mixtral", torch.float16)])  # fmt: skip
def test_compiled_training_step(arch, dtype):
    torch._dynamo.reset()
    m = kf.patch(model(arch, dtype))
    ids = tokens(2, 12, m.config.vocab_size)
    labels = labels_of(ids)
    ref, ref_g = step(m, ids, labels)  # eager (and the warm-up)

    def loss_of(ids, labels):
        return m(input_ids=ids, labels=labels).loss

    explanation = torch._dynamo.explain(loss_of)(ids, labels)
    assert not kernforge_breaks(explanation), kernforge_breaks(explanation)
    torch._dynamo.reset()

    compiled = torch.compile(m, backend="aot_eager")
    m.zero_grad(set_to_none=True)
    out = compiled(input_ids=ids, labels=labels)
    out.loss.backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert out.logits is None and rel_err(out.loss, ref.loss) <= tol
    for name, p in m.named_parameters():
        err = rel_err(p.grad, ref_g[name])
        assert err <= (TOL_GRAD if dtype == torch.float32 else 1e-2), f"{name}: {err:.3g}"
    torch._dynamo.reset()
    kf.unpatch(m)
