// kernforge element-type helpers for NVRTC kernels: one spelling for float, __half and
// __nv_bfloat16 so that a kernel can be written once for every dtype (pick the type with
// -DELEM=__half, a generated header, or a template).
//
//   float v = kf::to_float(x[i]);          // float / __half / __nv_bfloat16 / double
//   y[i] = kf::from_float<ELEM>(v);        // round to nearest even
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace kf {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(double x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_float<double>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Ceiling division for sizes and grid arithmetic.
template <class T> __host__ __device__ constexpr T cdiv(T a, T b) { return (a + b - 1) / b; }

}  // namespace kf
