// CUDA epilogues of the margin-softmax loss: the mirror of csrc/cpu/margin_softmax.cpp.
//
// Straightforward by design: one thread block per row, a block-wide reduction
// (warp shuffles + shared memory), float32 accumulation whatever the row dtype
// (float32, float16 or bfloat16; the cosine blocks are float32). The GEMMs
// between these kernels are cuBLAS calls made by torch in
// simcore/margin/functional.py, on the same stream.
//
// Index ranges that the CPU kernels check on the host live in device memory
// here; the kernels never read out of bounds: an out-of-range index writes a
// NaN row, an unknown label leaves its target column unfound, so the loss is
// NaN (the Python layer has already rejected such input with a ValueError).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <type_traits>
#include <cstdint>

#include "cuda/kernel_util.cuh"
#include "cuda/margin_softmax.h"
#include "cuda/runtime.h"

namespace simcore {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Reductions over the whole block; every thread gets the result. `identity` fills
// the lanes beyond the number of warps (0 for sums, −inf for max).
template <class V, class Op>
__device__ V block_reduce(V v, Op op, V* shared, V identity) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // shared may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = lane < warps ? shared[lane] : identity;
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

struct MaxOp {
  // NaN wins, so it propagates like the CPU kernel's sum
  __device__ float operator()(float a, float b) const { return (a != a || a > b) ? a : b; }
};
struct SumOp {
  template <class V>
  __device__ V operator()(V a, V b) const { return a + b; }
};

template <class S, class T>
__global__ void normalize_rows_kernel(const S* src, int64_t ls, int64_t src_rows, const int64_t* index, T* out,
                                      int64_t lo, float* norms, int64_t d, double eps) {
  __shared__ double shared[32];
  const int64_t r = blockIdx.x;
  const int64_t row = index ? index[r] : r;
  T* o = out + r * lo;
  if (row < 0 || row >= src_rows) {  // never read out of bounds
    for (int64_t k = threadIdx.x; k < d; k += blockDim.x) st(o + k, NAN);
    if (threadIdx.x == 0) norms[r] = NAN;
    return;
  }
  const S* x = src + row * ls;
  // In double, as on the CPU: squares of |x| > ~1.8e19 overflow float, and
  // 1/norm is subnormal in float for norms above ~8.5e37.
  double acc = 0.0;
  for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
    const double v = ld(x + k);
    acc += v * v;
  }
  const double norm = sqrt(block_reduce(acc, SumOp{}, shared, 0.0));
  const double inv = 1.0 / fmax(norm, eps);
  for (int64_t k = threadIdx.x; k < d; k += blockDim.x) st(o + k, static_cast<float>(ld(x + k) * inv));
  if (threadIdx.x == 0) norms[r] = static_cast<float>(norm);
}

__global__ void targets_kernel(const int64_t* labels, int64_t b, const int64_t* sampled, int64_t s,
                               int64_t num_classes, int64_t* out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= b) return;
  const int64_t y = labels[i];
  int64_t lo = 0, hi = s;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (sampled[mid] < y) lo = mid + 1;
    else hi = mid;
  }
  // unknown label: a column no block holds, so the target logit stays NaN
  out[i] = (y >= 0 && y < num_classes && lo < s && sampled[lo] == y) ? lo : -1;
}

// The row's target ψ / slope at cosine c (per-row margins when rm is given).
__device__ inline void row_target(double c, const MarginParams& p, const float* rm, int64_t i, double* psi,
                                  double* slope) {
  if (rm) target_psi(c, p, rm[3 * i], rm[3 * i + 1], rm[3 * i + 2], psi, slope);
  else target_psi(c, p, p.m1, p.m2, p.m3, psi, slope);
}

// The row's non-target transform; with CurricularFace its threshold is the row's ψ.
__device__ inline NegativeLogit row_negatives(const MarginParams& p, const float* rm, const float* tcos, int64_t i) {
  float hard = INFINITY;
  if (p.curricular) {
    double psi, slope;
    row_target(tcos[i], p, rm, i, &psi, &slope);
    hard = static_cast<float>(psi);
  }
  return NegativeLogit{static_cast<float>(p.scale), static_cast<float>(p.filter_threshold), hard,
                       static_cast<float>(p.curricular_t)};
}

// p with the dynamic scalars read from device memory (dyn: float64 (cam_power, curricular_t),
// NaN where p's own value applies; null: none). Out-of-range values (a bad value that
// validate="never" let through) poison the block: scale NaN makes every logit, the
// loss and the gradient NaN, and nothing else depends on them.
__device__ __forceinline__ void load_dynamic(MarginParams& p, const double* dyn) {
  if (dyn == nullptr) return;
  if (!apply_dynamic(p, __ldg(dyn), __ldg(dyn + 1))) p.scale = NAN;
}

__global__ void lse_block_kernel(const float* cos, int64_t lda, int64_t n, const int64_t* target_col, int64_t col0,
                                 MarginParams p, const double* dyn, const float* rm, float* run_max, float* run_sum,
                                 float* target_cos, float* target_logit) {
  __shared__ float shared[32];
  __shared__ float tz_shared;
  load_dynamic(p, dyn);  // every thread: two cached loads of one 16-byte line
  const int64_t i = blockIdx.x;
  const float* a = cos + i * lda;
  const bool has = target_col[i] >= col0 && target_col[i] - col0 < n;  // no overflow for any value
  const int64_t t = has ? target_col[i] - col0 : -1;
  if (threadIdx.x == 0) {
    float tz = -INFINITY;
    if (has) {
      // CurricularFace reads the target cosine given before pass 1, so ψ is the same everywhere
      const double c = p.curricular ? static_cast<double>(target_cos[i]) : static_cast<double>(a[t]);
      double psi, slope;
      row_target(c, p, rm, i, &psi, &slope);
      tz = static_cast<float>(p.scale * psi);
      if (!p.curricular) target_cos[i] = static_cast<float>(c);
      target_logit[i] = tz;
    }
    tz_shared = tz;
  }
  __syncthreads();
  const float tz = tz_shared;
  const NegativeLogit f = row_negatives(p, rm, target_cos, i);
  float m = has ? tz : -INFINITY;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float z = j == t ? tz : f(a[j]);
    m = MaxOp{}(m, z);
  }
  const float bm = block_reduce(m, MaxOp{}, shared, -INFINITY);
  float acc = 0.0f;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float z = j == t ? tz : f(a[j]);
    acc += expf(z - bm);
  }
  const float bsum = block_reduce(acc, SumOp{}, shared, 0.0f);
  if (threadIdx.x == 0) {
    const float om = run_max[i];
    const float nm = bm != bm ? bm : fmaxf(om, bm);
    const float os = run_sum[i] == 0.0f ? 0.0f : run_sum[i] * expf(om - nm);
    run_sum[i] = os + bsum * expf(bm - nm);
    run_max[i] = nm;
  }
}

__global__ void grad_block_kernel(float* cos, int64_t lda, int64_t n, const int64_t* target_col, int64_t col0,
                                  MarginParams p, const double* dyn, const float* rm, const float* lse,
                                  const float* row_weight, const float* target_cos) {
  load_dynamic(p, dyn);
  const int64_t i = blockIdx.x;
  float* a = cos + i * lda;
  const int64_t t = (target_col[i] >= col0 && target_col[i] - col0 < n) ? target_col[i] - col0 : -1;
  const float l = lse[i];
  const float rw = row_weight[i];
  const NegativeLogit f = row_negatives(p, rm, target_cos, i);
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    if (j == t) {
      double psi, slope;
      row_target(target_cos[i], p, rm, i, &psi, &slope);
      const double tz = static_cast<float>(p.scale * psi);  // as lse_block_kernel summed it (see the CPU kernel)
      const double prob = exp(tz - static_cast<double>(l));
      a[j] = static_cast<float>(static_cast<double>(rw) * p.scale * (prob - 1.0) * slope);
    } else {
      const float x = a[j];
      a[j] = rw * expf(f(x) - l) * f.slope(x);
    }
  }
}

// One thread per (row, class): max over its K centre cosines (NaN wins, first maximum kept).
__global__ void subcenter_max_kernel(const float* cos_k, int64_t lc, int64_t b, int64_t n, int64_t k, float* out,
                                     int64_t lo, uint8_t* argmax) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= b * n) return;
  const int64_t i = e / n, j = e % n;
  const float* c = cos_k + i * lc + j * k;
  float best = c[0];
  uint8_t at = 0;
  for (int64_t q = 1; q < k; ++q) {
    if (c[q] > best || (c[q] != c[q] && best == best)) {
      best = c[q];
      at = static_cast<uint8_t>(q);
    }
  }
  out[i * lo + j] = best;
  argmax[e] = at;
}

// One thread per output element of (B × n·K); an argmax >= K writes NaN, never out of the row.
__global__ void subcenter_expand_kernel(const float* grad, int64_t lg, const uint8_t* argmax, int64_t b, int64_t n,
                                        int64_t k, float* out, int64_t lo) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= b * n * k) return;
  const int64_t i = e / (n * k), col = e % (n * k), j = col / k, q = col % k;
  const int64_t win = argmax[i * n + j];
  out[i * lo + col] = win >= k ? NAN : (q == win ? grad[i * lg + j] : 0.0f);
}

template <class V, class O>
__global__ void project_rows_kernel(const float* u, int64_t lu, const V* v, int64_t lv, const float* norms, O* out,
                                    int64_t lo, int64_t out_rows, const int64_t* index, int64_t d, double eps) {
  __shared__ double shared[32];
  const int64_t r = blockIdx.x;
  const int64_t row = index ? index[r] : r;
  if (row < 0 || row >= out_rows) return;  // never write out of bounds
  const float* ur = u + r * lu;
  const V* vr = v + r * lv;
  O* o = out + row * lo;
  const double norm = norms[r];
  if (norm > eps) {
    double acc = 0.0;
    for (int64_t k = threadIdx.x; k < d; k += blockDim.x) acc += static_cast<double>(ur[k]) * ld(vr + k);
    const float dot = static_cast<float>(block_reduce(acc, SumOp{}, shared, 0.0));
    const float inv = static_cast<float>(1.0 / norm);
    for (int64_t k = threadIdx.x; k < d; k += blockDim.x) st(o + k, (ur[k] - dot * ld(vr + k)) * inv);
  } else {
    const float inv = static_cast<float>(1.0 / eps);
    for (int64_t k = threadIdx.x; k < d; k += blockDim.x) st(o + k, ur[k] * inv);
  }
}

int grid(int64_t rows) {
  SIMCORE_CHECK(rows < (int64_t{1} << 31), "too many rows for one launch: ", rows);
  return static_cast<int>(rows);
}

}  // namespace

void normalize_rows(const TensorView& src, const TensorView* index, const TensorView& out,
                    const TensorView& norms, double eps, uint64_t stream) {
  ms_check::normalize_rows(src, index, out, norms);
  expect_cuda(src);
  SIMCORE_CHECK(eps > 0, "eps must be positive");
  const int64_t n = out.size(0);
  if (n == 0) return;
  dispatch_float_dtype(src.dtype, "input", [&](auto s) {
    dispatch_float_dtype(out.dtype, "GEMM operand", [&](auto o) {
      using S = std::remove_pointer_t<decltype(s)>;
      using T = std::remove_pointer_t<decltype(o)>;
      SIMCORE_LAUNCH(grid(n), kThreads, 0, as_stream(stream), normalize_rows_kernel<S, T>)(
          src.ptr<S>(), src.stride(0), src.size(0), index ? index->ptr<int64_t>() : nullptr, out.ptr<T>(),
          out.stride(0), norms.ptr<float>(), out.size(1), eps);
    });
  });
  check(cudaGetLastError(), "simcore margin_softmax normalize_rows launch");
}

void targets(const TensorView& labels, const TensorView& sampled, int64_t num_classes, const TensorView& out,
             uint64_t stream) {
  ms_check::targets(labels, sampled, num_classes, out);
  expect_cuda(labels);
  const int64_t b = labels.size(0);
  if (b == 0) return;
  const int64_t blocks = (b + kThreads - 1) / kThreads;
  SIMCORE_LAUNCH(grid(blocks), kThreads, 0, as_stream(stream), targets_kernel)(labels.ptr<int64_t>(), b,
                                                                  sampled.ptr<int64_t>(), sampled.size(0),
                                                                  num_classes, out.ptr<int64_t>());
  check(cudaGetLastError(), "simcore margin_softmax targets launch");
}

void lse_block(const TensorView& cos, const TensorView& target_col, int64_t col0, const MarginParams& p,
               const TensorView* dyn, const TensorView* row_margins, const TensorView& run_max,
               const TensorView& run_sum, const TensorView& target_cos, const TensorView& target_logit,
               uint64_t stream) {
  ms_check::lse_block(cos, target_col, col0, dyn, row_margins, run_max, run_sum, target_cos, target_logit);
  expect_cuda(cos);
  check_margin_params(p);  // dyn's values are checked in Python (torch._assert_async) and poison in the kernel
  if (cos.size(0) == 0) return;
  SIMCORE_LAUNCH(grid(cos.size(0)), kThreads, 0, as_stream(stream), lse_block_kernel)(
      cos.ptr<float>(), cos.stride(0), cos.size(1), target_col.ptr<int64_t>(), col0, p,
      dyn ? dyn->ptr<double>() : nullptr, row_margins ? row_margins->ptr<float>() : nullptr, run_max.ptr<float>(),
      run_sum.ptr<float>(), target_cos.ptr<float>(), target_logit.ptr<float>());
  check(cudaGetLastError(), "simcore margin_softmax lse_block launch");
}

void grad_block(const TensorView& cos, const TensorView& target_col, int64_t col0, const MarginParams& p,
                const TensorView* dyn, const TensorView* row_margins, const TensorView& lse,
                const TensorView& row_weight, const TensorView& target_cos, uint64_t stream) {
  ms_check::grad_block(cos, target_col, col0, dyn, row_margins, lse, row_weight, target_cos);
  expect_cuda(cos);
  check_margin_params(p);  // as lse_block
  if (cos.size(0) == 0) return;
  SIMCORE_LAUNCH(grid(cos.size(0)), kThreads, 0, as_stream(stream), grad_block_kernel)(
      cos.ptr<float>(), cos.stride(0), cos.size(1), target_col.ptr<int64_t>(), col0, p,
      dyn ? dyn->ptr<double>() : nullptr, row_margins ? row_margins->ptr<float>() : nullptr, lse.ptr<float>(),
      row_weight.ptr<float>(), target_cos.ptr<float>());
  check(cudaGetLastError(), "simcore margin_softmax grad_block launch");
}

void subcenter_max(const TensorView& cos_k, int64_t k, const TensorView& out, const TensorView& argmax,
                   uint64_t stream) {
  ms_check::subcenter_max(cos_k, k, out, argmax);
  expect_cuda(cos_k);
  const int64_t total = out.size(0) * out.size(1);
  if (total == 0) return;
  SIMCORE_LAUNCH(grid((total + kThreads - 1) / kThreads), kThreads, 0, as_stream(stream), subcenter_max_kernel)(
      cos_k.ptr<float>(), cos_k.stride(0), out.size(0), out.size(1), k, out.ptr<float>(), out.stride(0),
      argmax.ptr<uint8_t>());
  check(cudaGetLastError(), "simcore margin_softmax subcenter_max launch");
}

void subcenter_expand(const TensorView& grad, const TensorView& argmax, int64_t k, const TensorView& out,
                      uint64_t stream) {
  ms_check::subcenter_expand(grad, argmax, k, out);
  expect_cuda(grad);
  const int64_t total = out.size(0) * out.size(1);
  if (total == 0) return;
  SIMCORE_LAUNCH(grid((total + kThreads - 1) / kThreads), kThreads, 0, as_stream(stream), subcenter_expand_kernel)(
      grad.ptr<float>(), grad.stride(0), argmax.ptr<uint8_t>(), grad.size(0), grad.size(1), k, out.ptr<float>(),
      out.stride(0));
  check(cudaGetLastError(), "simcore margin_softmax subcenter_expand launch");
}

void project_rows(const TensorView& u, const TensorView& v, const TensorView& norms, const TensorView& out,
                  const TensorView* out_index, double eps, uint64_t stream) {
  ms_check::project_rows(u, v, norms, out, out_index);
  expect_cuda(u);
  SIMCORE_CHECK(eps > 0, "eps must be positive");
  if (u.size(0) == 0) return;
  dispatch_float_dtype(v.dtype, "GEMM operand", [&](auto vp) {
    dispatch_float_dtype(out.dtype, "input", [&](auto op) {
      using V = std::remove_pointer_t<decltype(vp)>;
      using O = std::remove_pointer_t<decltype(op)>;
      SIMCORE_LAUNCH(grid(u.size(0)), kThreads, 0, as_stream(stream), project_rows_kernel<V, O>)(
          u.ptr<float>(), u.stride(0), v.ptr<V>(), v.stride(0), norms.ptr<float>(), out.ptr<O>(), out.stride(0),
          out.size(0), out_index ? out_index->ptr<int64_t>() : nullptr, u.size(1), eps);
    });
  });
  check(cudaGetLastError(), "simcore margin_softmax project_rows launch");
}

}  // namespace cuda
}  // namespace simcore
