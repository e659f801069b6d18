"""Kernel signatures and launch-argument checks, all without a GPU."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from kernforge import cuda as kcuda
from kernforge.cuda.signature import Param, parse_kernels, parse_param
from kernforge.errors import ArgumentError, CompileError

SRC = r"""
typedef __nv_bfloat16 bf16;
using idx_t = long long;
#define SCALE_T float
extern "C" {
// a comment with __global__ void fake(int x) inside
__global__ void __launch_bounds__(128, 2) many(
    const float* __restrict__ x, bf16* y, const __half* const z, idx_t n, unsigned m,
    SCALE_T alpha, double beta, __half h, uint4* raw, const float4* v, bool flag,
    int8_t small, size_t big, void* anything) {}
}
extern "C" __global__ void none() {}
extern "C" __global__ void voidlist(void) {}
__global__ void mangled(int x) {}
/* extern "C" __global__ void commented(int x) {} */
"""


def test_parse_kernels():
    ks = parse_kernels(SRC)
    assert set(ks) == {"many", "none", "voidlist"}  # not the C++ one, not the comments
    assert ks["none"] == [] and ks["voidlist"] == []
    got = {p.name: (p.ctype, p.is_pointer, p.is_const) for p in ks["many"]}
    assert got == {
        "x": ("float", True, True),
        "y": ("__nv_bfloat16", True, False),
        "z": ("__half", True, True),
        "n": ("long long", False, False),
        "m": ("unsigned int", False, False),
        "alpha": ("float", False, False),
        "beta": ("double", False, False),
        "h": ("__half", False, False),
        "raw": ("uint4", True, False),
        "v": ("float4", True, True),
        "flag": ("bool", False, False),
        "small": ("signed char", False, False),
        "big": ("unsigned long long", False, False),
        "anything": ("void", True, False),
    }


def test_defines_resolve_types():
    src = 'extern "C" __global__ void k(T* p, int n) {}'
    assert parse_kernels(src, ["T=__half"])["k"][0].ctype == "__half"


@pytest.mark.parametrize(
    "text, want",
    [
        ("float* const p", Param("p", "float", True, False)),  # const pointer, mutable data
        ("const float* p", Param("p", "float", True, True)),
        ("float const* p", Param("p", "float", True, True)),
        ("float p[]", Param("p", "float", True, False)),
        ("float** pp", Param("pp", "float *", True, False)),
        ("unsigned long long n", Param("n", "unsigned long long", False, False)),
    ],
)
def test_parse_param(text, want):
    assert parse_param(text) == want


@pytest.mark.parametrize("text", ["float*", "int& r"])
def test_parse_param_rejects(text):
    with pytest.raises(CompileError):
        parse_param(text)


VADD = r"""
extern "C" __global__ void vadd(const float* x, float* out, int n, float alpha, __half h,
                                __nv_bfloat16 b, unsigned char c, long long big, double d,
                                const float4* v, bool flag) {}
"""


@pytest.fixture(scope="module")
def params():
    return parse_kernels(VADD)["vadd"]


def good_args():
    x = torch.randn(8)
    return [x, torch.empty_like(x), 8, 0.5, 1.5, -2.0, 255, 2**40, 1e300, torch.randn(16), True]


def test_check_args_packs_values(params):
    args = good_args()
    packed = kcuda.check_args("vadd", params, args, require_cuda=False)
    assert isinstance(packed[0], ctypes.c_void_p) and packed[0].value == args[0].data_ptr()
    assert isinstance(packed[2], ctypes.c_int32) and packed[2].value == 8
    assert isinstance(packed[3], ctypes.c_float) and packed[3].value == 0.5
    assert packed[4].value == int(np.float16(1.5).view(np.uint16))  # __half bits
    assert packed[5].value == 0xC000  # bf16 bits of -2.0
    assert packed[6].value == 255 and packed[7].value == 2**40 and packed[8].value == 1e300
    assert isinstance(packed[10], ctypes.c_bool) and packed[10].value is True


def test_numpy_scalars_and_null_pointer(params):
    args = good_args()
    args[1] = None
    args[2] = np.int64(7)
    args[3] = np.float32(0.25)
    packed = kcuda.check_args("vadd", params, args, require_cuda=False)
    assert packed[1].value in (None, 0) and packed[2].value == 7 and packed[3].value == 0.25


@pytest.mark.parametrize(
    "index, value, match",
    [
        (
            0,
            torch.randn(8, dtype=torch.float64),
            r"parameter 'x'.*float64.*float\* takes torch.float32",
        ),
        (0, torch.randn(8).half(), r"parameter 'x'.*float16"),
        (0, 3, r"parameter 'x'.*pointer parameter takes a torch tensor"),
        (2, 2**31, r"parameter 'n'.*out of range for int"),
        (2, -(2**31) - 1, r"parameter 'n'.*out of range"),
        (2, 1.0, r"parameter 'n'.*integer parameter"),
        (2, torch.tensor(3), r"parameter 'n'.*use \.item\(\)"),
        (3, "0.5", r"parameter 'alpha'.*takes a number"),
        (6, 256, r"parameter 'c'.*out of range for unsigned char"),
        (6, -1, r"parameter 'c'.*out of range"),
        (9, torch.randn(17)[1:], r"parameter 'v'.*not 16-byte aligned"),
    ],
)
def test_bad_arguments_name_the_parameter(params, index, value, match):
    args = good_args()
    args[index] = value
    with pytest.raises(ArgumentError, match=match):
        kcuda.check_args("vadd", params, args, require_cuda=False)


def test_wrong_count(params):
    with pytest.raises(ArgumentError, match=r"takes 11 arguments \(const float\* x,.*got 3"):
        kcuda.check_args("vadd", params, good_args()[:3], require_cuda=False)


def test_cpu_tensor_rejected_when_cuda_required(params):
    with pytest.raises(ArgumentError, match=r"parameter 'x'.*need tensors on a CUDA device"):
        kcuda.check_args("vadd", params, good_args())


def test_kernel_check_args_method():
    k = kcuda.compile('extern "C" __global__ void k(const float* x, int n) {}', "k", arch="sm_80")
    x = torch.randn(3)
    assert len(k.check_args(x, 3, require_cuda=False)) == 2
    with pytest.raises(ArgumentError, match=r"kernel 'k' parameter 'x'"):
        k.check_args(x.double(), 3, require_cuda=False)


@pytest.mark.parametrize(
    "grid, block, smem, match",
    [
        (0, 32, 0, "every size must be >= 1"),
        ((1, 2, 3, 4), 32, 0, "1 to 3 ints"),
        (1.5, 32, 0, "1 to 3 ints"),
        (1, 2048, 0, "at most 1024"),
        (1, (32, 32, 2), 0, "at most 1024"),
        ((1, 70000), 32, 0, "too large"),
        (1, 32, -1, "shared_mem"),
    ],
)
def test_check_config(grid, block, smem, match):
    with pytest.raises(ArgumentError, match=match):
        kcuda.check_config("k", grid, block, smem)


def test_check_config_normalizes_and_limits_shared_memory():
    assert kcuda.check_config("k", 3, (8, 4), 0) == ((3, 1, 1), (8, 4, 1), 0)
    with pytest.raises(ArgumentError, match="exceeds this GPU's 1000 bytes"):
        kcuda.check_config("k", 1, 1, 2000, max_shared=1000)


def test_available_says_why():
    reason = kcuda.available()
    if not torch.cuda.is_available():
        assert reason and "GPU" in reason
    assert kcuda.cdiv(10, 4) == 3 and kcuda.cdiv(8, 4) == 2


@pytest.mark.parametrize(
    "ctype, values",
    [
        ("int", [0, -5, 2**31 - 1, -(2**31), 2**31, np.int32(4), True, 1.5, "x"]),
        ("unsigned int", [0, 2**32 - 1, 2**32, -1]),
        ("float", [1, 0.1, np.float64(2.5), np.float16(1.5), "1", None]),
        ("double", [1e300, 3]),
        ("__half", [0.5, 70000.0]),
    ],
)
def test_fast_packers_agree_with_check_args(ctype, values):
    from kernforge.cuda.launch import make_packer, pack_arg

    p = Param("v", ctype, False, False)
    fast = make_packer(p, "k")
    for v in values:
        try:
            want = pack_arg(p, v, "k")
        except ArgumentError:
            with pytest.raises(ArgumentError, match="parameter 'v'"):
                fast(v)
            continue
        got = fast(v)
        assert type(got) is type(want) and got.value == want.value, v


def test_launch_without_gpu_rejects_cpu_tensors_before_any_driver_call():
    k = kcuda.compile('extern "C" __global__ void k(float* x, int n) {}', "k", arch="sm_80")
    with pytest.raises(ArgumentError, match=r"parameter 'x'.*CUDA device"):
        k.launch(torch.randn(4), 4, grid=1, block=32)
    with pytest.raises(ArgumentError, match=r"takes 2 arguments"):
        k.launch(torch.randn(4), grid=1, block=32)
    with pytest.raises(ArgumentError, match=r"block=0"):
        k.launch(torch.randn(4), 4, grid=1, block=0)
