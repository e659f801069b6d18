"""The public catalog ops. Each checks its inputs, then runs on the backend that dispatch picks.

Every op takes float16, bfloat16 and float32 (float64 too, on the torch backend) of any leading
shape, and is differentiable on every backend. Triton kernels compute in fp32 and return the
input dtype.
"""

from __future__ import annotations

import torch

from . import checks, config
from .dispatch import dispatch
from .errors import ArgumentError, DTypeError, ShapeError


def _dim(op: str, x: torch.Tensor, dim: int) -> int:
    if not isinstance(dim, int) or not -x.dim() <= dim < max(x.dim(), 1):
        raise ArgumentError(f"{op}: dim={dim!r} is out of range for a {x.dim()}-D input")
    return dim % x.dim()


@dispatch("rms_norm")
def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
):
    """RMSNorm over the last dimension: ``x / sqrt(mean(x**2) + eps) * weight``.

    With ``residual``, normalizes ``h = x + residual`` and returns ``(y, h)``: the fused
    pre-norm residual add. ``weight`` may be None (no scale). Output dtype is x's.
    """
    checks.tensor("rms_norm", "x", x)
    checks.floating("rms_norm", "x", x)
    checks.last_dim_vector("rms_norm", "weight", weight, x)
    if residual is not None:
        checks.tensor("rms_norm", "residual", residual)
        checks.shape("rms_norm", "residual", residual, tuple(x.shape), "must match x")
        checks.same_dtype("rms_norm", x=x, residual=residual)
        checks.same_device("rms_norm", x=x, residual=residual)


@dispatch("layer_norm")
def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
):
    """LayerNorm over the last dimension: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    ``weight`` and ``bias`` may be None. Output dtype is x's.
    """
    checks.tensor("layer_norm", "x", x)
    checks.floating("layer_norm", "x", x)
    checks.last_dim_vector("layer_norm", "weight", weight, x)
    checks.last_dim_vector("layer_norm", "bias", bias, x)


@dispatch("softmax")
def softmax(x: torch.Tensor, dim: int = -1):
    """Softmax along ``dim`` (kernels run on the last dimension; others are moved there)."""
    checks.tensor("softmax", "x", x)
    checks.floating("softmax", "x", x)
    _dim("softmax", x, dim)


@dispatch("log_softmax")
def log_softmax(x: torch.Tensor, dim: int = -1):
    """Log-softmax along ``dim`` (kernels run on the last dimension; others are moved there)."""
    checks.tensor("log_softmax", "x", x)
    checks.floating("log_softmax", "x", x)
    _dim("log_softmax", x, dim)


@dispatch("silu_and_mul")
def silu_and_mul(x: torch.Tensor):
    """``x`` [..., 2d] -> ``silu(x[..., :d]) * x[..., d:]`` [..., d] (fused gate/up halves)."""
    checks.tensor("silu_and_mul", "x", x)
    checks.floating("silu_and_mul", "x", x)
    if x.shape[-1] % 2:
        raise ShapeError(
            f"silu_and_mul: x's last dimension must be even (gate and up halves), got "
            f"shape {tuple(x.shape)}"
        )


def _check_glu(op: str, gate: torch.Tensor, up: torch.Tensor) -> None:
    checks.tensor(op, "gate", gate)
    checks.tensor(op, "up", up)
    checks.floating(op, "gate", gate)
    checks.shape(op, "up", up, tuple(gate.shape), "must match gate")
    checks.same_dtype(op, gate=gate, up=up)
    checks.same_device(op, gate=gate, up=up)


@dispatch("swiglu")
def swiglu(gate: torch.Tensor, up: torch.Tensor):
    """``silu(gate) * up``, elementwise, for gate and up of one shape."""
    _check_glu("swiglu", gate, up)


@dispatch("geglu")
def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh"):
    """``gelu(gate) * up`` with the tanh approximation (``"tanh"``) or exact erf (``"none"``)."""
    _check_glu("geglu", gate, up)
    if approximate not in ("tanh", "none"):
        raise ArgumentError(f"geglu: approximate={approximate!r}; use 'tanh' or 'none'")


@dispatch("rope")
def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    layout: str = "bshd",
):
    """Rotary position embedding of q and k, as Hugging Face's ``apply_rotary_pos_emb``.

    q [B, S, Hq, D] and k [B, S, Hk, D] (``layout="bshd"``) or [B, H, S, D] (``"bhsd"``);
    cos/sin [S', R] or [B, S', R] with R <= D even: only the first R features rotate
    (rotate-half, GPT-NeoX style). Row ``position_ids[b, s]`` (or ``s`` when None) of cos/sin
    is used at each position. Returns ``(q_rot, k_rot)``; gradients flow to q and k.
    """
    op = "rope"
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        checks.tensor(op, name, t)
        checks.floating(op, name, t)
    if layout not in ("bshd", "bhsd"):
        raise ArgumentError(f"rope: layout={layout!r}; use 'bshd' or 'bhsd'")
    if q.dim() != 4 or k.dim() != 4:
        raise ShapeError(
            f"rope: q and k must be 4-D ({layout}), got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    checks.same_dtype(op, q=q, k=k)
    checks.same_dtype(op, cos=cos, sin=sin)
    checks.same_device(op, q=q, k=k, cos=cos, sin=sin, position_ids=position_ids)
    s_ax = 1 if layout == "bshd" else 2
    b, s, d = q.shape[0], q.shape[s_ax], q.shape[-1]
    if (k.shape[0], k.shape[s_ax], k.shape[-1]) != (b, s, d):
        raise ShapeError(
            f"rope: k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, seq and head "
            f"dim ({layout})"
        )
    checks.shape(op, "sin", sin, tuple(cos.shape), "must match cos")
    if cos.dim() not in (2, 3) or (cos.dim() == 3 and cos.shape[0] not in (1, b)):
        raise ShapeError(
            f"rope: cos must be [seq, rot_dim] or [batch={b}, seq, rot_dim], got {tuple(cos.shape)}"
        )
    rot = cos.shape[-1]
    if rot % 2 or rot > d or rot == 0:
        raise ShapeError(f"rope: rot_dim={rot} (cos's last size) must be even and in [2, {d}]")
    table = cos.shape[-2]
    if position_ids is None:
        if table < s:
            raise ShapeError(f"rope: cos has {table} positions, fewer than seq={s}")
        return
    checks.tensor(op, "position_ids", position_ids)
    if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
        raise DTypeError(f"rope: position_ids must be integers, got {position_ids.dtype}")
    if position_ids.shape not in ((b, s), (1, s), (s,)):
        raise ShapeError(
            f"rope: position_ids has shape {tuple(position_ids.shape)}, expected [{b}, {s}], "
            f"[1, {s}] or [{s}]"
        )
    if config.settings.check_indices and position_ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(position_ids.min()), int(position_ids.max())
        if lo < 0 or hi >= table:
            raise ShapeError(
                f"rope: position_ids range [{lo}, {hi}] is outside cos/sin's {table} rows "
                "(set KERNFORGE_CHECK_INDICES=0 to skip this check, which syncs the device)"
            )


@dispatch("linear")
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``x @ weight.T + bias``, as ``torch.nn.functional.linear``: x [..., K], weight [N, K]
    (``nn.Linear``'s layout), bias [N] or None; returns [..., N] in x's dtype.

    For at most 16 rows of x (LLM decode) on the GPU, in bfloat16 or float16 with K a multiple
    of 8 and a contiguous weight, this runs kernforge's CUDA GEMV (weight read once at the
    memory roofline); more rows run torch's matmul (cuBLAS).
    """
    op = "linear"
    checks.tensor(op, "x", x)
    checks.tensor(op, "weight", weight)
    checks.floating(op, "x", x)
    if weight.dim() != 2:
        raise ShapeError(
            f"linear: weight must be 2-D [out_features, in_features], got shape "
            f"{tuple(weight.shape)}"
        )
    if weight.shape[1] != x.shape[-1]:
        raise ShapeError(
            f"linear: x's last dimension ({x.shape[-1]}) must equal weight's in_features "
            f"(weight {tuple(weight.shape)} is [out_features, in_features], as in nn.Linear); "
            "transpose the weight if it is stored [in, out]"
        )
    if bias is not None:
        checks.tensor(op, "bias", bias)
        checks.shape(op, "bias", bias, (weight.shape[0],), "one value per output feature")
    checks.same_dtype(op, x=x, weight=weight, bias=bias)
    checks.same_device(op, x=x, weight=weight, bias=bias)
