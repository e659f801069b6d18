"""The catalog's kernel families. Importing this package registers every implementation."""

from . import (  # noqa: F401
    attention,
    conv,
    cross_entropy,
    decode,
    fp8_gemm,
    fused_linear_ce,
    glu,
    grouped_gemm,
    layer_norm,
    linear,
    matmul,
    moe,
    rms_norm,
    rope,
    rope_append,
    softmax,
)
