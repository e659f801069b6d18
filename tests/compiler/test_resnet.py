"""ResNet-style nets compiled end to end vs eager PyTorch (numpy and interpret modes on the CPU;
torchvision ResNet-18/50 on the GPU)."""

from __future__ import annotations

import pytest
import torch

import kernforge
from kernforge.compiler import compile_model

from .nets import modes, on, pearson, tiny_resnet, top5_agree


@pytest.fixture(scope="module")
def model():
    return tiny_resnet()


@pytest.mark.parametrize("mode", modes("numpy", "interpret", "gpu"))
def test_resnet_fp32_matches_eager(model, mode):
    x = torch.randn(3, 3, 8, 8)
    prog = compile_model(model, (x,))
    with torch.no_grad():
        ref = model(x)
    out = prog.run(*on(mode, x), mode=mode).cpu()
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)  # BN folding is exact
    assert pearson(out, ref) > 0.999 and top5_agree(out, ref)


@pytest.mark.parametrize("mode", modes("numpy", "interpret", "gpu"))
def test_resnet_bf16_matches_eager(model, mode):
    x = torch.randn(2, 3, 8, 8)
    prog = compile_model(model, (x,), dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
    out = prog.run(*on(mode, x), mode=mode).cpu()
    assert out.dtype == torch.bfloat16
    assert pearson(out, ref) > 0.999 and top5_agree(out, ref)


def test_resnet_program_shape(model):
    """BN folded, conv epilogues fused, NHWC throughout: one entry transpose, no BN, and every
    conv carries its bias (+ residual) + ReLU."""
    prog = compile_model(model, (torch.randn(1, 3, 8, 8),))
    ops = [n.op for n in prog.graph.nodes]
    assert "batch_norm" not in ops and "maximum" not in ops
    assert ops.count("transpose") == 1
    convs = [n for n in prog.graph.nodes if n.op == "conv2d"]
    assert len(convs) == 6 and all(n.attrs["layout"] == "nhwc" for n in convs)
    assert sum(bool(n.attrs["has_residual"]) for n in convs) == 2
    text = prog.describe()
    assert "conv2d+bias+residual+relu x2" in text and "ops fused" in text
    assert prog.fused_fraction() > 0.5
    assert prog.peak_activation_bytes() > 0


def test_resnet_save_load_round_trip(model, tmp_path):
    x = torch.randn(2, 3, 8, 8)
    prog = compile_model(model, (x,), dtype=torch.bfloat16)
    prog.save(tmp_path / "net.kf")
    back = kernforge.load(tmp_path / "net.kf")
    torch.testing.assert_close(back.run(x, mode="numpy"), prog.run(x, mode="numpy"))


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_resnet_gpu(arch):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(tv.models, arch)(weights=None)
    from .nets import randomize_bn

    model = randomize_bn(model).eval().cuda()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    prog = compile_model(model, (x,), dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    out = prog(x).float()
    again = prog(x).float()  # CUDA graph replay
    assert pearson(out, ref) > 0.999 and top5_agree(out, ref)
    torch.testing.assert_close(again, out)
