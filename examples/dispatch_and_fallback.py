"""Backend choice and fallback: pick a backend, see the one-time fallback warning, and make
fallback an error with KERNFORGE_DISABLE_FALLBACK=1.

    python examples/dispatch_and_fallback.py
"""

from __future__ import annotations

import warnings

import torch

import kernforge
from kernforge import config, ops

x = torch.randn(3, 64, dtype=torch.float64)  # Triton kernels take fp16/bf16/fp32 only
print("registered:", kernforge.registered()["rms_norm"])
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    ops.rms_norm(x, None)  # float64: Triton cannot, so torch runs it, with a warning
print("warning:", seen[0].message if seen else "none")

config.reload({"KERNFORGE_DISABLE_FALLBACK": "1"})
try:
    ops.rms_norm(x, None)
except kernforge.UnsupportedError as err:
    print("with KERNFORGE_DISABLE_FALLBACK=1:", err)
finally:
    config.reload()

with kernforge.backend("torch"):
    print("inside `with kernforge.backend('torch')`:", kernforge.get_backend())
