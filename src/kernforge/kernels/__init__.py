"""The catalog's kernel families. Importing this package registers every implementation."""

from . import (  # noqa: F401
    attention,
    decode,
    fp8_gemm,
    glu,
    grouped_gemm,
    layer_norm,
    linear,
    matmul,
    moe,
    rms_norm,
    rope,
    softmax,
)
