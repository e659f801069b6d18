"""Generated CUDA C++: compiles through NVRTC for sm_80 and sm_90 (no GPU needed), and the
launch arguments the ops build match the generated kernel signatures."""

from __future__ import annotations

import pytest
import torch

import kernforge as kf
from kernforge import cuda as kcuda
from kernforge.expr import api, elementwise, rowwise
from kernforge.expr import cuda as gen
from kernforge.expr import triton as tgen
from tests.expr.exprcases import EVERYTHING
from tests.helpers import DEVICE

pytestmark = pytest.mark.skipif(
    kcuda.compile_available() is not None, reason=f"NVRTC unusable: {kcuda.compile_available()}"
)

ARCHS = ["sm_80", "sm_90"]


def ops():
    return {
        "everything": elementwise(EVERYTHING, params={"alpha": 0.1}, name="test_everything"),
        "silu_mul": elementwise("silu(x) * y"),
        "rms_norm": rowwise(
            "x * rsqrt(rowmean(x * x) + eps) * w", params={"eps": 1e-6}, name="test_rms"
        ),  # fmt: skip
        "layer_norm": rowwise(
            map=["x", "(x - acc0) * (x - acc0)"],
            reduce="mean",
            finalize="(x - acc0) * rsqrt(acc1 + eps) * w + b",
            params={"eps": 1e-5},
            name="test_layer_norm",
        ),  # fmt: skip
        "softmax": rowwise(
            "exp(x - rowmax(x)) / rowsum(exp(x - rowmax(x)))", name="test_softmax"
        ),  # fmt: skip
        "logsumexp": rowwise("rowmax(x) + log(rowsum(exp(x - rowmax(x))))", name="test_lse"),
        "minmax": rowwise(map=["x", "x - acc0"], reduce=["min", "max"], finalize="acc1 * x"),
    }


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("which", list(ops()))
def test_generated_cuda_compiles(which, backward, arch):
    op = ops()[which]
    kernel = op.compile_cuda(arch=arch, backward=backward)
    assert kernel.name == gen.KERNEL and kernel.arch == arch and kernel.cubin
    src = op.cuda_source(backward=backward)
    assert src.count("__global__") == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_every_dtype_and_rank_compiles(dtype, rank):
    for which in ("silu_mul", "rms_norm"):
        op = ops()[which]
        for backward in (False, True):
            op.compile_cuda(arch="sm_90", backward=backward, dtype=dtype, rank=rank)


def test_compile_error_carries_the_log():
    from kernforge.errors import CompileError

    with pytest.raises(CompileError, match="undefined"):
        kcuda.compile(
            'extern "C" __global__ void kf_expr(float* o) { o[0] = nope; }', "kf_expr",
            arch="sm_80",
        )  # fmt: skip


@pytest.mark.parametrize(
    ("which", "shapes", "dtype"),
    [
        ("silu_mul", [(3, 7), (7,)], torch.bfloat16),
        ("silu_mul", [(2, 3, 4, 5), (1, 3, 1, 5)], torch.float16),
        ("silu_mul", [(64,), (64,)], torch.float32),
        ("rms_norm", [(2, 3, 40), (40,)], torch.bfloat16),
        ("logsumexp", [(5, 33)], torch.float32),
        ("layer_norm", [(4, 20), (20,), (20,)], torch.float16),
    ],
)
def test_launch_arguments_match_generated_signature(monkeypatch, which, shapes, dtype):
    """Run the op (forward and backward) through the Triton path while, at every launch, the
    CUDA kernel for the same program, layout and dtypes is compiled and the arguments the
    CUDA launcher would pass are checked against its parsed signature."""
    checked = []

    def launcher(backend):
        def run(program, layout, operands, row_operands, outputs, params, rowwise_):
            dtypes = [t.dtype for t in [*operands, *row_operands, *outputs]]
            kernel = gen.compile_program(program, layout.rank, dtypes, rowwise_, arch="sm_90")
            args, grid, block = gen.launch_config(
                layout, operands, row_operands, outputs, params, rowwise_, sms=132
            )
            kernel.check_args(*args, require_cuda=False)
            assert block % 32 == 0 and grid >= 1
            checked.append(kernel)
            tgen.launch(program, layout, operands, row_operands, outputs, params, rowwise_)

        return run

    monkeypatch.setattr(api, "_launcher", launcher)
    op = ops()[which]
    tensors = [torch.randn(s, device=DEVICE).to(dtype).requires_grad_() for s in shapes]
    with kf.backend("triton"):
        out = op(*tensors)
        torch.autograd.grad(out, tensors, torch.randn_like(out))
    assert len(checked) == 2  # forward and backward
