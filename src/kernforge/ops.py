"""The public catalog ops. Each checks its inputs, then runs on the backend that dispatch picks.

The norms, activations and rope take float16, bfloat16 and float32 (float64 too, on the torch
backend) of any leading shape, and are differentiable on every backend. The GEMM, MoE and
attention ops say in their docstrings which dtypes their kernels take (others run on torch) and
which inputs get gradients. Kernels accumulate in fp32 and return the input dtype (fp8_matmul:
``out_dtype``). Sections: norms and activations, rope, linear, GEMM, grouped GEMM, fp8 GEMM,
mixture of experts, attention, decode attention, losses.
"""

from __future__ import annotations

import torch

from . import checks
from .dispatch import dispatch
from .errors import ArgumentError, DeviceError, DTypeError, ShapeError


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
    if position_ids.numel() and checks.index_checks_on():
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
    memory roofline); more rows run torch's matmul (cuBLAS), or kernforge's Triton GEMM
    (``ops.matmul`` with ``weight.t()`` read in place; docs/gemm.md) when the backend
    ``"triton"`` is named: ``"auto"`` keeps cuBLAS there, which is still faster.
    """
    _check_linear("linear", x, weight, bias)


def _check_linear(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """x [..., K] floating, weight [N, K] (nn.Linear's layout), bias [N] or None; one dtype and
    device."""
    checks.tensor(op, "x", x)
    checks.tensor(op, "weight", weight)
    checks.floating(op, "x", x)
    if weight.dim() != 2:
        raise ShapeError(
            f"{op}: weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}"
        )
    if weight.shape[1] != x.shape[-1]:
        raise ShapeError(
            f"{op}: x's last dimension ({x.shape[-1]}) must equal weight's in_features "
            f"(weight {tuple(weight.shape)} is [out_features, in_features], as in nn.Linear); "
            "transpose the weight if it is stored [in, out]"
        )
    if bias is not None:
        checks.tensor(op, "bias", bias)
        checks.shape(op, "bias", bias, (weight.shape[0],), "one value per output feature")
    checks.same_dtype(op, x=x, weight=weight, bias=bias)
    checks.same_device(op, x=x, weight=weight, bias=bias)


@dispatch("fused_linear")
def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    swiglu: bool = False,
    residual: torch.Tensor | None = None,
):
    """A linear layer with the work around it in a transformer decoder layer, in this order:

    - with ``norm_weight``: x is first normalised, ``rms_norm(x, norm_weight, eps)``;
    - ``y = x @ weight.T + bias`` (weight [N, K], ``nn.Linear``'s layout);
    - with ``swiglu``: ``y = silu(y[..., 0::2]) * y[..., 1::2]`` [..., N / 2]: weight holds the
      gate and up projections' rows interleaved (gate row j at row 2j, up row j at 2j + 1);
    - with ``residual`` (y's shape): ``y = y + residual``.

    For at most 16 rows of x on the GPU (LLM decode; bf16/fp16, K a multiple of 8, a
    contiguous weight, no autograd) this is one launch of the CUDA GEMV: x is scaled by the
    norm weight as it is read (in the main loop, or in a prologue) with its squares summed,
    the outputs are scaled by ``rsqrt(mean(x**2) + eps)``, and SwiGLU and the residual add run
    in the epilogue; where fusing the norm measured slower it runs as ``rms_norm`` first
    (``kernels.linear.norm_mode``). It rounds where the unfused ops do, except that x is
    multiplied by the norm weight before the ``rsqrt`` scale rather than after. Elsewhere the
    ops run one after another (``rms_norm``, ``linear``, ``swiglu``, an add; a residual alone
    is added by the GEMM), differentiable.
    """
    op = "fused_linear"
    _check_linear(op, x, weight, bias)
    checks.last_dim_vector(op, "norm_weight", norm_weight, x)
    if swiglu and weight.shape[0] % 2:
        raise ShapeError(
            f"fused_linear: swiglu takes gate/up row pairs, an even number of weight rows, got "
            f"{weight.shape[0]}"
        )
    out_features = weight.shape[0] // 2 if swiglu else weight.shape[0]
    if residual is not None:
        checks.tensor(op, "residual", residual)
        checks.shape(op, "residual", residual, (*x.shape[:-1], out_features), "y's shape")
    checks.same_dtype(op, x=x, norm_weight=norm_weight, residual=residual)
    checks.same_device(op, x=x, norm_weight=norm_weight, residual=residual)


# --- GEMM: matmul and bmm (kernels/matmul.py) -----------------------------------------------------


MATMUL_ACTIVATIONS = (None, "relu", "gelu", "silu")


@dispatch("matmul")
def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
):
    """``act(a @ b + bias) + residual`` with the epilogue fused into the GEMM.

    a [..., M, K] (leading dimensions fold into M; a 1-D a is one row), b [K, N]; bias [N] or
    None; activation None, "relu", "gelu" (the tanh approximation, as
    ``F.gelu(approximate="tanh")``) or "silu"; residual of the output's shape [..., M, N] or
    None. Returns [..., M, N] in a's dtype. The Triton GEMM takes float16 and bfloat16 (fp32
    accumulation), any sizes and strides (transposed views are read in place); other dtypes
    run on torch. Differentiable in a, b, bias and residual.

    ``out``: a preallocated contiguous tensor of the output's shape, dtype and device that the
    result is written into (the Triton GEMM stores into it directly; the torch path copies);
    returns ``out``. It must not overlap the inputs, and takes no autograd.
    """
    op = "matmul"
    checks.tensor(op, "a", a)
    checks.tensor(op, "b", b)
    checks.floating(op, "a", a)
    checks.floating(op, "b", b)
    if b.dim() != 2:
        raise ShapeError(
            f"matmul: b must be 2-D [K, N], got shape {tuple(b.shape)}; for batches of "
            "matrices use ops.bmm"
        )
    if a.shape[-1] != b.shape[0]:
        raise ShapeError(
            f"matmul: a {tuple(a.shape)} and b {tuple(b.shape)} do not chain: a's last "
            f"dimension K={a.shape[-1]} must equal b's first dimension {b.shape[0]} "
            "(b is [K, N]; pass weight.t() for an nn.Linear weight [N, K])"
        )
    if activation not in MATMUL_ACTIVATIONS:
        raise ArgumentError(
            f"matmul: activation={activation!r}; use None, 'relu', 'gelu' (tanh) or 'silu'"
        )
    out_shape = (*a.shape[:-1], b.shape[1])
    if bias is not None:
        checks.tensor(op, "bias", bias)
        checks.shape(op, "bias", bias, (b.shape[1],), "one value per output column N")
    if residual is not None:
        checks.tensor(op, "residual", residual)
        checks.shape(op, "residual", residual, out_shape, "must match the output [..., M, N]")
    checks.same_dtype(op, a=a, b=b, bias=bias, residual=residual)
    checks.same_device(op, a=a, b=b, bias=bias, residual=residual)
    if out is not None:
        _check_out(op, out, out_shape, a, a, b, bias, residual)


@dispatch("bmm")
def bmm(a: torch.Tensor, b: torch.Tensor):
    """Batched matrix product: a [B, M, K] @ b [B, K, N] -> [B, M, N] in a's dtype.

    Any strides, including batch stride 0 (``w.expand(B, K, N)``: one matrix for every
    batch). Float16/bfloat16 run on the Triton GEMM (fp32 accumulation). Differentiable.
    """
    op = "bmm"
    checks.tensor(op, "a", a)
    checks.tensor(op, "b", b)
    checks.floating(op, "a", a)
    checks.floating(op, "b", b)
    if a.dim() != 3 or b.dim() != 3:
        raise ShapeError(
            f"bmm: a and b must be 3-D [B, M, K] and [B, K, N], got {tuple(a.shape)} and "
            f"{tuple(b.shape)}; for one matrix b use ops.matmul"
        )
    if a.shape[0] != b.shape[0]:
        raise ShapeError(
            f"bmm: batch sizes differ: a {tuple(a.shape)} and b {tuple(b.shape)}; expand the "
            "shared operand (b.expand(B, K, N) reads one copy)"
        )
    if a.shape[2] != b.shape[1]:
        raise ShapeError(
            f"bmm: a {tuple(a.shape)} and b {tuple(b.shape)} do not chain: a's K={a.shape[2]} "
            f"must equal b's {b.shape[1]}"
        )
    checks.same_dtype(op, a=a, b=b)
    checks.same_device(op, a=a, b=b)


# --- grouped GEMM (kernels/grouped_gemm.py) -------------------------------------------------------


@dispatch("grouped_gemm")
def grouped_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    group_sizes: torch.Tensor,
    bias: torch.Tensor | None = None,
):
    """Grouped GEMM (mixture-of-experts experts): ``y[rows of g] = x[rows of g] @ weight[g].T
    + bias[g]`` for every group, in one kernel launch.

    x [T, K] (bfloat16 or float16 on the Triton kernel; rows sorted by group); weight [G, N, K]
    (per-group ``nn.Linear`` layout, any strides: a [G, K, N] tensor passed as
    ``.transpose(1, 2)`` is read in place); group_sizes [G] int32/int64 on x's device, summing
    to T (groups may be empty); bias [G, N] or None. Returns y [T, N] in x's dtype;
    differentiable in x, weight and bias. The sum of group_sizes is checked on the host when
    ``KERNFORGE_CHECK_INDICES=1`` (a device sync; skipped inside CUDA-graph capture and
    torch.compile).
    """
    op = "grouped_gemm"
    checks.tensor(op, "x", x)
    checks.tensor(op, "weight", weight)
    checks.tensor(op, "group_sizes", group_sizes)
    checks.floating(op, "x", x)
    if x.dim() != 2:
        raise ShapeError(f"grouped_gemm: x must be 2-D [tokens, K], got shape {tuple(x.shape)}")
    if weight.dim() != 3:
        raise ShapeError(
            f"grouped_gemm: weight must be 3-D [groups, N, K], got shape {tuple(weight.shape)}"
        )
    g, n, k = weight.shape
    if k != x.shape[1]:
        raise ShapeError(
            f"grouped_gemm: x's K={x.shape[1]} (x {tuple(x.shape)}) must equal weight's last "
            f"size {k} (weight {tuple(weight.shape)} is [groups, N, K]); pass a [G, K, N] "
            "weight as weight.transpose(1, 2)"
        )
    if group_sizes.dtype not in (torch.int32, torch.int64):
        raise DTypeError(
            f"grouped_gemm: group_sizes must be int32 or int64, got {group_sizes.dtype}"
        )
    checks.shape(op, "group_sizes", group_sizes, (g,), "one row count per group of weight")
    if bias is not None:
        checks.tensor(op, "bias", bias)
        checks.shape(op, "bias", bias, (g, n), "one bias row per group")
    checks.same_dtype(op, x=x, weight=weight, bias=bias)
    checks.same_device(op, x=x, weight=weight, group_sizes=group_sizes, bias=bias)
    if checks.index_checks_on():
        stats = torch.stack([group_sizes.min(), group_sizes.sum()]) if g else torch.zeros(2)
        lo, total = (int(v) for v in stats.tolist())
        if lo < 0 or total != x.shape[0]:
            raise ShapeError(
                f"grouped_gemm: group_sizes must be >= 0 and sum to x's {x.shape[0]} rows, got "
                f"min {lo} and sum {total} (set KERNFORGE_CHECK_INDICES=0 to skip this check, "
                "which syncs the device)"
            )


# --- fp8 GEMM (kernels/fp8_gemm.py) ---------------------------------------------------------------


def _fp8_scale(op: str, name: str, s: torch.Tensor, vector_shapes: tuple, per: str) -> None:
    checks.tensor(op, name, s, min_dim=0)
    if s.dtype != torch.float32:
        raise DTypeError(f"{op}: {name} must be float32, got {s.dtype}")
    if tuple(s.shape) not in ((), (1,), *vector_shapes):
        shapes = " or ".join(str(list(v)) for v in vector_shapes)
        raise ShapeError(
            f"{op}: {name} has shape {list(s.shape)}; expected [] or [1] (one scale for the "
            f"tensor) or {shapes} (one per {per})"
        )


@dispatch("fp8_matmul")
def fp8_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
):
    """fp8 (e4m3) GEMM: ``(a.float() * scale_a) @ (b.float() * scale_b) + bias`` in
    ``out_dtype`` (bfloat16, float16 or float32), accumulated in fp32.

    a [M, K] and b [K, N] in ``torch.float8_e4m3fn`` (see :func:`quantize_fp8`); scale_a is
    one fp32 scale (a 0-d or [1] tensor) or one per row of a ([M]); scale_b one, or one per
    column of b ([N]); bias [N] or None. The kernel wants a row-major and b as ``w.t()`` of an
    [N, K] fp8 weight (strides (1, K)); other layouts are copied first. Runs on Hopper (sm_90)
    only; elsewhere dispatch falls back to the torch reference (dequantize, multiply) with a
    warning, or raises UnsupportedError under KERNFORGE_DISABLE_FALLBACK=1. Forward only: no
    gradient.
    """
    op = "fp8_matmul"
    checks.tensor(op, "a", a)
    checks.tensor(op, "b", b)
    if a.dim() != 2 or b.dim() != 2:
        raise ShapeError(
            f"fp8_matmul: a and b must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    for name, t in (("a", a), ("b", b)):
        if t.dtype != torch.float8_e4m3fn:
            raise DTypeError(
                f"fp8_matmul: {name} must be torch.float8_e4m3fn, got {t.dtype}; quantize it "
                "with ops.quantize_fp8(x, axis) (which also returns its scale)"
            )
    m, k = a.shape
    if b.shape[0] != k:
        raise ShapeError(
            f"fp8_matmul: a {tuple(a.shape)} and b {tuple(b.shape)} do not chain: a's K={k} "
            f"must equal b's first size {b.shape[0]} (b is [K, N]; for an [N, K] weight w pass "
            "w.t())"
        )
    n = b.shape[1]
    _fp8_scale(op, "scale_a", scale_a, ((m,), (m, 1)), "row of a")
    _fp8_scale(op, "scale_b", scale_b, ((n,), (1, n)), "column of b")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ArgumentError(
            f"fp8_matmul: out_dtype={out_dtype}; use torch.bfloat16, torch.float16 or torch.float32"
        )
    if bias is not None:
        checks.tensor(op, "bias", bias)
        checks.floating(op, "bias", bias)
        checks.shape(op, "bias", bias, (n,), "one value per output column")
    checks.same_device(op, a=a, b=b, scale_a=scale_a, scale_b=scale_b, bias=bias)


def quantize_fp8(x: torch.Tensor, axis: int | None = None):
    """``(x_fp8, scale)`` with ``x ≈ x_fp8.float() * scale``, for :func:`fp8_matmul`.

    ``axis=None``: one fp32 scale (0-d); ``axis=1``: one per row of a 2-D x ([M], for a);
    ``axis=0``: one per column ([N], for b). ``scale = amax / 448`` (e4m3's largest value).
    x_fp8 keeps x's strides. Not differentiable.
    """
    from .kernels.fp8_gemm import quantize_fp8 as _quantize

    return _quantize(x, axis)


# --- Mixture of experts (kernels/moe.py) ----------------------------------------------------------

_MOE_INDEX_DTYPES = (torch.int32, torch.int64)


def _moe_index(op: str, name: str, t: torch.Tensor, rank: int) -> None:
    checks.tensor(op, name, t)
    if t.dim() != rank:
        raise ShapeError(f"{op}: {name} must be {rank}-D, got shape {tuple(t.shape)}")
    if t.dtype not in _MOE_INDEX_DTYPES:
        raise DTypeError(f"{op}: {name} must be int32 or int64, got {t.dtype}")


def _moe_range(op: str, name: str, t: torch.Tensor, hi: int, what: str) -> None:
    """With KERNFORGE_CHECK_INDICES=1 (a device sync): every value of ``t`` is in [0, hi)."""
    if not t.numel() or not checks.index_checks_on():
        return
    lo, top = int(t.min()), int(t.max())
    if lo < 0 or top >= hi:
        raise ShapeError(
            f"{op}: {name} range [{lo}, {top}] is outside [0, {hi}) ({what}); set "
            "KERNFORGE_CHECK_INDICES=0 to skip this check, which syncs the device"
        )


@dispatch("moe_route")
def moe_route(
    logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    bias: torch.Tensor | None = None,
):
    """Top-k expert routing: logits [T, E] -> ``(weights [T, k] float32, ids [T, k] int32)``.

    Scores are ``softmax`` (or ``sigmoid``) of the logits in fp32; the k highest are chosen,
    ties going to the lower expert index (deterministic), and with ``renormalize`` the k
    weights are divided by their sum. ``bias`` [E] (DeepSeek-V3's correction) is added to the
    scores for the choice only; the weights are the scores themselves. Differentiable in the
    logits (through the weights). float64 logits give float64 weights (torch backend).
    """
    op = "moe_route"
    checks.tensor(op, "logits", logits)
    checks.floating(op, "logits", logits)
    if logits.dim() != 2:
        raise ShapeError(
            f"moe_route: logits must be 2-D [tokens, experts], got shape {tuple(logits.shape)}; "
            "flatten the leading dimensions first"
        )
    e = logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= e:
        raise ArgumentError(f"moe_route: top_k={top_k!r} must be an int in [1, {e}] (experts)")
    if scoring not in ("softmax", "sigmoid"):
        raise ArgumentError(f"moe_route: scoring={scoring!r}; use 'softmax' or 'sigmoid'")
    if not isinstance(renormalize, bool):
        raise ArgumentError(f"moe_route: renormalize={renormalize!r} must be True or False")
    if bias is not None:
        checks.tensor(op, "bias", bias)
        checks.floating(op, "bias", bias)
        checks.shape(op, "bias", bias, (e,), "one correction per expert")
        checks.same_device(op, logits=logits, bias=bias)


@dispatch("moe_permute")
def moe_permute(x: torch.Tensor, ids: torch.Tensor, num_experts: int):
    """Sort token rows by expert: x [T, H], ids [T, k] -> ``(x_sorted [T*k, H],
    group_sizes [E] int32, order [T*k] int32)``.

    Rows of one expert are contiguous, experts in order, and within an expert by token then
    choice (stable). ``order[t*k + j]`` is the row of x_sorted holding token t's j-th choice
    (what :func:`moe_unpermute` takes). Computed on the device with no host sync (the
    ``KERNFORGE_CHECK_INDICES`` range check of ids aside). Differentiable in x.
    """
    op = "moe_permute"
    checks.tensor(op, "x", x)
    checks.floating(op, "x", x)
    if x.dim() != 2:
        raise ShapeError(f"moe_permute: x must be 2-D [tokens, hidden], got {tuple(x.shape)}")
    _moe_index(op, "ids", ids, 2)
    if ids.shape[0] != x.shape[0]:
        raise ShapeError(
            f"moe_permute: ids {tuple(ids.shape)} must be [tokens={x.shape[0]}, top_k] (one row "
            "of expert ids per row of x)"
        )
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ArgumentError(f"moe_permute: num_experts={num_experts!r} must be an int >= 1")
    if ids.numel() >= 2**31:
        raise ShapeError(f"moe_permute: {ids.numel()} (token, choice) rows exceed 2**31 - 1")
    checks.same_device(op, x=x, ids=ids)
    _moe_range(op, "ids", ids, num_experts, "expert ids")


@dispatch("moe_unpermute")
def moe_unpermute(y_sorted: torch.Tensor, order: torch.Tensor, weights: torch.Tensor):
    """Weighted scatter back: ``y[t] = sum_j weights[t, j] * y_sorted[order[t*k + j]]``.

    y_sorted [T*k, H], order [T*k] (from :func:`moe_permute`), weights [T, k] -> y [T, H] in
    y_sorted's dtype, accumulated in fp32. Deterministic (each token gathers its k rows; no
    atomics). Differentiable in y_sorted and weights.
    """
    op = "moe_unpermute"
    checks.tensor(op, "y_sorted", y_sorted)
    checks.tensor(op, "weights", weights)
    checks.floating(op, "y_sorted", y_sorted)
    checks.floating(op, "weights", weights)
    if y_sorted.dim() != 2 or weights.dim() != 2:
        raise ShapeError(
            f"moe_unpermute: y_sorted must be [T*k, H] and weights [T, k], got "
            f"{tuple(y_sorted.shape)} and {tuple(weights.shape)}"
        )
    _moe_index(op, "order", order, 1)
    n = weights.shape[0] * weights.shape[1]
    if y_sorted.shape[0] != n or order.shape[0] != n:
        raise ShapeError(
            f"moe_unpermute: y_sorted {tuple(y_sorted.shape)} and order {tuple(order.shape)} "
            f"must have T*k = {n} rows (weights {tuple(weights.shape)} is [T, k])"
        )
    checks.same_device(op, y_sorted=y_sorted, order=order, weights=weights)
    _moe_range(op, "order", order, n, "rows of y_sorted")


# --- attention: fmha and fmha_varlen (kernels/attention.py) ---------------------------------------


@dispatch("fmha")
def fmha(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    window: int | tuple[int, int] | None = None,
    softcap: float | None = None,
    layout: str = "bshd",
    return_lse: bool = False,
):
    """Flash attention: ``softmax(q k^T * scale) v`` per head, forward and backward.

    q [B, Sq, Hq, D] and k, v [B, Sk, Hk, D] (``layout="bshd"``) or [B, H, S, D] (``"bhsd"``);
    Hk must divide Hq (GQA/MQA: q head h reads kv head h // (Hq // Hk)). ``scale`` defaults to
    1/sqrt(D). ``causal``: query i sees keys j <= i + Sk - Sq (bottom-right, FlashAttention 2).
    ``window``: (left, right) keys around that diagonal, or an int left; -1 is unbounded.
    ``softcap``: scores become ``softcap * tanh(scores / softcap)`` (Gemma 2). Returns out in q's
    layout and dtype, plus lse [B, Hq, Sq] fp32 (natural log; +inf for a row that sees no key)
    with ``return_lse``. Triton on fp16/bf16 with D a multiple of 8 up to 256.
    """
    from .kernels.attention import check_fmha

    check_fmha(q, k, v, causal, scale, window, softcap, layout, return_lse)


@dispatch("fmha_varlen")
def fmha_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    scale: float | None = None,
    window: int | tuple[int, int] | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
):
    """Flash attention over packed variable-length sequences (no padding).

    q [Tq, Hq, D], k/v [Tk, Hk, D]; sequence b is rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of
    q and ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k/v (int32 [B+1], starting at 0; empty
    sequences allowed). ``max_seqlen_*``: the longest sequence. Masks, scale and softcap as in
    :func:`fmha`; lse is [Hq, Tq]. Forward and backward.
    """
    from .kernels.attention import check_fmha_varlen

    check_fmha_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                      scale, window, softcap, return_lse)  # fmt: skip


# --- decode attention over a KV cache (kernels/decode.py) -----------------------------------------


@dispatch("fmha_decode")
def fmha_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    window: int | tuple[int, int] | None = None,
):
    """Attention of a few new query tokens against a KV cache (flash-decoding, split over the
    KV length), GQA/MQA, contiguous or paged cache. Inference only (no gradient on Triton).

    q [B, Sq, Hq, D] (Sq small: 1..8 new tokens); k_cache/v_cache [B, S_max, Hk, D]
    (contiguous) or [num_pages, page_size, Hk, D] with ``block_table`` [B, max_pages] int32
    (paged); Hk divides Hq. ``cache_seqlens`` int32 [B]: keys of each sequence *including* the
    Sq new tokens (append them first with :func:`append_kv`); new token i sits at position
    ``L - Sq + i`` and sees keys up to itself. ``scale`` defaults to ``1/sqrt(D)``;
    ``softcap`` applies ``softcap * tanh(s / softcap)`` to the scaled scores (None or 0: off);
    ``window`` as in :func:`fmha`: an int ``left`` or a ``(left, right)`` pair, -1 unbounded:
    a query at p sees keys ``p - left .. p``. Returns [B, Sq, Hq, D] in q's dtype. With
    ``KERNFORGE_CHECK_INDICES=1`` (the default) the lengths and used page ids are checked on
    the host first, which syncs; set it to 0 in decode loops and CUDA graphs.
    """
    from .kernels import decode

    decode.check_fmha_decode(q, k_cache, v_cache, cache_seqlens, block_table, scale, softcap,
                             window)  # fmt: skip


@dispatch("append_kv")
def append_kv(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None = None,
):
    """Write new keys/values into a KV cache in place (one kernel for K and V); returns None.

    k_new [B, Sn, Hk, D] and v_new [B, Sn, Hk, Dv] go to positions ``cache_seqlens[b] ..
    cache_seqlens[b] + Sn - 1`` of each sequence in contiguous caches [B, S_max, Hk, D] or
    paged caches [num_pages, page_size, Hk, D] (``block_table`` [B, max_pages] int32). 3-D
    [B, Sn, D] into [.., D] (a latent cache, as MLA's) works too. ``cache_seqlens`` (int32 [B],
    the lengths *before* the append) is not changed: add Sn yourself before calling
    :func:`fmha_decode`.
    """
    from .kernels import decode

    decode.check_append_kv(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table)


@dispatch("rope_append_kv")
def rope_append_kv(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    block_table: torch.Tensor | None = None,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 1e-6,
):
    """A decode step's q/k/v handling in one kernel: returns rope(q) [B, Hq, D] and writes
    rope(k) and v into the KV cache at position ``cache_seqlens[b]``.

    qkv [B, (Hq + 2 * Hk) * D]: one new token per sequence, the fused projection (q heads,
    then k heads, then v heads; ``num_heads`` = Hq). Caches as :func:`append_kv` ([B, S_max,
    Hk, D] contiguous, or [num_pages, page_size, Hk, D] with ``block_table``); Hk and D are
    read from them. cos/sin [S, D] (rotate-half tables, row = position). ``q_norm``/``k_norm``
    [D]: per-head RMSNorm of q and k before the rotation (Qwen3), both or neither.
    ``cache_seqlens`` (int32 [B], lengths before the token) is not changed.
    """
    _check_rope_append("rope_append_kv", qkv, cos, sin, cache_seqlens, k_cache, v_cache,
                       num_heads, block_table, q_norm, k_norm)  # fmt: skip


@dispatch("rope_append_fmha_decode")
def rope_append_fmha_decode(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    block_table: torch.Tensor | None = None,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 1e-6,
    scale: float | None = None,
    window: int | tuple[int, int] | None = None,
):
    """:func:`rope_append_kv` then :func:`fmha_decode`, in one kernel: a decode step's
    attention straight from its fused q/k/v projection. Returns the attention output
    [B, Hq, D] and writes rope(k) and v into the cache at position ``cache_seqlens[b]``.

    Arguments as :func:`rope_append_kv` (``cache_seqlens``: lengths *before* the new token,
    not changed), ``scale`` and ``window`` as :func:`fmha_decode`. Inference only. One launch
    instead of two, and the cached keys are fetched while the projection before it still
    runs: at batch 1 a decode step is latency-bound (Qwen2.5-1.5B decode: docs/llm.md).

    Inside :func:`kernforge.kernels.common.dependent_launches` (the LLM decode step) the
    kernel reads ``cache_seqlens``, ``block_table``, cos/sin and the cached keys and values
    *before* waiting for the kernel launched just before it, so that kernel must not write
    them (the q/k/v projection writes only ``qkv``).
    """
    op = "rope_append_fmha_decode"
    _check_rope_append(op, qkv, cos, sin, cache_seqlens, k_cache, v_cache, num_heads,
                       block_table, q_norm, k_norm)  # fmt: skip
    from .kernels import decode

    decode.check_scalars(op, scale, None)
    decode.normalize_window(op, window)


def _check_rope_append(op: str, qkv, cos, sin, cache_seqlens, k_cache, v_cache, num_heads,
                       block_table, q_norm, k_norm) -> None:  # fmt: skip
    """The input checks of :func:`rope_append_kv` (and the ops built on it)."""
    for name, t in (("qkv", qkv), ("cos", cos), ("sin", sin), ("k_cache", k_cache),
                    ("v_cache", v_cache)):  # fmt: skip
        checks.tensor(op, name, t)
        checks.floating(op, name, t)
    if qkv.dim() != 2 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ShapeError(
            f"{op}: qkv must be [B, (Hq + 2 Hk) D] and the caches 4-D and alike; "
            f"got qkv {tuple(qkv.shape)}, k_cache {tuple(k_cache.shape)}, v_cache "
            f"{tuple(v_cache.shape)}"
        )
    hk, d = k_cache.shape[-2:]
    if not isinstance(num_heads, int) or num_heads <= 0 or num_heads % hk:
        raise ArgumentError(f"{op}: num_heads={num_heads!r} must be a positive "
                            f"multiple of the caches' {hk} KV heads")  # fmt: skip
    if qkv.shape[1] != (num_heads + 2 * hk) * d:
        raise ShapeError(
            f"{op}: qkv has {qkv.shape[1]} features, expected (Hq + 2 Hk) * D = "
            f"({num_heads} + 2 * {hk}) * {d} = {(num_heads + 2 * hk) * d}"
        )
    if cos.dim() != 2 or cos.shape[1] != d or sin.shape != cos.shape or d % 2:
        raise ShapeError(f"{op}: cos/sin must be [positions, D={d}] (D even), got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")  # fmt: skip
    if (q_norm is None) != (k_norm is None):
        raise ArgumentError(f"{op}: give q_norm and k_norm together, or neither")
    for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
        if w is not None:
            checks.tensor(op, name, w)
            checks.shape(op, name, w, (d,), "one weight per head feature")
    checks.same_dtype(op, qkv=qkv, k_cache=k_cache, v_cache=v_cache)
    checks.same_device(op, qkv=qkv, cos=cos, k_cache=k_cache, cache_seqlens=cache_seqlens,
                       block_table=block_table)  # fmt: skip
    from .kernels import decode

    new = qkv.new_empty(qkv.shape[0], 1, hk, d)  # the k and v that the kernel will append
    decode.check_append_kv(new, new, k_cache, v_cache, cache_seqlens, block_table)
    if checks.index_checks_on() and cache_seqlens.numel():
        hi = int(cache_seqlens.max())
        if hi >= cos.shape[0]:
            raise ShapeError(f"{op}: position {hi} is outside cos/sin's "
                             f"{cos.shape[0]} rows")  # fmt: skip


@dispatch("mla_decode")
def mla_decode(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    ckv_cache: torch.Tensor,
    kpe_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None = None,
    scale: float | None = None,
):
    """DeepSeek-V2/V3 multi-head latent attention decode with absorbed projections.

    q_nope [B, Sq, H, Dc] (the no-rope query already multiplied by W_UK), q_rope [B, Sq, H, Dr];
    ckv_cache [B, S_max, Dc] / kpe_cache [B, S_max, Dr] (contiguous) or [num_pages, page_size,
    Dc] / [.., Dr] with ``block_table`` (paged); Dc=512, Dr=64 in DeepSeek-V2/V3 (any sizes
    work). scores = scale * (q_nope . ckv + q_rope . kpe), causal among the Sq new tokens as in
    :func:`fmha_decode`; returns softmax @ ckv, the latent [B, Sq, H, Dc] (apply W_UV after).
    ``scale`` defaults to ``1/sqrt(Dc + Dr)``: DeepSeek passes its own
    (``1/sqrt(qk_nope_dim + qk_rope_dim)`` times its YaRN mscale squared).
    """
    from .kernels import decode

    decode.check_mla_decode(q_nope, q_rope, ckv_cache, kpe_cache, cache_seqlens, block_table,
                            scale)  # fmt: skip


# --- losses (kernels/cross_entropy.py, kernels/fused_linear_ce.py) --------------------------------

_TARGET_DTYPES = (torch.int32, torch.int64)


def _check_loss_args(op: str, target: torch.Tensor, rows: tuple, ignore_index: int,
                     label_smoothing: float, z_loss: float, reduction: str) -> None:  # fmt: skip
    """The target and the loss options shared by the two cross-entropy ops."""
    checks.tensor(op, "target", target, min_dim=0)
    if target.dtype not in _TARGET_DTYPES:
        raise DTypeError(f"{op}: target must be int64 or int32 class ids, got {target.dtype}")
    n = 1
    for d in rows:
        n *= d
    if tuple(target.shape) != tuple(rows) and tuple(target.shape) != (n,):
        raise ShapeError(
            f"{op}: target has shape {tuple(target.shape)}; expected {tuple(rows)} (one class id "
            f"per row of the input) or ({n},) flattened"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ArgumentError(f"{op}: ignore_index={ignore_index!r} must be an int")
    if not isinstance(label_smoothing, int | float) or not 0.0 <= label_smoothing <= 1.0:
        raise ArgumentError(f"{op}: label_smoothing={label_smoothing!r} must be in [0, 1]")
    if not isinstance(z_loss, int | float) or not z_loss >= 0.0:
        raise ArgumentError(f"{op}: z_loss={z_loss!r} must be a number >= 0 (0 turns it off)")
    if reduction not in ("mean", "sum", "none"):
        raise ArgumentError(f"{op}: reduction={reduction!r}; use 'mean', 'sum' or 'none'")


def _target_range(op: str, target: torch.Tensor, classes: int, ignore_index: int) -> None:
    """With KERNFORGE_CHECK_INDICES=1 (a device sync): targets are in [0, classes) or ignored."""
    if not target.numel() or not checks.index_checks_on():
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bool(bad.any()):
        first = int(target[bad][0])
        raise ShapeError(
            f"{op}: target holds class id {first}, outside [0, {classes}) and not "
            f"ignore_index={ignore_index}; fix the labels (or set ignore_index to the padding "
            "id). Set KERNFORGE_CHECK_INDICES=0 to skip this check, which syncs the device"
        )


@dispatch("cross_entropy")
def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
):
    """Cross-entropy of logits [..., V] against class ids ``target`` [...] (int64 or int32).

    ``F.cross_entropy(logits.float(), target, ignore_index=..., label_smoothing=...,
    reduction=...)`` plus ``z_loss * logsumexp(logits)**2`` per row (PaLM's z-loss). Rows whose
    target is ``ignore_index`` count for nothing; "mean" divides by the other rows (none: 0.0,
    not NaN), "sum" adds, "none" returns fp32 losses of target's shape (0 at ignored rows). The
    loss is fp32; the Triton kernels never make an fp32 copy of the logits, and the gradient
    comes back in the logits' dtype. Differentiable in the logits.
    """
    op = "cross_entropy"
    checks.tensor(op, "logits", logits)
    checks.floating(op, "logits", logits)
    if logits.shape[-1] < 1:
        raise ShapeError(f"cross_entropy: logits {tuple(logits.shape)} have no classes (V = 0)")
    rows = tuple(logits.shape[:-1])
    _check_loss_args(op, target, rows, ignore_index, label_smoothing, z_loss, reduction)
    checks.same_device(op, logits=logits, target=target)
    _target_range(op, target, logits.shape[-1], ignore_index)


@dispatch("fused_linear_cross_entropy")
def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
):
    """:func:`cross_entropy` of ``hidden @ weight.T + bias`` without the [N, V] logits.

    hidden [..., H] (N rows), weight [V, H] (an lm_head's layout), bias [V] or None, all of one
    floating dtype; target, options and result as in :func:`cross_entropy`. The tokens go
    ``chunk_size`` at a time (default: as many as keep a chunk's logits under 256 MB), so the
    extra memory is one chunk of logits plus the gradients. Gradients flow to hidden, weight
    and bias; for "mean" and "sum" they are computed during the forward (when grad is on).
    """
    op = "fused_linear_cross_entropy"
    checks.tensor(op, "hidden", hidden)
    checks.tensor(op, "weight", weight)
    checks.floating(op, "hidden", hidden)
    checks.floating(op, "weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ShapeError(
            f"{op}: weight has shape {tuple(weight.shape)}; expected [V, H] with H = "
            f"{hidden.shape[-1]}, hidden's last dimension {tuple(hidden.shape)} (an lm_head "
            "weight, not its transpose)"
        )
    if weight.shape[0] < 1:
        raise ShapeError(f"{op}: weight {tuple(weight.shape)} has no classes (V = 0)")
    if bias is not None:
        checks.tensor(op, "bias", bias)
        checks.shape(op, "bias", bias, (weight.shape[0],), "one value per class")
    checks.same_dtype(op, hidden=hidden, weight=weight, bias=bias)
    rows = tuple(hidden.shape[:-1])
    _check_loss_args(op, target, rows, ignore_index, label_smoothing, z_loss, reduction)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ArgumentError(f"{op}: chunk_size={chunk_size!r} must be None or an int >= 1")
    checks.same_device(op, hidden=hidden, weight=weight, bias=bias, target=target)
    _target_range(op, target, weight.shape[0], ignore_index)


# --- convolution and pooling (kernels/conv.py) ----------------------------------------------------

CONV_ACTIVATIONS = (None, "relu", "gelu", "silu")


def _pair_arg(op: str, name: str, v, least: int) -> tuple[int, int]:
    """An int or a pair of ints >= ``least`` (stride, padding, dilation, kernel size)."""
    t = (v, v) if isinstance(v, int) and not isinstance(v, bool) else v
    if not (
        isinstance(t, (tuple, list))
        and len(t) == 2
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= least for i in t)
    ):
        raise ArgumentError(
            f"{op}: {name}={v!r}; expected an int or a pair of ints, each >= {least}"
        )
    return int(t[0]), int(t[1])


def _check_out(op: str, out, shape: tuple, like: torch.Tensor, *inputs,
               channels_last: bool = False) -> None:  # fmt: skip
    """``out=`` must be a tensor of ``shape`` in ``like``'s dtype and device, contiguous
    (channels-last for the NCHW convolution and pools), and no autograd may be wanted."""
    checks.tensor(op, "out", out, min_dim=0)
    if tuple(out.shape) != tuple(shape):
        raise ShapeError(
            f"{op}: out has shape {tuple(out.shape)}, expected the output's {tuple(shape)}"
        )
    if out.dtype != like.dtype:
        raise DTypeError(f"{op}: out is {out.dtype}; the output is {like.dtype} (the inputs')")
    if out.device != like.device:
        raise DeviceError(f"{op}: out is on {out.device}, the inputs on {like.device}")
    dense = out.permute(0, 2, 3, 1).is_contiguous() if channels_last else out.is_contiguous()
    if not dense:
        fmt = "channels-last contiguous" if channels_last else "contiguous"
        how = (
            "x.contiguous(memory_format=torch.channels_last)" if channels_last
            else "torch.empty(shape) or .contiguous()"
        )  # fmt: skip
        raise ArgumentError(
            f"{op}: out must be {fmt} (strides {out.stride()} for shape {tuple(out.shape)}); "
            f"allocate it as {how}"
        )
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        raise ArgumentError(
            f"{op}: out= takes no autograd (an input requires grad); call without out=, or "
            "under torch.no_grad()"
        )


def _nchw(op: str, name: str, x: torch.Tensor) -> None:
    checks.tensor(op, name, x)
    checks.floating(op, name, x)
    if x.dim() != 4:
        raise ShapeError(
            f"{op}: {name} must be 4-D [N, C, H, W] (any memory format; channels-last is the "
            f"fast path), got shape {tuple(x.shape)}"
            + ("; 5-D input is conv3d/pool3d, not supported" if x.dim() == 5 else "")
            + ("; add the batch dimension with x.unsqueeze(0)" if x.dim() == 3 else "")
        )


@dispatch("conv2d")
def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
):
    """``act(conv2d(x, weight) + bias + residual)``: the convolution with its epilogue fused.

    x [N, C, H, W], weight [O, C // groups, KH, KW], bias [O] or None; stride, padding
    (zero padding) and dilation an int or an (h, w) pair; activation None, "relu", "gelu"
    (tanh approximation) or "silu"; residual of the output's shape [N, O, OH, OW] or None.
    The residual is added before the activation (ResNet's ``relu(bn(conv(x)) + identity)``).
    Returns [N, O, OH, OW] in x's dtype. The Triton kernel (float16/bfloat16, fp32
    accumulation, groups=1, forward only) reads channels-last x and writes a channels-last
    output; a weight packed with ``kernels.conv.pack_conv_weight`` is read in place. Other
    dtypes, groups > 1 and calls that need a gradient run on torch.

    ``out``: a preallocated [N, O, OH, OW] tensor in x's dtype and device, channels-last
    contiguous (``torch.empty(...).to(memory_format=torch.channels_last)``, or an NHWC buffer
    permuted with ``.permute(0, 3, 1, 2)``), that the result is written into (the Triton kernel
    stores into it directly; other routes copy); returns ``out``. It must not overlap the
    inputs, and takes no autograd.
    """
    op = "conv2d"
    _nchw(op, "x", x)
    checks.tensor(op, "weight", weight)
    checks.floating(op, "weight", weight)
    if weight.dim() != 4:
        raise ShapeError(
            f"{op}: weight must be 4-D [O, C // groups, KH, KW], got shape {tuple(weight.shape)}"
        )
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ArgumentError(f"{op}: groups={groups!r} must be an int >= 1")
    c, o = x.shape[1], weight.shape[0]
    if c % groups or o % groups:
        raise ShapeError(
            f"{op}: groups={groups} must divide both the input channels C={c} and the output "
            f"channels O={o}"
        )
    if weight.shape[1] * groups != c:
        raise ShapeError(
            f"{op}: channel mismatch: x has C={c} channels {tuple(x.shape)} but weight "
            f"{tuple(weight.shape)} expects C // groups = {weight.shape[1]} with groups={groups} "
            f"(C = {weight.shape[1] * groups}); weight is [O, C // groups, KH, KW]"
        )
    sh, sw = _pair_arg(op, "stride", stride, 1)
    ph, pw = _pair_arg(op, "padding", padding, 0)
    dh, dw = _pair_arg(op, "dilation", dilation, 1)
    kh, kw = weight.shape[2], weight.shape[3]
    oh = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ShapeError(
            f"{op}: the (dilated) kernel {kh}x{kw} (dilation {dh}x{dw}) does not fit the padded "
            f"input {x.shape[2] + 2 * ph}x{x.shape[3] + 2 * pw}; pad more or use a smaller kernel"
        )
    if activation not in CONV_ACTIVATIONS:
        raise ArgumentError(
            f"{op}: activation={activation!r}; use None, 'relu', 'gelu' (tanh) or 'silu'"
        )
    if bias is not None:
        checks.tensor(op, "bias", bias)
        checks.shape(op, "bias", bias, (o,), "one value per output channel O")
    if residual is not None:
        checks.tensor(op, "residual", residual)
        checks.shape(op, "residual", residual, (x.shape[0], o, oh, ow), "the output's shape")
    checks.same_dtype(op, x=x, weight=weight, bias=bias, residual=residual)
    checks.same_device(op, x=x, weight=weight, bias=bias, residual=residual)
    if out is not None:
        shape = (x.shape[0], o, oh, ow)
        _check_out(op, out, shape, x, x, weight, bias, residual, channels_last=True)


@dispatch("max_pool2d")
def max_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0, out=None):
    """Max pool of x [N, C, H, W] over kernel_size windows (stride defaults to kernel_size;
    padding never wins; floor mode, dilation 1). The Triton kernel reads channels-last x and
    writes a channels-last output; forward only (a call needing a gradient runs on torch).
    ``out``: a preallocated channels-last [N, C, OH, OW] tensor to write into (as
    ``ops.conv2d``'s); returns it."""
    op = "max_pool2d"
    _nchw(op, "x", x)
    kh, kw = _pair_arg(op, "kernel_size", kernel_size, 1)
    if stride is not None:
        _pair_arg(op, "stride", stride, 1)
    ph, pw = _pair_arg(op, "padding", padding, 0)
    if 2 * ph > kh or 2 * pw > kw:
        raise ArgumentError(
            f"{op}: padding {ph}x{pw} must be at most half the kernel {kh}x{kw} (as in torch)"
        )
    sh, sw = _pair_arg(op, "stride", stride if stride is not None else kernel_size, 1)
    oh, ow = (x.shape[2] + 2 * ph - kh) // sh + 1, (x.shape[3] + 2 * pw - kw) // sw + 1
    if oh < 1 or ow < 1:
        raise ShapeError(
            f"{op}: kernel {kh}x{kw} is larger than the padded input "
            f"{x.shape[2] + 2 * ph}x{x.shape[3] + 2 * pw}"
        )
    if out is not None:
        _check_out(op, out, (*x.shape[:2], oh, ow), x, x, channels_last=True)


@dispatch("adaptive_avg_pool2d")
def adaptive_avg_pool2d(x: torch.Tensor, output_size, out=None):
    """Average pool of x [N, C, H, W] to output_size (an int or (OH, OW)) with torch's
    adaptive windows; 1 is the global average pool. The Triton kernel reads channels-last x and
    writes a channels-last output; forward only (a call needing a gradient runs on torch).
    ``out``: a preallocated channels-last [N, C, OH, OW] tensor to write into (as
    ``ops.conv2d``'s); returns it."""
    op = "adaptive_avg_pool2d"
    _nchw(op, "x", x)
    oh, ow = _pair_arg(op, "output_size", output_size, 1)
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ShapeError(f"{op}: x {tuple(x.shape)} has an empty spatial dimension")
    if out is not None:
        _check_out(op, out, (*x.shape[:2], oh, ow), x, x, channels_last=True)
