"""Typed dimensions: the C++ header, the Python spec, and /*@kf @kf*/ blocks (no GPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kernforge import cuda as kcuda
from kernforge.cuda.dims import Dim, Tensor, expand, generate, header, parse
from kernforge.errors import ArgumentError, CompileError, DTypeError, ShapeError

pytestmark = pytest.mark.skipif(
    kcuda.compile_available() is not None, reason=str(kcuda.compile_available())
)
ROOT = Path(__file__).resolve().parents[2]
I, J, K = Dim("I"), Dim("J", 24), Dim("K")

# Compile-time checks of the layout arithmetic: NVRTC evaluates the static_asserts.
LAYOUT_CHECKS = r"""
#include "spec.cuh"
static_assert(A_t::L::stride<0>() == 32 && A_t::L::stride<1>() == 1, "packed strides");
static_assert(A_size == 16 * 32 && sizeof(A_buf) == 16 * 32 * sizeof(float), "buffer size");
static_assert(P_size == 31 * 33 + 31 + 1, "padded size");
static_assert(P_t::L::stride<0>() == 33, "explicit stride");
static_assert(X_t::L::extent<0>() == kf::dyn && X_t::L::extent<1>() == 24, "J's default");
static_assert(X_t::L::stride<0>() == 24, "packed stride from a static tail");
static_assert(At_t::L::extent<0>() == 4 && At_t::L::extent<1>() == 8, "tile extents");
static_assert(At_t::L::stride<0>() == 32, "a tile keeps the parent's strides");
static_assert(A_t::has<I> && !A_t::has<J>, "has");
extern "C" __global__ void probe(float* a, __nv_bfloat16* x, int n) {
  A_t A(a);
  X_t X(x, {n, 24});
  __shared__ P_buf P;
  const I i(threadIdx.x);
  const K k(threadIdx.y);
  P[K(k.v)][i] = A[i][k] + A(k, i);
  auto t = A.tile<4, 8>(I(1), K(2));
  if (X.contains(i, J(3))) X[i][J(3)] = __float2bfloat16(t[I(0)][K(1)] + P(i, K(0)));
  BODY
}
"""


def spec_header() -> str:
    A = Tensor((I(16), K(32)), "float32", name="A")
    P = Tensor((K(32), I(32)), torch.float32, strides=(33, 1), name="P")
    X = Tensor((I, J), "bf16", name="X")
    return header(A, P, X, A.tile(K(8), I(4), name="At"))


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_generated_header_compiles_and_layouts_hold(arch):
    k = kcuda.compile(
        LAYOUT_CHECKS, "probe", arch=arch, options=("-DBODY=",),
        headers={"spec.cuh": spec_header()},
    )  # fmt: skip
    assert [p.name for p in k.params] == ["a", "x", "n"]


@pytest.mark.parametrize(
    "body, match",
    [
        ("A[k][i] = 0.f;", "wrong index type for this axis"),  # the dimension mix-up
        ("A[i][i] = 0.f;", "wrong index type for this axis"),
        ("A[3][k] = 0.f;", "wrong index type for this axis"),  # a plain int
        ("A(i, i) = 0.f;", "a dimension is indexed twice"),
        ("A(i, J(0)) = 0.f;", "not one of this view's"),
        ("A(i) = 0.f;", "exactly one index per dimension"),
        ("K bad = i;", "no suitable"),  # no conversion between dimensions
        ("A[i + k];", "no operator"),  # no arithmetic across dimensions
        ("A[I(threadIdx.x) + 1][k + 1] = 1.f; A[i][k * 2] = 2.f; int m = k;", "no suitable"),
        ("A_t bad(a, {n, n});", ""),  # static extents given at run time: allowed (type wins)
        ("X_t bad(x);", "needs static extents"),
        ("float e = A.extent<J>();", "not a dimension of this view"),
        ("auto t2 = A.tile<4, 8>(K(0), I(0));", ""),
    ],
)
def test_dimension_mistakes_fail_to_compile(body, match):
    opts = (f"-DBODY={body}",)
    hdrs = {"spec.cuh": spec_header()}
    if match == "":
        if "tile" in body:  # tile coordinates are typed in axis order: swapped fails
            with pytest.raises(CompileError):
                kcuda.compile(LAYOUT_CHECKS, "probe", arch="sm_90", options=opts, headers=hdrs)
        else:
            kcuda.compile(LAYOUT_CHECKS, "probe", arch="sm_90", options=opts, headers=hdrs)
        return
    with pytest.raises(CompileError, match=match):
        kcuda.compile(LAYOUT_CHECKS, "probe", arch="sm_90", options=opts, headers=hdrs)


def test_correct_arithmetic_compiles():
    body = "A[I(threadIdx.x) + 1][k + 1] = 1.f; A[i - 1][k * 2] = 2.f; A[i][k % 4 + K(1)] = 3.f;"
    kcuda.compile(
        LAYOUT_CHECKS, "probe", arch="sm_90", options=(f"-DBODY={body}",),
        headers={"spec.cuh": spec_header()},
    )  # fmt: skip


def test_generate_text():
    text = generate(Tensor((I(2), K(3)), "fp16", name="H"))
    assert "KF_DIM(I);" in text and "KF_DIM(K);" in text and "#include <cuda_fp16.h>" in text
    assert "using H_t = kf::View<__half, kf::Axis<I, 2>, kf::Axis<K, 3>>;" in text
    assert "constexpr kf::offset_t H_size = 6;" in text
    assert "#pragma once" not in text and "#pragma once" in header(Dim("Z"))


def test_spec_errors():
    with pytest.raises(ArgumentError, match="not a C\\+\\+ identifier"):
        Dim("2x")
    with pytest.raises(ArgumentError, match="reserved"):
        Dim("int")
    with pytest.raises(ShapeError, match="appears twice"):
        Tensor((I(2), I(3)), name="Sq")
    with pytest.raises(ShapeError, match="2 strides for 1 axes"):
        Tensor((I(2),), strides=(1, 1))
    with pytest.raises(DTypeError, match="unknown dtype"):
        Tensor((I(2),), "float8")
    A = Tensor((I(4), K(8)), name="A")
    with pytest.raises(ArgumentError, match="one size per dimension"):
        A.tile(I(2))
    with pytest.raises(ArgumentError, match="given twice"):
        A.tile(I(2), I(2))
    with pytest.raises(ArgumentError, match="declared twice"):
        generate(A, Tensor((K(1),), name="A"))


def test_tensor_check():
    A = Tensor((I(4), K), "float32", name="A")
    A.check(torch.empty(4, 7))
    with pytest.raises(DTypeError):
        A.check(torch.empty(4, 7, dtype=torch.float16))
    with pytest.raises(ShapeError, match="axis I is 5"):
        A.check(torch.empty(5, 7))
    with pytest.raises(ShapeError, match="stride"):
        A.check(torch.empty(7, 4).t())
    Tensor((I(4), K), strides=(None, None), name="V").check(torch.empty(7, 4).t())


BLOCK = """// a kernel with a spec block
/*@kf
dim I = 16, K   # K: run time
tensor A[I, K:32] float32
tensor B[K, I:?] bf16 strides(?, 1)   // a comment
tile At = A[K:8, I:4]
@kf*/
extern "C" __global__ void g(float* a, __nv_bfloat16* b, int n) {
  A_t A(a);
  B_t B(b, {32, n}, {n, 1});
  At_t t = A.tile<4, 8>(I(0), K(1));
  BODY
}
"""


def test_block_expands_and_compiles():
    text, generated = expand(BLOCK, filename="g.cu")
    assert "/*@kf" not in text and '#line 7 "g.cu"' in text
    assert list(generated) == ["g.cu@kf0"]
    assert "using At_t = A_t::tiled<4, 8>;" in generated["g.cu@kf0"]
    k = kcuda.compile(BLOCK, "g", arch="sm_80", options=("-DBODY=",))
    assert [p.ctype for p in k.params] == ["float", "__nv_bfloat16", "int"]


def test_error_after_a_block_quotes_the_original_line():
    src = BLOCK.replace("  BODY\n", "  A[K(0)][I(0)] = 1.f;\n")
    with pytest.raises(CompileError) as info:
        kcuda.compile(src, "g", arch="sm_90", filename="g.cu")
    msg = str(info.value)
    assert "g.cu(12): error" in msg
    assert ">   12 |   A[K(0)][I(0)] = 1.f;" in msg


@pytest.mark.parametrize(
    "stmt, match",
    [
        ("tensor A[I, Q] float", r"dimension 'Q' is not declared"),
        ("tensor A[I:0] float", "must be a positive integer"),
        ("tensor A[I] float strides(x)", "stride 'x'"),
        ("tensor A[I] nope", "unknown dtype"),
        ("tile T = Z[I:4]", "undeclared tensor 'Z'"),
        ("frobnicate", "not a dim, tensor or tile"),
        ("dim I", "dim I declared twice"),
    ],
)
def test_block_errors_name_the_line(stmt, match):
    src = f"/*@kf\ndim I = 4\n{stmt}\n@kf*/\n"
    with pytest.raises(CompileError, match=match) as info:
        kcuda.compile(src, "g", filename="s.cu")
    assert "s.cu(3): error in @kf block" in str(info.value)


def test_parse_returns_declarations():
    decls = parse("dim I = 4, K\ntensor A[I, K] f16")
    assert [type(d).__name__ for d in decls] == ["Dim", "Dim", "Tensor"]
    assert decls[2].shape == (4, None) and decls[2].dtype == torch.float16


def load_example():
    path = ROOT / "examples" / "cuda_typed_tiled.py"
    spec = importlib.util.spec_from_file_location("cuda_typed_tiled", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_example_compiles(arch, dtype):
    k = load_example().compile_matmul(dtype, arch)
    ctype = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
    assert k.params[0].ctype == ctype[dtype] and k.params[2].ctype == "float"
