"""Every traced op, run through ``kf.jit`` in each mode of MODES, against NumPy on the same
random inputs (float64 reference for float results, exact NumPy for integer/bool results).

Adding a mode is a one-line change to MODES (``"gpu"`` runs under the gpu marker).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

import kernforge.frontend.np_api as knp
from kernforge import device

MODES = ["numpy", "simulate", "interpret", "gpu"]
#: Relative (norm-wise) error allowed, by result dtype.
TOL = {"float64": 1e-10, "float32": 2e-5, "float16": 3e-3, "bfloat16": 2e-2}


def _jit(fn: Callable, mode: str) -> Callable:
    import kernforge as kf

    jit = getattr(kf, "jit", None)
    if jit is None:
        from kernforge.frontend.jit import jit
    return jit(fn, mode=mode)


# -- inputs ----------------------------------------------------------------------------------
_rng = np.random.default_rng()


@dataclass
class F:
    """A random float input (normal, or positive with ``pos``); bfloat16 comes as a torch
    tensor."""

    shape: tuple
    dtype: str = "float32"
    pos: bool = False
    scale: float = 1.0

    def make(self) -> Any:
        x = _rng.standard_normal(self.shape) * self.scale
        if self.pos:
            x = np.abs(x) + 0.1
        if self.dtype == "bfloat16":
            return torch.from_numpy(x).to(torch.bfloat16)
        return np.asarray(x, dtype=self.dtype)


@dataclass
class I:  # noqa: E742
    """A random integer input in [lo, hi), optionally without zeros."""

    shape: tuple
    dtype: str = "int32"
    lo: int = -9
    hi: int = 10
    nonzero: bool = False

    def make(self) -> np.ndarray:
        x = _rng.integers(self.lo, self.hi, self.shape)
        if self.nonzero:
            x[x == 0] = 3
        return x.astype(self.dtype)


@dataclass
class B:
    shape: tuple

    def make(self) -> np.ndarray:
        return _rng.random(self.shape) < 0.5


@dataclass
class Strided:
    """A non-contiguous view of a float32 input: every other column (NumPy), reversed axes
    (NumPy, negative strides), or a transposed torch tensor."""

    shape: tuple
    kind: str = "numpy"

    def make(self) -> Any:
        if self.kind == "numpy":
            base = _rng.standard_normal((*self.shape[:-1], 2 * self.shape[-1]))
            return base.astype(np.float32)[..., ::2]
        if self.kind == "reversed":  # negative strides
            return _rng.standard_normal(self.shape).astype(np.float32)[::-1, ::-1]
        return torch.randn(self.shape[::-1]).t()


@dataclass
class Case:
    name: str
    fn: Callable
    inputs: list
    #: "f64": floats compared against the function run on float64 copies; "native": against
    #: NumPy on the same dtypes (for floor/mod, whose results jump).
    ref: str = "f64"
    tol_scale: float = 1.0
    kwargs: dict = field(default_factory=dict)
    #: Smallest norm (per sqrt(element)) errors are measured against: a sum of unit-scale
    #: terms can cancel to near zero while its rounding error stays that of the terms.
    floor: float = 1e-2


def _np(x: Any) -> Any:
    """NumPy view of an input or output (bfloat16 tensors as float32)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    return np.asarray(x)


def _leaves(x: Any) -> list:
    if isinstance(x, dict):
        return [v for k in sorted(x) for v in _leaves(x[k])]
    if isinstance(x, list | tuple):
        return [v for item in x for v in _leaves(item)]
    return [x]


def _dtype_name(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return str(x.dtype).removeprefix("torch.")
    return np.asarray(x).dtype.name


# -- the table ------------------------------------------------------------------------------
def _pow(x):
    return x**2, x**0.5, x**-1, x**-0.5, x**3, x**1


def _weak_scalars(i8, h):
    return i8 + 3, i8 * 2.5, h + 1.5, h * np.float32(2), i8 // 2, h > 0.25


def _mixed(h, f, b):
    return h + f, b * 2, b + f, b + h, b / 3


def _nan_inf(x):
    y = np.log(x)
    z = x / (x > 0)
    return np.isnan(y), np.isinf(z), np.isfinite(y + z), np.where(np.isnan(y), -1.0, y)


def _logic(a, b):
    p, q = a > 0, b < 0
    return (
        np.logical_and(p, q),
        np.logical_or(p, q),
        np.logical_xor(p, q),
        np.logical_not(p),
        p & q,
        p | q,
        p ^ q,
        ~p,
    )


def _compare(a, b):
    return a == b, a != b, a < b, a <= b, a > b, a >= b


def _casts(x, i):
    return x.astype(np.int32), x.astype(np.float16), i.astype(np.float32), (x > 0).astype(float)


def _slicing(x):
    return (
        x[1:-1, ::2],
        x[::-1],
        x[None, ..., 0],
        x[-1],
        x[2:0:-1, 1],
        x[:, :, -2:],
        x[..., ::-3],
        x[1, None, 2:, None],
    )


def _take(x, idx):
    return (
        np.take(x, [2, 0, -1], axis=1),
        x[:, idx],
        x[idx, 1:],
        x[0, :, [1, 2]],
        np.take(x, 3, axis=2),
        x[:, np.array([True, False, True, True])],
    )


def _creation(x):
    n = x.shape[-1]
    return (
        x + knp.zeros((n,)),
        x * knp.ones((1, n), np.float32),
        knp.full((2, n), 2.5),
        knp.arange(n) * x,
        knp.arange(1, 2 * n, 2),
        knp.arange(0.5, 3.0, 0.75),
        knp.eye(n),
        knp.eye(3, 5, k=-1, dtype=np.int32),
        np.zeros_like(x),
        np.ones_like(x, dtype=int),
        np.full_like(x, 7),
        np.full_like(x, 2.5, dtype=np.float32),
    )


_W = _rng.standard_normal((5, 3)).astype(np.float32)  # a captured constant


def _static_python(x, n=3, scale=0.5):
    for i in range(n):  # unrolled at trace time
        x = x * scale + i
    return {"y": x @ _W, "z": x[:, :3] * np.array([1.0, 2.0, 3.0], np.float32)}


def _layer_norm(x, w, b):
    mu = np.mean(x, axis=-1, keepdims=True)
    var = np.mean((x - mu) ** 2, axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * w + b


def _rmsnorm_gate(x, w, g):
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * w
    return y * (g / (1 + np.exp(-g)))


def _softmax(x):
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def _mlp(x, w1, w2):
    h = np.maximum(x @ w1, 0)
    return knp.gelu(h, approximate="tanh") @ w2


def _attention_scores(q, k):
    s = np.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return knp.softmax(s, axis=-1)


def _passthrough(x, y):
    return x, np.float32(2.0) * np.ones(3, np.float32), [y.T, x]


CASES = [
    # elementwise arithmetic and broadcasting
    Case("add_bcast", lambda a, b: a + b, [F((3, 5)), F((5,))]),
    Case("sub_f16_outer", lambda a, b: a - b, [F((4, 1), "float16"), F((1, 7), "float16")]),
    Case("mul_bf16", lambda a, b: a * b, [F((2, 3, 5), "bfloat16"), F((3, 1), "bfloat16")]),
    Case("div_f32", lambda a, b: a / b, [F((6, 5)), F((6, 5), pos=True)]),
    Case("div_int_is_f64", lambda a, b: a / b, [I((7,)), I((7,), nonzero=True)]),
    Case(
        "floordiv_mod_int",
        lambda a, b: (a // b, a % b, -a, abs(a)),
        [I((3, 7)), I((7,), nonzero=True)],
    ),
    Case(
        "floordiv_mod_f32",
        lambda a, b: (a // b, a % b),
        [F((5, 4), scale=4), F((5, 4), pos=True)],
        ref="native",
    ),
    Case("pow_special", _pow, [F((9,), pos=True)]),
    Case(
        "pow_general", lambda a, b: (a**b, np.power(a, 1.7), 2.0**b), [F((6,), pos=True), F((6,))]
    ),
    Case("neg_abs", lambda a: (-a, abs(a), np.abs(a), np.negative(a), +a), [F((4, 3), "float16")]),
    Case("weak_scalars", _weak_scalars, [I((5,), "int8"), F((5,), "float16")]),
    Case("mixed_dtypes", _mixed, [F((5,), "float16"), F((5,)), F((5,), "bfloat16")]),
    Case("square_reciprocal", lambda a: (np.square(a), np.reciprocal(a)), [F((8,), pos=True)]),
    # unary math
    Case("exp_exp2", lambda a: (np.exp(a), np.exp2(a)), [F((3, 7))]),
    Case("log_log2_log10", lambda a: (np.log(a), np.log2(a), np.log10(a)), [F((11,), pos=True)]),
    Case("log1p_expm1", lambda a: (np.log1p(a), np.expm1(a)), [F((13,), pos=True, scale=0.01)]),
    Case("sqrt_rsqrt", lambda a: (np.sqrt(a), knp.rsqrt(a)), [F((2, 9), pos=True)]),
    Case("trig_f16", lambda a: (np.sin(a), np.cos(a), np.tanh(a)), [F((5, 6), "float16")]),
    Case("sigmoid_erf", lambda a: (knp.sigmoid(a), knp.erf(a)), [F((3, 5), scale=3)]),
    Case(
        "sigmoid_erf_bf16",
        lambda a: (knp.sigmoid(a), knp.erf(a), np.exp(a)),
        [F((4, 5), "bfloat16")],
    ),
    Case("floor_ceil_sign", lambda a: (np.floor(a), np.ceil(a), np.sign(a)), [F((9,), scale=3)]),
    Case(
        "exp_of_int", lambda i: (np.exp(i), np.sqrt(np.abs(i)), np.floor(i)), [I((6,), lo=-3, hi=4)]
    ),
    Case(
        "maximum_minimum",
        lambda a, b: (np.maximum(a, b), np.minimum(a, 0.2)),
        [F((3, 1, 4)), F((5, 1))],
    ),
    Case("where", lambda a: (np.where(a > 0, a, 0.1 * a), np.where(a < 0, 1, 2.5)), [F((4, 6))]),
    Case(
        "clip",
        lambda a, i: (np.clip(a, -0.5, 0.5), a.clip(0), np.clip(i, 0.5, 3.5)),
        [F((7,)), I((7,))],
    ),
    Case("comparisons", _compare, [F((3, 4)), F((4,))]),
    Case("comparisons_int", _compare, [I((3, 4)), I((3, 1))]),
    Case("logical", _logic, [F((6,)), F((2, 6))]),
    Case("casts", _casts, [F((4, 5), scale=5), I((4, 5))]),
    Case("nan_inf", _nan_inf, [F((5, 4))]),
    # reductions
    Case(
        "sum_axes",
        lambda x: (np.sum(x), x.sum(-1, keepdims=True), np.sum(x, axis=(0, 2))),
        [F((3, 4, 5))],
        floor=1.0,
    ),
    Case(
        "sum_int_bool",
        lambda i, b: (np.sum(i), i.sum(0), np.sum(b, axis=1)),
        [I((4, 6), "int8"), B((4, 6))],
    ),
    Case(
        "mean",
        lambda x, i: (np.mean(x, axis=1), x.mean(), np.mean(i, axis=0)),
        [F((3, 33), "float16"), I((5, 2))],
    ),
    Case(
        "max_min",
        lambda x: (np.max(x, axis=0), x.min(), np.amax(x, axis=(1, 2), keepdims=True)),
        [F((3, 4, 5))],
    ),
    Case(
        "prod",
        lambda x: (np.prod(x, axis=-1), x.prod(axis=0, keepdims=True)),
        [F((4, 5), pos=True)],
    ),
    Case(
        "argmax_argmin",
        lambda x: (
            np.argmax(x, axis=1),
            x.argmin(0),
            np.argmax(x),
            np.argmin(x, axis=-1, keepdims=True),
        ),
        [F((4, 7))],
    ),
    Case(
        "var_std",
        lambda x: (
            np.var(x, axis=-1),
            np.std(x, axis=0, ddof=1),
            x.var(),
            np.std(x, axis=(0, 1), keepdims=True),
        ),
        [F((5, 6))],
    ),
    Case("any_all", lambda x: (np.any(x > 1, axis=1), np.all(x > -2), (x > 0).any(0)), [F((4, 6))]),
    Case(
        "reduce_bf16",
        lambda x: (np.sum(x, axis=-1), np.mean(x, axis=0), np.max(x)),
        [F((6, 9), "bfloat16")],
    ),
    Case("ufunc_reduce", lambda x: (np.add.reduce(x), np.maximum.reduce(x, axis=1)), [F((3, 4))]),
    # shapes
    Case(
        "reshape_transpose",
        lambda x: (
            x.reshape(-1, 4),
            np.reshape(x, (2, 30)),
            x.T,
            np.transpose(x, (1, 0, 2)),
            np.swapaxes(x, 0, 2),
            x.transpose(2, 0, 1),
            np.moveaxis(x, 0, -1),
        ),
        [F((3, 4, 5))],
    ),
    Case(
        "expand_squeeze_broadcast",
        lambda x: (
            np.expand_dims(x, 1),
            np.expand_dims(x, (0, -1)),
            np.squeeze(x[:, None]),
            np.squeeze(x[None], 0),
            np.broadcast_to(x, (2, 3, 5)),
        ),
        [F((3, 5))],
    ),
    Case(
        "concat_stack",
        lambda a, b: (
            np.concatenate([a, b], axis=1),
            np.concatenate([a, a]),
            np.concatenate([a, b], axis=None),
            np.stack([a, a], -1),
        ),
        [F((3, 2)), F((3, 4), "float16")],
    ),
    Case("split", lambda x: (np.split(x, 3, axis=1), np.split(x, [1, 4], axis=0)), [F((5, 6))]),
    Case("slicing", _slicing, [F((4, 5, 6))]),
    Case("take", _take, [F((3, 4, 5)), I((2,), "int64", lo=-3, hi=3)]),
    Case("flip", lambda x: (np.flip(x), np.flip(x, axis=1)), [F((3, 4))]),
    # creation
    Case("creation", _creation, [F((2, 4))]),
    # linear algebra
    Case("matmul_2d", lambda a, b: a @ b, [F((5, 7)), F((7, 3))]),
    Case(
        "matmul_batched",
        lambda a, b, c: (a @ b, np.matmul(b.transpose(0, 2, 1)[:, None], c)),
        [F((2, 3, 4, 5)), F((3, 5, 6)), F((2, 5, 3))],
    ),
    Case("matmul_1d", lambda v, m: (v @ m, m.T @ v, v @ v, np.dot(m.T, v)), [F((5,)), F((5, 3))]),
    Case("matmul_int", lambda a, b: a @ b, [I((3, 4)), I((4, 2))]),
    Case("matmul_f16", lambda a, b: a @ b, [F((4, 16), "float16"), F((16, 3), "float16")]),
    Case("matmul_bf16", lambda a, b: a @ b, [F((4, 16), "bfloat16"), F((16, 3), "bfloat16")]),
    Case(
        "einsum",
        lambda a, b, v: (
            np.einsum("bij,bjk->bik", a, b),
            np.einsum("bij->bji", a),
            np.einsum("bij->", a),
            np.einsum("i,j->ij", v, v),
            np.einsum("...ij,...jk", a, b),
            np.einsum("bij,j->bi", a, v),
            np.outer(v, v),
            np.inner(a, b.transpose(0, 2, 1)[0]),
        ),
        [F((2, 3, 4)), F((2, 4, 5)), F((4,))],
    ),
    # composites written in NumPy
    Case("softmax", _softmax, [F((4, 33), scale=3)]),
    Case("softmax_bf16", _softmax, [F((3, 17), "bfloat16", scale=3)]),
    Case(
        "log_softmax_logsumexp",
        lambda x: (knp.log_softmax(x), knp.logsumexp(x, axis=0), knp.logsumexp(x)),
        [F((5, 9))],
    ),
    Case("layer_norm", _layer_norm, [F((4, 20)), F((20,)), F((20,))]),
    Case(
        "rmsnorm_gate_f16",
        _rmsnorm_gate,
        [F((3, 24), "float16"), F((24,), "float16"), F((3, 24), "float16")],
        tol_scale=2,
    ),
    Case(
        "gelu_silu",
        lambda x: (knp.gelu(x, approximate="tanh"), knp.gelu(x), knp.silu(x)),
        [F((6, 5), scale=2)],
    ),
    Case("mlp", _mlp, [F((3, 8)), F((8, 16)), F((16, 5))]),
    Case("attention_scores", _attention_scores, [F((1, 2, 3, 8)), F((1, 2, 5, 8))]),
    # the trace's plumbing: static args, captured constants, outputs that are inputs
    Case("static_python", _static_python, [F((4, 5))], kwargs={"n": 2, "scale": 0.25}),
    Case("passthrough", _passthrough, [F((3,)), F((2, 3))]),
    Case(
        "non_contiguous",
        lambda a, b: (np.exp(a) + 1, b * 2, a.sum(0)),
        [Strided((4, 5)), Strided((3, 5), "torch")],
    ),
    Case("negative_strides", lambda a: (a * 2, a[0]), [Strided((3, 4), "reversed")]),
]


def _reference(case: Case, args: list) -> tuple[list, list]:
    """(NumPy on the same dtypes, NumPy on float64 copies of float inputs) as leaf lists."""
    nargs = [_np(a) for a in args]
    wide = [a.astype(np.float64) if a.dtype.kind == "f" else a for a in nargs]
    with np.errstate(all="ignore"):  # cases make inf and NaN on purpose
        native = _leaves(case.fn(*nargs, **case.kwargs))
        f64 = _leaves(case.fn(*wide, **case.kwargs))
    return native, f64


def _expected_dtype(case: Case, args: list, native: Any) -> str | None:
    """The dtype the traced result must have; None where bfloat16 inputs make NumPy's own
    dtype (float32 data) not the answer."""
    if any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
        return None
    return np.asarray(native).dtype.name


def _compare(out: Any, native: Any, f64: Any, case: Case, mode: str, what: str) -> None:
    got = _np(out)
    native = np.asarray(native)
    assert got.shape == native.shape, f"{what}: shape {got.shape} != {native.shape}"
    if native.dtype.kind in "biu" and got.dtype.kind in "biu":
        np.testing.assert_array_equal(got, native, err_msg=what)
        return
    ref = np.asarray(native if case.ref == "native" else f64, dtype=np.float64)
    got = got.astype(np.float64)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan), f"{what}: NaNs differ"
    inf = np.isinf(ref)
    assert np.array_equal(got[inf], ref[inf]), f"{what}: infinities differ"
    ok = ~(nan | inf)
    g, r = got[ok], ref[ok]
    denom = max(np.linalg.norm(r), case.floor * max(r.size, 1) ** 0.5)
    err = np.linalg.norm(g - r) / denom
    dt = _dtype_name(out)
    tol = TOL.get(dt, 0.0) * case.tol_scale
    if mode == "numpy" and case.ref == "f64":
        tol = max(tol, TOL["float16"] if dt in ("float16", "bfloat16") else tol)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g} ({dt})"


def _params():
    out = []
    for mode in MODES:
        marks = [pytest.mark.gpu] if mode == "gpu" else []
        if mode == "interpret" and not device.INTERPRET:
            marks = [pytest.mark.skip(reason="interpret mode needs KERNFORGE_INTERPRET=1 here")]
        out += [pytest.param(c, mode, id=f"{c.name}-{mode}", marks=marks) for c in CASES]
    return out


@pytest.mark.parametrize(("case", "mode"), _params())
def test_op(case: Case, mode: str) -> None:
    args = [spec.make() for spec in case.inputs]
    native, f64 = _reference(case, args)
    with np.errstate(all="ignore"):
        out = _leaves(_jit(case.fn, mode)(*args, **case.kwargs))
    assert len(out) == len(native), f"{case.name}: {len(out)} outputs, expected {len(native)}"
    for i, (o, n, w) in enumerate(zip(out, native, f64, strict=True)):
        what = f"{case.name}[{i}] ({mode})"
        want = _expected_dtype(case, args, n)
        if want is not None and mode != "numpy":
            assert _dtype_name(o) == want, f"{what}: dtype {_dtype_name(o)}, NumPy gives {want}"
        _compare(o, n, w, case, mode, what)
