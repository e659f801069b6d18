"""NVRTC compilation on the CPU: shipped headers, signatures, options, errors."""

from __future__ import annotations

import pytest

from kernforge import cuda as kcuda
from kernforge.cuda import nvrtc
from kernforge.errors import ArgumentError, CompileError

pytestmark = pytest.mark.skipif(
    kcuda.compile_available() is not None, reason=str(kcuda.compile_available())
)

VADD = r"""
#include <kernforge/types.cuh>
extern "C" __global__ void __launch_bounds__(256)
vadd(const ELEM* __restrict__ x, const ELEM* __restrict__ y, ELEM* out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = kf::from_float<ELEM>(kf::to_float(x[i]) + kf::to_float(y[i]));
}
"""
HEADERS = sorted(p.name for p in (kcuda.INCLUDE_DIR / "kernforge").iterdir() if p.is_file())


def test_shipped_headers_exist():
    assert {"dims.cuh", "types.cuh"} <= set(HEADERS)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("hdr", HEADERS)
def test_every_shipped_header_compiles(hdr, arch):
    src = f'#include <kernforge/{hdr}>\nextern "C" __global__ void probe(int* p) {{ *p = 1; }}\n'
    k = kcuda.compile(src, "probe", arch=arch)
    assert k.cubin[:4] == b"\x7fELF" and k.arch == arch


@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_90a"])
@pytest.mark.parametrize("elem", ["float", "__half", "__nv_bfloat16"])
def test_compile_vadd(arch, elem):
    k = kcuda.compile(VADD, "vadd", arch=arch, options=(f"-DELEM={elem}",))
    assert k.name == "vadd" and k.arch == arch and k.cubin.startswith(b"\x7fELF")
    assert [p.name for p in k.params] == ["x", "y", "out", "n"]
    assert [p.ctype for p in k.params] == [elem, elem, elem, "int"]
    assert [p.is_pointer for p in k.params] == [True, True, True, False]
    assert [p.is_const for p in k.params] == [True, True, False, False]


def test_default_arch_without_gpu_is_sm_90a():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert nvrtc.default_arch() == "sm_90a"
    assert kcuda.compile(VADD, "vadd", options=("-DELEM=float",)).arch == "sm_90a"


@pytest.mark.parametrize(
    "given, want",
    [("sm_90a", "sm_90a"), ("90", "sm_90"), ("compute_80", "sm_80"), ("SM_89", "sm_89")],
)
def test_normalize_arch(given, want):
    assert nvrtc.normalize_arch(given) == want


@pytest.mark.parametrize("bad", ["hopper", "sm_", "sm90", "sm_90x"])
def test_bad_arch(bad):
    with pytest.raises(ArgumentError, match="not a CUDA arch"):
        kcuda.compile(VADD, "vadd", arch=bad, options=("-DELEM=float",))


def test_options_change_the_cubin():
    a = kcuda.compile(VADD, "vadd", arch="sm_90", options=("-DELEM=float",))
    b = kcuda.compile(VADD, "vadd", arch="sm_90", options=("-DELEM=__half",))
    assert a.key != b.key and a.cubin != b.cubin


def test_in_memory_headers():
    src = '#include "elem.cuh"\nextern "C" __global__ void k(elem_t* p) { p[0] = elem_t(1); }\n'
    k = kcuda.compile(src, "k", arch="sm_80", headers={"elem.cuh": "typedef double elem_t;\n"})
    assert k.params[0].ctype == "double"  # the alias in the header is resolved


def test_bad_source_raises_compile_error_with_log_and_lines():
    src = (
        'extern "C" __global__ void broken(float* x, int n) {\n'
        "  int i = threadIdx.x;\n"
        "  x[i] = undefined_thing + 1;\n"
        "}\n"
    )
    with pytest.raises(CompileError) as info:
        kcuda.compile(src, "broken", arch="sm_90")
    msg = str(info.value)
    assert "NVRTC log" in msg and "broken.cu(3): error" in msg
    assert 'identifier "undefined_thing" is undefined' in msg
    assert ">    3 |   x[i] = undefined_thing + 1;" in msg  # the offending line, quoted
    assert "-arch=sm_90" in msg


def test_error_in_a_header_quotes_the_header():
    src = '#include "h.cuh"\nextern "C" __global__ void k(int* p) { *p = f(); }\n'
    with pytest.raises(CompileError, match=r"h\.cuh\(2\): error") as info:
        kcuda.compile(src, "k", arch="sm_80", headers={"h.cuh": "#pragma once\nint f( {\n"})
    assert "h.cuh:" in str(info.value)


def test_unknown_kernel_name_lists_the_kernels():
    with pytest.raises(CompileError, match=r"no extern \"C\" __global__ kernel named 'vsub'.*vadd"):
        kcuda.compile(VADD, "vsub", options=("-DELEM=float",))


def test_non_string_arguments():
    with pytest.raises(ArgumentError):
        kcuda.compile(b"bytes", "k")  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="sequence of strings"):
        kcuda.compile(VADD, "vadd", options="-DELEM=float")  # type: ignore[arg-type]


def test_warnings_are_kept_in_the_log():
    src = 'extern "C" __global__ void k(int* p) { int unused = 3; unused = 4; *p = 1; }\n'
    k = kcuda.compile(src, "k", arch="sm_80")
    assert "warning" in k.log and "unused" in k.log


def test_bad_option_raises_compile_error():
    with pytest.raises(CompileError, match="unrecognized option -Wbogus"):
        kcuda.compile(VADD, "vadd", options=("-DELEM=float", "-Wbogus"))


def test_importable_without_cuda_bindings():
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; sys.modules['cuda'] = None\n"  # as if cuda-python were not installed
        "from kernforge import cuda as kcuda\n"
        "from kernforge.errors import UnsupportedError\n"
        "assert 'not' in kcuda.compile_available(), kcuda.compile_available()\n"
        "assert kcuda.available()\n"
        "try:\n"
        "    kcuda.compile('extern \"C\" __global__ void k() {}', 'k')\n"
        "except UnsupportedError as e:\n"
        "    assert 'kernforge[cuda]' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('compile worked without cuda.bindings')\n"
        "print('ok')\n"
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "PYTHONPATH": src},
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
