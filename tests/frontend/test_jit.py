"""kf.jit itself: fusion decisions, caches, modes, argument kinds, and the code generator's
harder paths (wide rows that loop, column reductions, gathers, matmul epilogues) under the
interpreter against NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kernforge as kf
from kernforge.bench import jit_cases
from kernforge.codegen import triton as cg
from kernforge.errors import ArgumentError, DeviceError
from kernforge.frontend.jit import default_mode

MODE = default_mode()  # gpu on a GPU machine, else interpret
DEV = "cuda" if MODE == "gpu" else "cpu"


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


@pytest.mark.parametrize(
    ("fn", "nargs"),
    [
        (jit_cases.softmax_np, 1),
        (jit_cases.rms_norm_np, 2),
        (jit_cases.layer_norm_np, 3),
        (jit_cases.gelu_tanh_np, 1),
        (jit_cases.rmsnorm_gate_np, 3),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_benchmark_functions_are_one_kernel_and_match_numpy(fn, nargs, dtype):
    shape = (7, 300)
    args = [torch.randn(shape), 1 + 0.1 * torch.randn(shape[-1]), torch.randn(shape)][:nargs]
    if fn is jit_cases.layer_norm_np:
        args[2] = 0.1 * torch.randn(shape[-1])
    args = [a.to(DEV, dtype) for a in args]
    f = kf.jit(fn, mode=MODE)
    assert f.lower(*args).plan.kernel_count() == 1
    out = f(*args)
    assert out.dtype == dtype and out.device.type == DEV
    want = kf.jit(fn, mode="numpy")(*[a.double() for a in args])
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert rel(out.float().cpu(), want.cpu()) < tol


def test_trace_is_cached_per_signature_and_alignment():
    calls = []

    def f(x, scale):
        calls.append(1)
        return x * scale

    g = kf.jit(f, mode=MODE)
    x = torch.randn(4, 8, device=DEV)
    g(x, 2.0)
    g(x, 2.0)
    assert len(calls) == 1
    g(x, 3.0)  # a static argument is part of the key
    g(x.T, 2.0)  # so are strides
    g(torch.randn(5, 8, device=DEV), 2.0)  # and shapes
    g(x.reshape(-1)[1:].reshape(1, 31), 2.0)  # and 16-byte alignment
    assert len(calls) == 5
    out = g(x.reshape(-1)[1:].reshape(1, 31), 2.0)
    assert torch.equal(out, x.reshape(-1)[1:].reshape(1, 31) * 2.0)


def test_generated_source_is_on_disk_and_deterministic(tmp_path, monkeypatch):
    from kernforge import config

    monkeypatch.setattr(
        config, "settings", config.Settings.from_env({"KERNFORGE_CACHE_DIR": str(tmp_path)})
    )
    f = kf.jit(jit_cases.softmax_np, mode=MODE)
    x = torch.randn(3, 17, device=DEV)
    src = f.source(x)
    assert src == kf.jit(jit_cases.softmax_np, mode=MODE).source(x)
    f(x)
    files = list((tmp_path / "jit").glob("k*.py"))
    assert len(files) == 1 and files[0].read_text() == src


def test_numpy_in_numpy_out_and_dlpack():
    f = kf.jit(lambda a, b: np.maximum(a, b) - 1, mode=MODE)
    a = np.random.default_rng().standard_normal((5, 3)).astype(np.float32)
    b = np.random.default_rng().standard_normal(3).astype(np.float32)
    out = f(a, b)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.maximum(a, b) - 1)

    class Foreign:  # an array from another library, seen only through DLPack
        def __init__(self, t):
            self.t = t

        def __dlpack__(self, **kw):
            return self.t.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self.t.__dlpack_device__()

    out2 = f(Foreign(torch.from_numpy(a).to(DEV)), b)
    assert isinstance(out2, torch.Tensor)
    np.testing.assert_allclose(out2.cpu().numpy(), np.maximum(a, b) - 1)


def test_modes_are_checked():
    with pytest.raises(ArgumentError, match="unknown mode"):
        kf.jit(lambda x: x, mode="cuda")
    other = "interpret" if MODE == "gpu" else "gpu"  # the mode this process cannot run
    with pytest.raises(DeviceError, match="KERNFORGE_INTERPRET|use mode='interpret'"):
        kf.jit(lambda x: x + 1, mode=other)(np.ones(3, np.float32))


@pytest.mark.parametrize("single_max", [16, 16384])
def test_rows_single_tile_and_looped_agree_with_numpy(monkeypatch, single_max):
    """Rows wider than one tile loop over tiles for every reduction kind."""
    orig = cg.generate
    monkeypatch.setattr(
        "kernforge.codegen.generate", lambda *a, **k: orig(*a, **{**k, "single_max": single_max})
    )

    def f(x, i):
        s = x - np.mean(x, axis=-1, keepdims=True)
        norm = s / np.std(x, axis=-1, keepdims=True)
        ints = (np.sum(i, axis=-1), np.argmin(i, -1))
        return (
            norm,
            np.argmax(x, axis=-1),
            np.max(x, -1),
            np.min(x, -1),
            np.prod(1 + x / 100, -1),
            *ints,
        )

    rng = np.random.default_rng()
    x = rng.standard_normal((3, 100)).astype(np.float32)
    i = rng.integers(-50, 50, (3, 100)).astype(np.int32)
    got = kf.jit(f, mode=MODE)(x, i)
    want = f(x.astype(np.float64), i)
    for g, w in zip(got, want, strict=True):
        if np.asarray(w).dtype.kind in "iu":
            np.testing.assert_array_equal(g, w)
        else:
            assert rel(g, w) < 1e-5


def test_column_and_multi_axis_reductions_and_gathers():
    def f(x, idx):
        col = x - np.max(x, axis=0, keepdims=True)  # reduce over the strided axis
        both = np.sum(x.reshape(2, 3, 20), axis=(0, 2))
        picked = np.take(x, idx, axis=1)
        return col, both, picked, np.concatenate([x[:, ::-2], x[::2, :10].T.reshape(-1, 10)], 0)

    rng = np.random.default_rng()
    x = rng.standard_normal((6, 20)).astype(np.float32)
    idx = rng.integers(-20, 20, (4,))
    got = kf.jit(f, mode=MODE)(x, idx)
    want = f(x, idx)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert rel(g, w) < 1e-6


def test_broadcast_scalar_under_a_concat_branch():
    """A size-1 operand read at a constant offset inside a concat branch (rotary tables at
    decode do this): the scalar load takes no block mask."""

    def f(a, p):
        r = (a * p.reshape(1, 1, 1)).reshape(1, 1, 4)
        return np.concatenate([r, -r], axis=2)

    rng = np.random.default_rng(0)
    a, p = rng.standard_normal((1, 4, 1), np.float32), rng.standard_normal(1, np.float32)
    out = np.asarray(kf.jit(f, mode="interpret")(a, p))
    np.testing.assert_allclose(out, f(a, p), rtol=1e-6)


def test_matmul_epilogue_and_batched_broadcast():
    def f(a, b, bias, res):
        return np.tanh(a @ b.swapaxes(-1, -2) + bias) + res

    rng = np.random.default_rng()
    a = rng.standard_normal((2, 1, 17, 40)).astype(np.float32)
    b = rng.standard_normal((3, 33, 40)).astype(np.float32)
    bias = rng.standard_normal(33).astype(np.float32)
    res = rng.standard_normal((2, 3, 17, 33)).astype(np.float32)
    jf = kf.jit(f, mode=MODE)
    assert [g.kind for g in jf.lower(a, b, bias, res).plan.groups] == ["matmul"]
    assert rel(jf(a, b, bias, res), f(*(t.astype(np.float64) for t in (a, b, bias, res)))) < 1e-5


@pytest.mark.gpu
def test_gpu_mode_rows_wider_than_a_tile():
    x = torch.randn(3, 70000, device="cuda")
    out = kf.jit(jit_cases.softmax_np, mode="gpu")(x)
    torch.testing.assert_close(out, torch.softmax(x, -1))
