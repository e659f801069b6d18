"""Errors while tracing say what went wrong and name the user's source line."""

from __future__ import annotations

import numpy as np
import pytest

import kernforge.frontend.np_api as knp
from kernforge.errors import ArgumentError, ShapeError, TraceError, UnsupportedError
from kernforge.frontend import trace, values

X = np.random.default_rng().standard_normal((3, 4)).astype(np.float32)


def _here(fn) -> str:
    """``test_errors.py:LINE`` of the line in ``fn`` marked ``# <- here``."""
    import inspect

    lines, start = inspect.getsourcelines(fn)
    n = next(i for i, line in enumerate(lines) if "# <- here" in line)
    return f"test_errors.py:{start + n}"


def test_data_dependent_branch():
    def f(x):
        if x.sum() > 0:  # <- here
            return x
        return -x

    with pytest.raises(TraceError) as e:
        trace(f, [X])
    msg = str(e.value)
    assert _here(f) in msg and "if x.sum() > 0:" in msg
    assert "data-dependent" in msg and "not known at trace time" in msg
    assert isinstance(e.value, TypeError)  # TraceError is a TypeError too


@pytest.mark.parametrize(
    "body",
    [
        lambda x: float(x.max()),  # <- here
        lambda x: int(x[0, 0]),  # <- here
        lambda x: np.asarray(x),  # <- here
        lambda x: range(x.shape[0])[x.argmax()],  # <- here
        lambda x: x.max().item(),  # <- here
        lambda x: x > 0 and x,  # <- here
    ],
    ids=["float", "int", "asarray", "index", "item", "and"],
)
def test_values_unknown_at_trace_time(body):
    with pytest.raises(TraceError, match=r"test_errors\.py:\d+: .*lambda x: .*not known at trace"):
        trace(body, [X])


def test_unsupported_numpy_function():
    def f(x):
        return np.sort(x, axis=-1)  # <- here

    with pytest.raises(UnsupportedError) as e:
        trace(f, [X])
    assert "np.sort" in str(e.value) and _here(f) in str(e.value)
    assert "return np.sort(x, axis=-1)" in str(e.value)

    def g(x):
        return np.fft.fft(x)  # <- here

    with pytest.raises(UnsupportedError, match=r"np\.fft\.fft") as e:
        trace(g, [X])
    assert _here(g) in str(e.value)


def test_unsupported_ufunc_and_ufunc_method():
    def f(x):
        return np.tan(x)  # <- here

    with pytest.raises(UnsupportedError, match=r"np\.tan is not supported") as e:
        trace(f, [X])
    assert _here(f) in str(e.value)
    with pytest.raises(UnsupportedError, match=r"np\.add\.accumulate"):
        trace(lambda x: np.add.accumulate(x), [X])
    with pytest.raises(UnsupportedError, match="out="):
        trace(lambda x: np.exp(x, out=x), [X])


def test_shape_mismatch():
    def f(x, y):
        z = x * 2
        return z + y  # <- here

    with pytest.raises(ShapeError) as e:
        trace(f, [X, np.ones(5, np.float32)])
    msg = str(e.value)
    assert _here(f) in msg and "return z + y" in msg and "do not broadcast" in msg


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda x: x @ x, "contraction sizes differ"),
        (lambda x: x.reshape(5, -1), "cannot reshape"),
        (lambda x: np.sum(x, axis=2), "out of range"),
        (lambda x: x[0, 0, 0], "too many indices"),
        (lambda x: x[5], "out of bounds"),
        (lambda x: np.concatenate([x, x[0]]), "different numbers of dimensions"),
        (lambda x: np.split(x, 3, axis=1), "do not divide"),
        (lambda x: np.squeeze(x, 0), "not of size 1"),
        (lambda x: np.einsum("ij,jk->ik", x, x), "label 'j' has sizes"),
    ],
    ids=["matmul", "reshape", "axis", "index", "bounds", "concat", "split", "squeeze", "einsum"],
)
def test_shape_errors_name_the_line(fn, match):
    with pytest.raises(ShapeError, match=match) as e:
        trace(fn, [X])
    assert "test_errors.py:" in str(e.value) and "lambda x:" in str(e.value)


@pytest.mark.parametrize(
    ("fn", "err", "match"),
    [
        (lambda x: x.__setitem__(0, 1.0), UnsupportedError, "item assignment"),
        (lambda x: (x > 0).astype(np.int32) & 3, UnsupportedError, "bool arrays only"),
        (lambda x: x.astype(np.int32) ** -1, ArgumentError, "negative integer powers"),
        (lambda x: np.where(x > 0), UnsupportedError, "data-dependent shape"),
        (lambda x: x[x > 0], UnsupportedError, "bool mask"),
        (lambda x: np.einsum("ii->i", x[:, :3]), UnsupportedError, "repeats a label"),
        (lambda x: x[:, [0, 1]][[0, 1]] + x[[0], [1]], UnsupportedError, "more than one"),
        (lambda x: x.sum().item() and 1.0, TraceError, "not known"),
        (lambda x: 3.0, UnsupportedError, "returned a float"),
        (lambda x: x + 1j, UnsupportedError, "complex"),
    ],
    ids=["setitem", "int-bitwise", "int-neg-pow", "where1", "mask", "diagonal", "two-arrays",
         "item", "scalar-return", "complex"],
)  # fmt: skip
def test_unsupported_constructs(fn, err, match):
    with pytest.raises(err, match=match):
        trace(fn, [X])


def test_int8_overflow_of_python_scalar():
    with pytest.raises(Exception, match="does not fit int8"):
        trace(lambda i: i + 300, [np.arange(3, dtype=np.int8)])


def test_captured_constant_limit(monkeypatch):
    monkeypatch.setattr(values, "MAX_CONSTANT", 8)
    big = np.arange(9, dtype=np.float32)
    with pytest.raises(UnsupportedError, match="too large"):
        trace(lambda x: x[0, 0] + big, [X])


def test_creation_outside_trace_is_numpy():
    # kernforge.np works on plain arrays too, and its creation functions return NumPy arrays
    assert isinstance(knp.zeros(3), np.ndarray) and knp.arange(4).dtype == np.int64
    np.testing.assert_allclose(knp.sigmoid(np.array([0.0])), [0.5])
    with pytest.raises(AttributeError, match="np.sort is not supported"):
        knp.sort  # noqa: B018


def test_errors_pass_through_jit():
    try:
        from kernforge.frontend.jit import jit
    except ImportError:  # pragma: no cover - the lead's jit not there yet
        pytest.skip("kernforge.frontend.jit not available")

    def f(x):
        if x.max() > 1:  # <- here
            return x
        return x * 2

    with pytest.raises(TraceError, match=_here(f)):
        jit(f, mode="simulate")(X)
