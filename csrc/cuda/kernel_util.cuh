// Helpers shared by the CUDA kernel files (nvcc, or the host emulation build): float32 loads and round-to-nearest
// stores of the element types, torch's stream handle, and the device check of an argument.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/tensor_view.h"

// The one launch syntax of csrc/cuda: SIMCORE_LAUNCH(grid, block, smem, stream, kernel)(args...)
// is kernel<<<grid, block, smem, stream>>>(args...) under nvcc; the emulation build
// (csrc/cuda/emulation/cuda_emulation.h, force-included) runs it on the host instead.
#ifndef SIMCORE_LAUNCH
#define SIMCORE_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

namespace simcore {
namespace cuda {

__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ float ld(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void st(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// torch's current stream, passed from Python as an integer.
inline cudaStream_t as_stream(uint64_t stream) {
  return reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(stream));
}

// f(static_cast<T*>(nullptr)) with T the device element type of a float32, float16 or bfloat16
// tensor; `what` names the argument in the error for any other dtype.
template <class F>
void dispatch_float_dtype(DType t, const char* what, const F& f) {
  switch (t) {
    case DType::Float32: f(static_cast<float*>(nullptr)); break;
    case DType::Float16: f(static_cast<__half*>(nullptr)); break;
    case DType::BFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: throw TypeError(detail::concat("unsupported ", what, " dtype ", dtype_name(t)));
  }
}

inline void expect_cuda(const TensorView& t) {
  SIMCORE_CHECK(t.device == Device::CUDA, t.name, " must be a CUDA tensor");
}

}  // namespace cuda
}  // namespace simcore
