"""Dispatch: backend selection, context and process-wide settings, fallback warning, and
KERNFORGE_DISABLE_FALLBACK."""

from __future__ import annotations

import warnings

import pytest
import torch

import kernforge as kf
from kernforge import config, dispatch, ops
from tests.helpers import DEVICE, randn


@pytest.fixture
def toy_op():
    """A throwaway op with a 'triton' impl that refuses negative ``n`` and a 'torch' impl."""
    name = "toy_op_for_tests"
    calls: list[str] = []

    @dispatch.dispatch(name)
    def toy(x, n: int = 1):
        """Toy op."""
        if not isinstance(x, torch.Tensor):
            raise TypeError("x must be a tensor")

    dispatch.register_impl(name, "triton", supports=lambda x, n: None if n >= 0 else "n < 0")(
        lambda x, n: calls.append("triton") or x + n
    )
    dispatch.register_impl(name, "torch")(lambda x, n: calls.append("torch") or x + n)
    dispatch._warned.clear()
    yield toy, calls
    del dispatch._IMPLS[name]
    del dispatch._OPS[name]


def test_auto_prefers_triton(toy_op):
    toy, calls = toy_op
    assert torch.equal(toy(torch.zeros(2), 3), torch.full((2,), 3.0))
    assert calls == ["triton"]


def test_named_only_impl_is_skipped_by_auto(toy_op):
    toy, calls = toy_op
    dispatch.register_impl("toy_op_for_tests", "cuda", auto=False)(
        lambda x, n: calls.append("cuda") or x + n
    )
    dispatch.PREFERENCE, before = ("cuda", "triton", "torch"), dispatch.PREFERENCE
    try:
        toy(torch.zeros(1))  # auto: cuda is named-only, so triton
        with kf.backend("cuda"):
            toy(torch.zeros(1))
    finally:
        dispatch.PREFERENCE = before
    assert calls == ["triton", "cuda"]


def test_context_and_set_backend(toy_op):
    toy, calls = toy_op
    kf.set_backend("torch")
    assert kf.get_backend() == "torch"
    toy(torch.zeros(1))
    with kf.backend("triton"):
        assert kf.get_backend() == "triton"
        toy(torch.zeros(1))
        with kf.backend("torch"):
            toy(torch.zeros(1))
    assert kf.get_backend() == "torch"
    assert calls == ["torch", "triton", "torch"]


def test_context_restored_after_error(toy_op):
    toy, _ = toy_op
    with pytest.raises(RuntimeError), kf.backend("torch"):
        raise RuntimeError("boom")
    assert kf.get_backend() == config.settings.backend


def test_unknown_backend_is_an_error():
    with pytest.raises(kf.ConfigError, match="unknown backend"):
        kf.set_backend("cuda-magic")
    with pytest.raises(kf.ConfigError), kf.backend("nope"):
        pass


def test_fallback_warns_once_and_uses_torch(toy_op):
    toy, calls = toy_op
    with kf.backend("triton"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        toy(torch.zeros(1), -1)
        toy(torch.zeros(1), -1)
    fallbacks = [w for w in seen if issubclass(w.category, kf.FallbackWarning)]
    assert len(fallbacks) == 1
    message = str(fallbacks[0].message)
    assert "toy_op_for_tests" in message and "triton" in message and "n < 0" in message
    assert fallbacks[0].filename == __file__  # points at the caller, not at kernforge
    assert calls == ["torch", "torch"]


def test_disable_fallback_raises(toy_op, monkeypatch):
    toy, calls = toy_op
    monkeypatch.setenv("KERNFORGE_DISABLE_FALLBACK", "1")
    config.reload()
    try:
        with pytest.raises(kf.UnsupportedError) as info:
            toy(torch.zeros(1), -5)
    finally:
        monkeypatch.delenv("KERNFORGE_DISABLE_FALLBACK")
        config.reload()
    text = str(info.value)
    assert "toy_op_for_tests" in text and "'auto'" in text and "n < 0" in text
    assert calls == []


def test_checks_run_before_any_backend(toy_op):
    toy, calls = toy_op
    with pytest.raises(TypeError):
        toy("not a tensor")
    assert calls == []


def test_argument_binding(toy_op):
    toy, _ = toy_op
    assert toy(torch.zeros(1), n=2).item() == 2
    with pytest.raises(TypeError, match="unexpected keyword"):
        toy(torch.zeros(1), m=2)
    with pytest.raises(TypeError, match="missing required"):
        toy()
    with pytest.raises(TypeError, match="multiple values"):
        toy(torch.zeros(1), 1, n=2)
    with pytest.raises(TypeError, match="takes 2 arguments"):
        toy(torch.zeros(1), 1, 2)


def test_real_op_falls_back_for_float64():
    x = randn((3, 8)).double()
    with kf.backend("triton"), pytest.warns(kf.FallbackWarning, match="float64"):
        dispatch._warned.clear()
        y = ops.rms_norm(x, None)
    assert y.dtype == torch.float64


def test_real_op_disable_fallback_names_op_backend_reason(monkeypatch):
    monkeypatch.setenv("KERNFORGE_DISABLE_FALLBACK", "1")
    config.reload()
    try:
        with kf.backend("triton"), pytest.raises(kf.UnsupportedError) as info:
            ops.rms_norm(randn((3, 8)).double(), None)
    finally:
        monkeypatch.delenv("KERNFORGE_DISABLE_FALLBACK")
        config.reload()
    assert "rms_norm" in str(info.value) and "triton" in str(info.value)
    assert "float64" in str(info.value)


@pytest.mark.gpu
def test_cpu_tensor_with_gpu_backend_falls_back_or_raises(monkeypatch):
    x = torch.randn(3, 8)  # on the CPU while Triton compiles for the GPU
    dispatch._warned.clear()
    with kf.backend("triton"), pytest.warns(kf.FallbackWarning, match="cpu"):
        ops.rms_norm(x, None)
    monkeypatch.setenv("KERNFORGE_DISABLE_FALLBACK", "1")
    config.reload()
    try:
        with kf.backend("triton"), pytest.raises(kf.UnsupportedError, match="cpu"):
            ops.rms_norm(x, None)
    finally:
        monkeypatch.delenv("KERNFORGE_DISABLE_FALLBACK")
        config.reload()


def test_registered_lists_every_family_on_both_backends():
    reg = kf.registered()
    for op in ["rms_norm", "layer_norm", "softmax", "log_softmax", "silu_and_mul", "swiglu",
               "geglu", "rope"]:  # fmt: skip
        assert reg[op] == ["torch", "triton"], op


def test_device_under_test():
    assert DEVICE.type in ("cpu", "cuda")
