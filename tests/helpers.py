"""Test helpers: the device under test, shapes per device, tolerances, references."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

import kernforge as kf

ON_GPU = torch.cuda.is_available()
#: Kernels are tested on the GPU where there is one, else in Triton's CPU interpreter.
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: Relative (norm-wise) error allowed against a float64 reference, per input dtype.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def sizes(cpu: Sequence, gpu: Sequence = ()) -> list:
    """Shapes to test: small ones everywhere (the interpreter is slow), big ones on the GPU."""
    return list(cpu) + (list(gpu) if ON_GPU else [])


#: Memory layouts every kernel is tested on: contiguous; rows padded (row stride > width, a
#: view the kernels read in place); and strided features (last-dim stride 2, copied first).
LAYOUTS = ["contiguous", "padded", "strided"]


def randn(shape, dtype=torch.float32, layout: str = "contiguous", requires_grad: bool = False,
          scale: float = 1.0) -> torch.Tensor:  # fmt: skip
    """Fresh normal random values on DEVICE in the given memory ``layout`` (see LAYOUTS)."""
    shape = tuple(shape)
    n = shape[-1] if shape else 1
    width = {"contiguous": n, "padded": n + 3, "strided": 2 * n}[layout]
    buf = (torch.randn(*shape[:-1], width, device=DEVICE) * scale).to(dtype)
    x = buf[..., ::2] if layout == "strided" else buf[..., :n]
    return x.requires_grad_(requires_grad)


def f64(*tensors):
    """Detached float64 copies (requiring grad where the original did), for references."""
    out = []
    for t in tensors:
        if t is None or not t.is_floating_point():
            out.append(t)
        else:
            out.append(t.detach().double().requires_grad_(t.requires_grad))
    return out


def reference(fn: Callable, *args, **kwargs):
    """Run ``fn`` (a kernforge op) on the torch backend: with float64 inputs, the reference."""
    with kf.backend("torch"):
        return fn(*args, **kwargs)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error. The denominator is floored at an RMS of 1e-2 so that a result
    that is zero in exact arithmetic (e.g. the gradient of a 1-wide norm) compares absolutely."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = max(ref.norm().item(), 1e-2 * max(ref.numel(), 1) ** 0.5)
    return (out - ref).norm().item() / denom


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "",
                 tol_scale: float = 1.0) -> None:  # fmt: skip
    """``out`` matches ``ref`` in shape, has no NaN/inf (poison left behind), and is within the
    dtype's tolerance."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten output?)"
    err = rel_err(out, ref)
    tol = TOL[dtype] * tol_scale
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g} ({dtype})"


def grads(outputs, inputs, grad_outputs):
    """torch.autograd.grad that returns None for inputs that got no gradient."""
    live = [i for i in inputs if i is not None and i.requires_grad]
    got = iter(torch.autograd.grad(outputs, live, grad_outputs, allow_unused=True))
    return [next(got) if (i is not None and i.requires_grad) else None for i in inputs]
