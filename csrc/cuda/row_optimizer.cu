// CUDA sparse row optimizers: the mirror of csrc/cpu/row_optimizer.cpp. One warp per
// updated row, lanes striding over D (coalesced), float32 arithmetic.
//
// The row ids live in device memory, so their checks happen in the kernel: an id outside
// [0, C), or one not greater than the id before it, is skipped (never out of bounds, and a
// repeated id of a sorted list updates its row once). The Python layer passes sorted unique
// ids (simcore/margin/row_optimizer.py asserts it on the device). grad_scale and found_inf
// are read by every warp from device memory: no host synchronisation.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/kernel_util.cuh"
#include "cuda/row_optimizer.h"
#include "cuda/runtime.h"

namespace simcore {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / 32;

// The row this warp updates, or -1 (none, a bad id, or the step is skipped); *scale: grad's divisor.
__device__ __forceinline__ int64_t warp_row(const int64_t* ids, int64_t n, int64_t num_rows,
                                            const float* grad_scale, const float* found_inf, int64_t* r,
                                            float* scale) {
  *r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (*r >= n || (found_inf && *found_inf > 0.0f)) return -1;
  *scale = grad_scale ? *grad_scale : 1.0f;
  const int64_t row = ids[*r];
  if (row < 0 || row >= num_rows || (*r > 0 && ids[*r - 1] >= row)) return -1;
  return row;
}

template <class T>
__global__ void row_sgd_kernel(T* w, int64_t lw, int64_t num_rows, const int64_t* ids, int64_t n, const float* g,
                               int64_t lg, float* buf, int64_t lb, int64_t d, const float* grad_scale,
                               const float* found_inf, float lr, float momentum, float wd) {
  int64_t r = 0;
  float scale = 1.0f;
  const int64_t row = warp_row(ids, n, num_rows, grad_scale, found_inf, &r, &scale);
  if (row < 0) return;
  T* wr = w + row * lw;
  const float* gr = g + r * lg;
  float* br = buf ? buf + row * lb : nullptr;
  for (int64_t k = threadIdx.x % 32; k < d; k += 32) {
    const float wk = ld(wr + k);
    float step = gr[k] / scale + wd * wk;
    if (br) {
      step = momentum * br[k] + step;
      br[k] = step;
    }
    st(wr + k, wk - lr * step);
  }
}

template <class T>
__global__ void row_adamw_kernel(T* w, int64_t lw, int64_t num_rows, const int64_t* ids, int64_t n, const float* g,
                                 int64_t lg, float* m, int64_t lm, float* v, int64_t lv, int64_t* steps, int64_t d,
                                 const float* grad_scale, const float* found_inf, float lr, double beta1,
                                 double beta2, float eps, float decay) {
  int64_t r = 0;
  float scale = 1.0f;
  const int64_t row = warp_row(ids, n, num_rows, grad_scale, found_inf, &r, &scale);
  if (row < 0) return;
  const int64_t t = steps[row] + 1;
  __syncwarp();  // every lane has read the old count
  if (threadIdx.x % 32 == 0) steps[row] = t;
  const float bc1 = static_cast<float>(1.0 - pow(beta1, static_cast<double>(t)));
  const float bc2 = static_cast<float>(1.0 - pow(beta2, static_cast<double>(t)));
  const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2);
  const float c1 = 1.0f - b1, c2 = 1.0f - b2;
  T* wr = w + row * lw;
  const float* gr = g + r * lg;
  float* mr = m + row * lm;
  float* vr = v + row * lv;
  for (int64_t k = threadIdx.x % 32; k < d; k += 32) {
    const float gk = gr[k] / scale;
    const float mk = b1 * mr[k] + c1 * gk;
    const float vk = b2 * vr[k] + c2 * gk * gk;
    mr[k] = mk;
    vr[k] = vk;
    st(wr + k, ld(wr + k) * decay - lr * (mk / bc1) / (sqrtf(vk / bc2) + eps));
  }
}

int row_blocks(int64_t n) {
  const int64_t blocks = (n + kRowsPerBlock - 1) / kRowsPerBlock;
  SIMCORE_CHECK(blocks < (int64_t{1} << 31), "too many rows for one launch: ", n);
  return static_cast<int>(blocks);
}

const float* scalar_ptr(const TensorView* t) { return t ? t->ptr<float>() : nullptr; }

}  // namespace

void row_sgd(const TensorView& weight, const TensorView& rows, const TensorView& grad,
             const TensorView* momentum_buffer, const TensorView* grad_scale, const TensorView* found_inf,
             const RowSgdParams& p, uint64_t stream) {
  ro_check::sgd(weight, rows, grad, momentum_buffer, grad_scale, found_inf, p);
  expect_cuda(weight);
  const int64_t n = rows.size(0), d = weight.size(1);
  if (n == 0 || d == 0) return;
  dispatch_float_dtype(weight.dtype, "weight", [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    SIMCORE_LAUNCH(row_blocks(n), kThreads, 0, as_stream(stream), row_sgd_kernel<T>)(
        weight.ptr<T>(), weight.stride(0), weight.size(0), rows.ptr<int64_t>(), n, grad.ptr<float>(),
        grad.stride(0), momentum_buffer ? momentum_buffer->ptr<float>() : nullptr,
        momentum_buffer ? momentum_buffer->stride(0) : 0, d, scalar_ptr(grad_scale), scalar_ptr(found_inf),
        static_cast<float>(p.lr), static_cast<float>(p.momentum), static_cast<float>(p.weight_decay));
  });
  check(cudaGetLastError(), "simcore row_sgd launch");
}

void row_adamw(const TensorView& weight, const TensorView& rows, const TensorView& grad, const TensorView& exp_avg,
               const TensorView& exp_avg_sq, const TensorView& row_step, const TensorView* grad_scale,
               const TensorView* found_inf, const RowAdamwParams& p, uint64_t stream) {
  ro_check::adamw(weight, rows, grad, exp_avg, exp_avg_sq, row_step, grad_scale, found_inf, p);
  expect_cuda(weight);
  const int64_t n = rows.size(0), d = weight.size(1);
  if (n == 0) return;
  dispatch_float_dtype(weight.dtype, "weight", [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    SIMCORE_LAUNCH(row_blocks(n), kThreads, 0, as_stream(stream), row_adamw_kernel<T>)(
        weight.ptr<T>(), weight.stride(0), weight.size(0), rows.ptr<int64_t>(), n, grad.ptr<float>(),
        grad.stride(0), exp_avg.ptr<float>(), exp_avg.stride(0), exp_avg_sq.ptr<float>(), exp_avg_sq.stride(0),
        row_step.ptr<int64_t>(), d, scalar_ptr(grad_scale), scalar_ptr(found_inf), static_cast<float>(p.lr),
        p.beta1, p.beta2, static_cast<float>(p.eps), static_cast<float>(1.0 - p.lr * p.weight_decay));
  });
  check(cudaGetLastError(), "simcore row_adamw launch");
}

}  // namespace cuda
}  // namespace simcore
