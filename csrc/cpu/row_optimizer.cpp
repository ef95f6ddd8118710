// CPU sparse row optimizers; see row_optimizer.h. Row-parallel; the per-row loops are
// branch-free over D so the compiler vectorises them (AVX-512/AVX2/baseline clones).
#include "cpu/row_optimizer.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/half.h"
#include "common/parallel.h"

namespace simcore {
namespace {

bool is_weight_dtype(DType t) { return t == DType::Float32 || t == DType::Float16 || t == DType::BFloat16; }

// [first, last) bytes a non-empty view spans (strides are >= 0: tensor_from_py checks).
struct ByteRange {
  uintptr_t first = 0, last = 0;
  const char* name = "";
};

ByteRange byte_range(const TensorView& t) {
  int64_t extent = 0;
  for (int d = 0; d < t.ndim; ++d) extent += (t.shape[d] - 1) * t.strides[d];
  const uintptr_t first = reinterpret_cast<uintptr_t>(t.data);
  return {first, first + static_cast<uintptr_t>((extent + 1) * itemsize(t.dtype)), t.name.c_str()};
}

// Written tensors must not overlap each other nor any tensor read: an aliased state
// buffer would be updated twice through two names.
void expect_disjoint(const std::vector<const TensorView*>& written, const std::vector<const TensorView*>& read) {
  std::vector<ByteRange> w, all;
  for (const TensorView* t : written)
    if (t && t->numel() > 0) w.push_back(byte_range(*t));
  all = w;
  for (const TensorView* t : read)
    if (t && t->numel() > 0) all.push_back(byte_range(*t));
  for (size_t i = 0; i < w.size(); ++i)
    for (size_t j = i + 1; j < all.size(); ++j)
      SIMCORE_CHECK(w[i].last <= all[j].first || all[j].last <= w[i].first, w[i].name, " and ", all[j].name,
                    " overlap in memory: the row update writes ", w[i].name, " in place");
}

void expect_state(const TensorView& t, const TensorView& weight) {
  t.expect_dtype(DType::Float32).expect_ndim(2).expect_size(0, weight.size(0)).expect_size(1, weight.size(1))
      .expect_row_major().expect_device(weight.device, weight.device_index);
}

void expect_scalar(const TensorView* t, const TensorView& weight) {
  if (!t) return;
  t->expect_dtype(DType::Float32).expect_device(weight.device, weight.device_index);
  SIMCORE_CHECK(t->numel() == 1, t->name, " must hold one value, got ", t->numel());
}

// The arguments every row optimizer takes; returns n (rows updated).
int64_t expect_common(const TensorView& weight, const TensorView& rows, const TensorView& grad,
                      const TensorView* grad_scale, const TensorView* found_inf, double lr, double weight_decay) {
  weight.expect_ndim(2).expect_row_major();
  SIMCORE_CHECK_TYPE(is_weight_dtype(weight.dtype), "weight must be float32, float16 or bfloat16, got ",
                     dtype_name(weight.dtype));
  rows.expect_dtype(DType::Int64).expect_ndim(1).expect_contiguous().expect_device(weight.device,
                                                                                    weight.device_index);
  const int64_t n = rows.size(0);
  SIMCORE_CHECK(n <= weight.size(0), "rows holds ", n, " ids but weight has only ", weight.size(0), " rows");
  grad.expect_dtype(DType::Float32).expect_ndim(2).expect_size(0, n).expect_size(1, weight.size(1))
      .expect_row_major().expect_device(weight.device, weight.device_index);
  expect_scalar(grad_scale, weight);
  expect_scalar(found_inf, weight);
  SIMCORE_CHECK(std::isfinite(lr) && lr >= 0, "lr must be a finite number >= 0, got ", lr);
  SIMCORE_CHECK(std::isfinite(weight_decay) && weight_decay >= 0, "weight_decay must be a finite number >= 0, got ",
                weight_decay);
  return n;
}

}  // namespace

namespace ro_check {

void sgd(const TensorView& weight, const TensorView& rows, const TensorView& grad, const TensorView* momentum_buffer,
         const TensorView* grad_scale, const TensorView* found_inf, const RowSgdParams& p) {
  expect_common(weight, rows, grad, grad_scale, found_inf, p.lr, p.weight_decay);
  SIMCORE_CHECK(std::isfinite(p.momentum) && p.momentum >= 0, "momentum must be a finite number >= 0, got ",
                p.momentum);
  if (momentum_buffer) expect_state(*momentum_buffer, weight);
  expect_disjoint({&weight, momentum_buffer}, {&rows, &grad, grad_scale, found_inf});
}

void adamw(const TensorView& weight, const TensorView& rows, const TensorView& grad, const TensorView& exp_avg,
           const TensorView& exp_avg_sq, const TensorView& row_step, const TensorView* grad_scale,
           const TensorView* found_inf, const RowAdamwParams& p) {
  expect_common(weight, rows, grad, grad_scale, found_inf, p.lr, p.weight_decay);
  SIMCORE_CHECK(p.beta1 >= 0 && p.beta1 < 1, "beta1 must lie in [0, 1), got ", p.beta1);
  SIMCORE_CHECK(p.beta2 >= 0 && p.beta2 < 1, "beta2 must lie in [0, 1), got ", p.beta2);
  SIMCORE_CHECK(std::isfinite(p.eps) && p.eps >= 0, "eps must be a finite number >= 0, got ", p.eps);
  expect_state(exp_avg, weight);
  expect_state(exp_avg_sq, weight);
  row_step.expect_dtype(DType::Int64).expect_ndim(1).expect_size(0, weight.size(0)).expect_contiguous()
      .expect_device(weight.device, weight.device_index);
  expect_disjoint({&weight, &exp_avg, &exp_avg_sq, &row_step}, {&rows, &grad, grad_scale, found_inf});
}

}  // namespace ro_check

namespace cpu {
namespace {

// Strictly increasing ids in [0, limit): each row is updated once.
void check_rows(const int64_t* ids, int64_t n, int64_t limit) {
  for (int64_t r = 0; r < n; ++r) {
    SIMCORE_CHECK(ids[r] >= 0 && ids[r] < limit, "rows holds ", ids[r], " at position ", r, ", outside [0, ",
                  limit, ")");
    SIMCORE_CHECK(r == 0 || ids[r] > ids[r - 1], "rows must be strictly increasing (sorted, no duplicates): ",
                  ids[r - 1], " then ", ids[r], " at position ", r);
  }
}

// False when found_inf says skip; else the divisor of grad (1 without AMP).
bool step_scale(const TensorView* grad_scale, const TensorView* found_inf, float* scale) {
  if (found_inf && *found_inf->ptr<float>() > 0.0f) return false;
  *scale = grad_scale ? *grad_scale->ptr<float>() : 1.0f;
  return true;
}

template <class T>
SIMCORE_CLONES void sgd_row(T* w, const float* g, float* buf, int64_t d, float scale, float lr, float momentum,
                            float wd) {
  if (buf) {
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) {
      const float wk = to_float(w[k]);
      const float b = momentum * buf[k] + (g[k] / scale + wd * wk);
      buf[k] = b;
      w[k] = from_float<T>(wk - lr * b);
    }
  } else {
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) {
      const float wk = to_float(w[k]);
      w[k] = from_float<T>(wk - lr * (g[k] / scale + wd * wk));
    }
  }
}

template <class T>
SIMCORE_CLONES void adamw_row(T* w, const float* g, float* m, float* v, int64_t d, float inv_scale, float b1,
                              float b2, float eps, float decay, float step_size, float inv_sqrt_bc2) {
  const float c1 = 1.0f - b1, c2 = 1.0f - b2;
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) {
    const float gk = g[k] * inv_scale;
    const float mk = b1 * m[k] + c1 * gk;
    const float vk = b2 * v[k] + c2 * gk * gk;
    m[k] = mk;
    v[k] = vk;
    w[k] = from_float<T>(to_float(w[k]) * decay - step_size * mk / (std::sqrt(vk) * inv_sqrt_bc2 + eps));
  }
}

}  // namespace

void row_sgd(const TensorView& weight, const TensorView& rows, const TensorView& grad,
             const TensorView* momentum_buffer, const TensorView* grad_scale, const TensorView* found_inf,
             const RowSgdParams& p, int num_threads) {
  ro_check::sgd(weight, rows, grad, momentum_buffer, grad_scale, found_inf, p);
  weight.expect_device(Device::CPU, 0);
  const int64_t n = rows.size(0), d = weight.size(1);
  const int64_t* ids = rows.ptr<int64_t>();
  check_rows(ids, n, weight.size(0));
  float scale = 1.0f;
  if (n == 0 || d == 0 || !step_scale(grad_scale, found_inf, &scale)) return;
  const float lr = static_cast<float>(p.lr), mom = static_cast<float>(p.momentum);
  const float wd = static_cast<float>(p.weight_decay);
  const float* gp = grad.ptr<float>();
  float* bp = momentum_buffer ? momentum_buffer->ptr<float>() : nullptr;
  const int64_t lg = grad.stride(0), lw = weight.stride(0), lb = momentum_buffer ? momentum_buffer->stride(0) : 0;
  dispatch_float_dtype(weight.dtype, "weight", [&](auto tag) {
    using T = decltype(tag);
    T* wp = weight.ptr<T>();
    const int64_t row_bytes = d * static_cast<int64_t>(4 + 2 * sizeof(T) + (bp ? 8 : 0));
    parallel_for(n, num_threads, min_rows(row_bytes), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (r + kPrefetchRows < end) {
          const int64_t ahead = ids[r + kPrefetchRows];
          prefetch_row(wp + ahead * lw, d * sizeof(T), true);
          if (bp) prefetch_row(bp + ahead * lb, d * 4, true);
        }
        sgd_row(wp + ids[r] * lw, gp + r * lg, bp ? bp + ids[r] * lb : nullptr, d, scale, lr, mom, wd);
      }
    });
  });
}

void row_adamw(const TensorView& weight, const TensorView& rows, const TensorView& grad, const TensorView& exp_avg,
               const TensorView& exp_avg_sq, const TensorView& row_step, const TensorView* grad_scale,
               const TensorView* found_inf, const RowAdamwParams& p, int num_threads) {
  ro_check::adamw(weight, rows, grad, exp_avg, exp_avg_sq, row_step, grad_scale, found_inf, p);
  weight.expect_device(Device::CPU, 0);
  const int64_t n = rows.size(0), d = weight.size(1);
  const int64_t* ids = rows.ptr<int64_t>();
  check_rows(ids, n, weight.size(0));
  float scale = 1.0f;
  if (n == 0 || !step_scale(grad_scale, found_inf, &scale)) return;
  const float b1 = static_cast<float>(p.beta1), b2 = static_cast<float>(p.beta2);
  const float eps = static_cast<float>(p.eps), decay = static_cast<float>(1.0 - p.lr * p.weight_decay);
  const float inv_scale = 1.0f / scale;
  const double log_b1 = std::log(p.beta1), log_b2 = std::log(p.beta2);
  const float* gp = grad.ptr<float>();
  float* mp = exp_avg.ptr<float>();
  float* vp = exp_avg_sq.ptr<float>();
  int64_t* sp = row_step.ptr<int64_t>();
  const int64_t lg = grad.stride(0), lw = weight.stride(0), lm = exp_avg.stride(0), lv = exp_avg_sq.stride(0);
  dispatch_float_dtype(weight.dtype, "weight", [&](auto tag) {
    using T = decltype(tag);
    T* wp = weight.ptr<T>();
    const int64_t row_bytes = d * static_cast<int64_t>(4 + 2 * sizeof(T) + 16);
    parallel_for(n, num_threads, min_rows(row_bytes), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (r + kPrefetchRows < end) {
          const int64_t ahead = ids[r + kPrefetchRows];
          prefetch_row(wp + ahead * lw, d * sizeof(T), true);
          prefetch_row(mp + ahead * lm, d * 4, true);
          prefetch_row(vp + ahead * lv, d * 4, true);
          prefetch_row(sp + ahead, 8, true);
        }
        const int64_t row = ids[r], t = sp[row] + 1;
        sp[row] = t;
        const double bc1 = -std::expm1(static_cast<double>(t) * log_b1);
        const double bc2 = -std::expm1(static_cast<double>(t) * log_b2);
        adamw_row(wp + row * lw, gp + r * lg, mp + row * lm, vp + row * lv, d, inv_scale, b1, b2, eps, decay,
                  static_cast<float>(p.lr / bc1), static_cast<float>(1.0 / std::sqrt(bc2)));
      }
    });
  });
}

}  // namespace cpu
}  // namespace simcore
