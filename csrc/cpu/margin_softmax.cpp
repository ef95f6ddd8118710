// CPU epilogues of the margin-softmax loss; see margin_softmax.h for the vocabulary.
//
// Row-parallel (OpenMP through simcore::parallel_for). The hot loops (max,
// exp-sum, softmax − one-hot over a block row) run on AVX2 + FMA intrinsics where
// the CPU has them (picked at run time: the portable build has no -march=native),
// else on scalar loops compiled for AVX-512, AVX2 and baseline (target_clones).
// exp is a polynomial (relative error < 2e-7, NaN propagates).
#include "cpu/margin_softmax.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "common/half.h"
#include "common/parallel.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SIMCORE_ROWS_AVX2 1
#include <immintrin.h>
#else
#define SIMCORE_ROWS_AVX2 0
#endif

namespace simcore {

void check_margin_params(const MarginParams& p) {
  SIMCORE_CHECK(std::isfinite(p.m1) && p.m1 > 0, "m1 must be a positive finite number, got ", p.m1);
  SIMCORE_CHECK(std::isfinite(p.m2) && std::fabs(p.m2) < 3.14159265358979323846, "m2 must lie in (-pi, pi), got ",
                p.m2);
  SIMCORE_CHECK(std::isfinite(p.m3), "m3 must be finite, got ", p.m3);
  SIMCORE_CHECK(std::isfinite(p.scale) && p.scale > 0, "scale must be a positive finite number, got ", p.scale);
  SIMCORE_CHECK(p.sin_eps > 0 && p.sin_eps < 0.5, "sin_eps must lie in (0, 0.5), got ", p.sin_eps);
  SIMCORE_CHECK(std::isfinite(p.cam_power) && p.cam_power >= 0, "cam_power must be a finite number >= 0, got ",
                p.cam_power);
  SIMCORE_CHECK(!std::isnan(p.filter_threshold), "filter_threshold must not be NaN");
  SIMCORE_CHECK(std::isfinite(p.curricular_t), "curricular_t must be finite, got ", p.curricular_t);
}

namespace {

// What the compiled path reads (embeddings, weights) and writes (their gradients);
// float64 goes to the reference implementation in Python.
bool is_input_dtype(DType t) { return t == DType::Float32 || t == DType::Float16 || t == DType::BFloat16; }
// The normalised rows handed to the GEMMs (simcore/margin/engine.py: float32, or bfloat16 /
// float16 under EngineOptions.lowp_gemms); the cosine blocks the GEMMs return are float32.
bool is_operand_dtype(DType t) { return t == DType::Float32 || t == DType::BFloat16 || t == DType::Float16; }

void expect_vector(const TensorView& t, DType dtype, int64_t n, const TensorView& like) {
  t.expect_dtype(dtype).expect_ndim(1).expect_size(0, n).expect_contiguous().expect_device(like.device,
                                                                                          like.device_index);
}

void expect_matrix(const TensorView& t, const TensorView& like) {
  t.expect_ndim(2).expect_row_major().expect_device(like.device, like.device_index);
}

}  // namespace

namespace ms_check {

void normalize_rows(const TensorView& src, const TensorView* index, const TensorView& out, const TensorView& norms) {
  expect_matrix(src, src);
  src.expect_floating();
  SIMCORE_CHECK_TYPE(is_input_dtype(src.dtype), "src must be float32, float16 or bfloat16, got ",
                     dtype_name(src.dtype));
  expect_matrix(out, src);
  SIMCORE_CHECK_TYPE(is_operand_dtype(out.dtype), "out must be float32, bfloat16 or float16 (a GEMM operand), got ",
                     dtype_name(out.dtype));
  const int64_t n = out.size(0);
  out.expect_size(1, src.size(1));
  if (index) expect_vector(*index, DType::Int64, n, src);
  else SIMCORE_CHECK(src.size(0) == n, "src has ", src.size(0), " rows but out has ", n);
  expect_vector(norms, DType::Float32, n, src);
}

void targets(const TensorView& labels, const TensorView& sampled, int64_t num_classes, const TensorView& out) {
  labels.expect_ndim(1).expect_contiguous();
  SIMCORE_CHECK_TYPE(labels.dtype == DType::Int64, "labels must be int64, got ", dtype_name(labels.dtype));
  expect_vector(sampled, DType::Int64, sampled.size(0), labels);
  expect_vector(out, DType::Int64, labels.size(0), labels);
  SIMCORE_CHECK(sampled.size(0) >= 1 && sampled.size(0) <= num_classes, "sampled must hold 1..", num_classes,
                " class ids, got ", sampled.size(0));
}

// The (B × block) cosine block and its target columns, shared by lse_block and grad_block.
static int64_t expect_cos_block(const TensorView& cos, const TensorView& target_col, int64_t col0) {
  expect_matrix(cos, cos);
  cos.expect_dtype(DType::Float32);
  SIMCORE_CHECK(cos.size(1) >= 1, "cos must have at least one column");
  SIMCORE_CHECK(col0 >= 0, "col0 must be >= 0, got ", col0);
  expect_vector(target_col, DType::Int64, cos.size(0), cos);
  return cos.size(0);
}

static void expect_row_margins(const TensorView* row_margins, int64_t b, const TensorView& like) {
  if (!row_margins) return;
  row_margins->expect_dtype(DType::Float32).expect_ndim(2).expect_size(0, b).expect_size(1, 3).expect_contiguous()
      .expect_device(like.device, like.device_index);
}

// The dynamic scalars (cam_power, curricular_t): float64, 2 elements, on cos's device.
static void expect_dyn(const TensorView* dyn, const TensorView& like) {
  if (!dyn) return;
  SIMCORE_CHECK_TYPE(dyn->dtype == DType::Float64, "dyn must be float64 (cam_power, curricular_t), got ",
                     dtype_name(dyn->dtype));
  SIMCORE_CHECK(dyn->ndim == 1 && dyn->size(0) == 2, "dyn must hold 2 values (cam_power, curricular_t) in one "
                "dimension, got ", dyn->ndim, " dimension(s) of ", dyn->numel(), " value(s)");
  dyn->expect_contiguous().expect_device(like.device, like.device_index);
}

void lse_block(const TensorView& cos, const TensorView& target_col, int64_t col0, const TensorView* dyn,
               const TensorView* row_margins, const TensorView& run_max, const TensorView& run_sum,
               const TensorView& target_cos, const TensorView& target_logit) {
  const int64_t b = expect_cos_block(cos, target_col, col0);
  expect_dyn(dyn, cos);
  expect_row_margins(row_margins, b, cos);
  expect_vector(run_max, DType::Float32, b, cos);
  expect_vector(run_sum, DType::Float32, b, cos);
  expect_vector(target_cos, DType::Float32, b, cos);
  expect_vector(target_logit, DType::Float32, b, cos);
}

void grad_block(const TensorView& cos, const TensorView& target_col, int64_t col0, const TensorView* dyn,
                const TensorView* row_margins, const TensorView& lse, const TensorView& row_weight,
                const TensorView& target_cos) {
  const int64_t b = expect_cos_block(cos, target_col, col0);
  expect_dyn(dyn, cos);
  expect_row_margins(row_margins, b, cos);
  expect_vector(lse, DType::Float32, b, cos);
  expect_vector(row_weight, DType::Float32, b, cos);
  expect_vector(target_cos, DType::Float32, b, cos);
}

void project_rows(const TensorView& u, const TensorView& v, const TensorView& norms, const TensorView& out,
                  const TensorView* out_index) {
  expect_matrix(u, u);
  u.expect_dtype(DType::Float32);
  const int64_t n = u.size(0), d = u.size(1);
  expect_matrix(v, u);
  SIMCORE_CHECK_TYPE(is_operand_dtype(v.dtype), "v must be float32, bfloat16 or float16 (a GEMM operand), got ",
                     dtype_name(v.dtype));
  v.expect_size(0, n).expect_size(1, d);
  expect_vector(norms, DType::Float32, n, u);
  expect_matrix(out, u);
  out.expect_floating();
  SIMCORE_CHECK_TYPE(is_input_dtype(out.dtype), "out must be float32, float16 or bfloat16, got ",
                     dtype_name(out.dtype));
  out.expect_size(1, d);
  if (out_index) expect_vector(*out_index, DType::Int64, n, u);
  else SIMCORE_CHECK(out.size(0) == n, "out has ", out.size(0), " rows but u has ", n);
}

void subcenter_max(const TensorView& cos_k, int64_t k, const TensorView& out, const TensorView& argmax) {
  expect_matrix(cos_k, cos_k);
  cos_k.expect_dtype(DType::Float32);
  SIMCORE_CHECK(k >= 1 && k <= 255, "subcenters must lie in [1, 255], got ", k);
  expect_matrix(out, cos_k);
  out.expect_dtype(DType::Float32).expect_size(0, cos_k.size(0));
  SIMCORE_CHECK(out.size(1) * k == cos_k.size(1), "cos_k has ", cos_k.size(1), " columns, expected ", out.size(1),
                " classes x ", k, " sub-centres");
  expect_matrix(argmax, cos_k);
  argmax.expect_dtype(DType::UInt8).expect_size(0, out.size(0)).expect_size(1, out.size(1)).expect_contiguous();
}

void subcenter_expand(const TensorView& grad, const TensorView& argmax, int64_t k, const TensorView& out) {
  subcenter_max(out, k, grad, argmax);  // the same three shapes, read the other way
}

}  // namespace ms_check

namespace cpu {
namespace {

// exp(x) for x <= ~88: 2^k · p(r), r = x − k·ln2 in [−ln2/2, ln2/2], degree-6
// Taylor polynomial (relative error < 2e-7). Underflows to ~1e-38 below −87.
inline float fast_exp(float x) {
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // NaN stays NaN
  const float magic = 12582912.0f;                                  // 1.5 · 2^23: round to nearest
  const float t = xc * 1.44269504088896341f + magic;
  const float k = t - magic;
  const float r = (xc - k * 0.693145751953125f) - k * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t tb;
  std::memcpy(&tb, &t, 4);
  const int32_t ki = tb - 0x4B400000;  // integer k from the rounding trick
  const int32_t sb = (ki + 127) << 23;
  float scale;
  std::memcpy(&scale, &sb, 4);
  return p * scale;
}


SIMCORE_CLONES float row_max(const float* a, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = std::max(m, a[j]);  // NaN is caught by the exp-sum
  return m;
}

// Σ exp(s·a_j − m) over j in [0, n)
SIMCORE_CLONES float row_exp_sum(const float* a, int64_t n, float s, float m) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += fast_exp(s * a[j] - m);
  return acc;
}

// a_j <- c · exp(s·a_j − lse) for j in [0, n)
SIMCORE_CLONES void row_softmax(float* a, int64_t n, float s, float lse, float c) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) a[j] = c * fast_exp(s * a[j] - lse);
}

// The same three loops for transformed non-targets (filtering, CurricularFace).
SIMCORE_CLONES float row_max(const float* a, int64_t n, const NegativeLogit f) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = std::max(m, f(a[j]));
  return m;
}

SIMCORE_CLONES float row_exp_sum(const float* a, int64_t n, const NegativeLogit f, float m) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += fast_exp(f(a[j]) - m);
  return acc;
}

// a_j <- c · exp(f(a_j) − lse) · f'(a_j)
SIMCORE_CLONES void row_softmax(float* a, int64_t n, const NegativeLogit f, float lse, float c) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float x = a[j];
    a[j] = c * fast_exp(f(x) - lse) * f.slope(x);
  }
}

// The same loops with AVX2 + FMA intrinsics, taken where the CPU has both (checked once): GCC does
// not vectorise the loops above (the clamps in fast_exp are control flow to it), so they ran one
// exp at a time (docs/margin_softmax.md, "CPU epilogue"). Compiled with a target pragma, so the
// portable build keeps them; AVX-512 gains nothing here, the loops are then memory-bound.
#if SIMCORE_ROWS_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {

// fast_exp on 8 lanes: the same clamp (max/min with the constant first keep NaN), rounding trick
// and polynomial.
inline __m256 exp8(__m256 x) {
  const __m256 xc = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-87.0f), x));
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  const __m256 t = _mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 k = _mm256_sub_ps(t, magic);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693145751953125f), xc);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i ki = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B400000));
  const __m256i sb = _mm256_slli_epi32(_mm256_add_epi32(ki, _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(sb));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float hmax(__m256 v) {
  float lanes[8];
  _mm256_storeu_ps(lanes, v);
  return *std::max_element(lanes, lanes + 8);
}

// Plain non-targets: logit s·a; the slope s rides in the softmax's factor.
struct Plain {
  float s;
  __m256 logit(__m256 a) const { return _mm256_mul_ps(_mm256_set1_ps(s), a); }
  float logit(float a) const { return s * a; }
  __m256 slope(__m256) const { return _mm256_set1_ps(1.0f); }
  float slope(float) const { return 1.0f; }
};

// NegativeLogit on 8 lanes (a NaN compares false everywhere, as in the scalar form).
struct Negative {
  NegativeLogit f;
  __m256 logit(__m256 a) const {
    const __m256 z = _mm256_andnot_ps(_mm256_cmp_ps(a, _mm256_set1_ps(f.filter), _CMP_GT_OQ), a);
    const __m256 plain = _mm256_mul_ps(_mm256_set1_ps(f.scale), z);
    const __m256 hard = _mm256_mul_ps(plain, _mm256_add_ps(_mm256_set1_ps(f.t), z));
    return _mm256_blendv_ps(plain, hard, _mm256_cmp_ps(z, _mm256_set1_ps(f.hard), _CMP_GT_OQ));
  }
  float logit(float a) const { return f(a); }
  __m256 slope(__m256 a) const {
    const __m256 s = _mm256_set1_ps(f.scale);
    const __m256 hard = _mm256_mul_ps(s, _mm256_fmadd_ps(_mm256_set1_ps(2.0f), a, _mm256_set1_ps(f.t)));
    const __m256 v = _mm256_blendv_ps(s, hard, _mm256_cmp_ps(a, _mm256_set1_ps(f.hard), _CMP_GT_OQ));
    return _mm256_andnot_ps(_mm256_cmp_ps(a, _mm256_set1_ps(f.filter), _CMP_GT_OQ), v);
  }
  float slope(float a) const { return f.slope(a); }
};

template <class F>
float row_max(const float* a, int64_t n, const F& f) {
  __m256 m8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) m8 = _mm256_max_ps(f.logit(_mm256_loadu_ps(a + j)), m8);  // NaN: caught by the sum
  float m = hmax(m8);
  for (; j < n; ++j) m = std::max(m, f.logit(a[j]));
  return m;
}

template <class F>
float row_exp_sum(const float* a, int64_t n, const F& f, float m) {
  const __m256 m8 = _mm256_set1_ps(m);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    acc0 = _mm256_add_ps(acc0, exp8(_mm256_sub_ps(f.logit(_mm256_loadu_ps(a + j)), m8)));
    acc1 = _mm256_add_ps(acc1, exp8(_mm256_sub_ps(f.logit(_mm256_loadu_ps(a + j + 8)), m8)));
  }
  for (; j + 8 <= n; j += 8) acc0 = _mm256_add_ps(acc0, exp8(_mm256_sub_ps(f.logit(_mm256_loadu_ps(a + j)), m8)));
  float acc = hsum(_mm256_add_ps(acc0, acc1));
  for (; j < n; ++j) acc += fast_exp(f.logit(a[j]) - m);
  return acc;
}

// a_j <- c · exp(f(a_j) − lse) · f'(a_j)
template <class F>
void row_softmax(float* a, int64_t n, const F& f, float lse, float c) {
  const __m256 l8 = _mm256_set1_ps(lse), c8 = _mm256_set1_ps(c);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 x = _mm256_loadu_ps(a + j);
    const __m256 e = exp8(_mm256_sub_ps(f.logit(x), l8));
    _mm256_storeu_ps(a + j, _mm256_mul_ps(_mm256_mul_ps(c8, e), f.slope(x)));
  }
  for (; j < n; ++j) a[j] = c * fast_exp(f.logit(a[j]) - lse) * f.slope(a[j]);
}

// The entry points, instantiated inside the pragma's region.
float max_logit(const float* a, int64_t n, float s) { return row_max(a, n, Plain{s}); }
float max_logit(const float* a, int64_t n, const NegativeLogit& f) { return row_max(a, n, Negative{f}); }
float exp_sum(const float* a, int64_t n, float s, float m) { return row_exp_sum(a, n, Plain{s}, m); }
float exp_sum(const float* a, int64_t n, const NegativeLogit& f, float m) { return row_exp_sum(a, n, Negative{f}, m); }
void softmax(float* a, int64_t n, float s, float lse, float c) { row_softmax(a, n, Plain{s}, lse, c); }
void softmax(float* a, int64_t n, const NegativeLogit& f, float lse, float c) {
  row_softmax(a, n, Negative{f}, lse, c);
}

}  // namespace avx2
#pragma GCC pop_options

inline bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

// The loops the two passes call: AVX2 where the CPU has it, else the clones above.
// max_logit / exp_sum take the logit s·a (plain) or f(a); softmax writes c·exp(logit − lse)·slope.
float max_logit(const float* a, int64_t n, float s) {
#if SIMCORE_ROWS_AVX2
  if (cpu_has_avx2_fma()) return avx2::max_logit(a, n, s);
#endif
  return s * row_max(a, n);
}
float max_logit(const float* a, int64_t n, const NegativeLogit& f) {
#if SIMCORE_ROWS_AVX2
  if (cpu_has_avx2_fma()) return avx2::max_logit(a, n, f);
#endif
  return row_max(a, n, f);
}
float exp_sum(const float* a, int64_t n, float s, float m) {
#if SIMCORE_ROWS_AVX2
  if (cpu_has_avx2_fma()) return avx2::exp_sum(a, n, s, m);
#endif
  return row_exp_sum(a, n, s, m);
}
float exp_sum(const float* a, int64_t n, const NegativeLogit& f, float m) {
#if SIMCORE_ROWS_AVX2
  if (cpu_has_avx2_fma()) return avx2::exp_sum(a, n, f, m);
#endif
  return row_exp_sum(a, n, f, m);
}
void softmax(float* a, int64_t n, float s, float lse, float c) {
#if SIMCORE_ROWS_AVX2
  if (cpu_has_avx2_fma()) return avx2::softmax(a, n, s, lse, c);
#endif
  row_softmax(a, n, s, lse, c);
}
void softmax(float* a, int64_t n, const NegativeLogit& f, float lse, float c) {
#if SIMCORE_ROWS_AVX2
  if (cpu_has_avx2_fma()) return avx2::softmax(a, n, f, lse, c);
#endif
  row_softmax(a, n, f, lse, c);
}

// The row's margins (per-row tensor or the call's scalars) and its target ψ / slope at cosine c.
struct RowTarget {
  double psi, slope;
};
inline RowTarget row_target(double c, const MarginParams& p, const float* rm, int64_t i) {
  RowTarget r;
  if (rm) target_psi(c, p, rm[3 * i], rm[3 * i + 1], rm[3 * i + 2], &r.psi, &r.slope);
  else target_psi(c, p, p.m1, p.m2, p.m3, &r.psi, &r.slope);
  return r;
}

// The row's non-target transform; `hard` is its ψ under CurricularFace.
inline NegativeLogit row_negatives(const MarginParams& p, const float* rm, const float* tcos, int64_t i) {
  const float inf = std::numeric_limits<float>::infinity();
  const float hard = p.curricular ? static_cast<float>(row_target(tcos[i], p, rm, i).psi) : inf;
  return NegativeLogit{static_cast<float>(p.scale), static_cast<float>(p.filter_threshold), hard,
                       static_cast<float>(p.curricular_t)};
}

void lse_block_impl(const TensorView& cos, const TensorView& target_col, int64_t col0, const MarginParams& p,
                    const float* rm, const TensorView& run_max, const TensorView& run_sum,
                    const TensorView& target_cos, const TensorView& target_logit, int num_threads) {
  const int64_t b = cos.size(0), n = cos.size(1), lda = cos.stride(0);
  const float* base = cos.ptr<float>();
  const int64_t* tcol = target_col.ptr<int64_t>();
  float* rmax = run_max.ptr<float>();
  float* rsum = run_sum.ptr<float>();
  float* tcos = target_cos.ptr<float>();
  float* tlog = target_logit.ptr<float>();
  const float s = static_cast<float>(p.scale);
  const bool plain = plain_negatives(p);
  parallel_for(b, num_threads, min_rows(n * 4), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* a = base + i * lda;
      const bool has = tcol[i] >= col0 && tcol[i] - col0 < n;  // no overflow for any tcol
      const int64_t t = has ? tcol[i] - col0 : -1;
      // split [0, n) around the target column so the loops stay branch-free
      const int64_t n1 = has ? t : n;
      const float* a2 = has ? a + t + 1 : a + n;
      const int64_t n2 = has ? n - t - 1 : 0;
      float tz = -std::numeric_limits<float>::infinity();
      if (has) {
        // CurricularFace reads the target cosine given before pass 1, so ψ is the same everywhere
        const double c = p.curricular ? static_cast<double>(tcos[i]) : static_cast<double>(a[t]);
        tz = static_cast<float>(p.scale * row_target(c, p, rm, i).psi);
        if (!p.curricular) tcos[i] = static_cast<float>(c);
        tlog[i] = tz;
      }
      float bm, bsum;
      if (plain) {
        bm = std::max(std::max(n1 ? max_logit(a, n1, s) : tz, n2 ? max_logit(a2, n2, s) : tz), tz);
        bsum = exp_sum(a, n1, s, bm) + exp_sum(a2, n2, s, bm);
      } else {
        const NegativeLogit f = row_negatives(p, rm, tcos, i);
        bm = std::max(std::max(n1 ? max_logit(a, n1, f) : tz, n2 ? max_logit(a2, n2, f) : tz), tz);
        bsum = exp_sum(a, n1, f, bm) + exp_sum(a2, n2, f, bm);
      }
      if (has) bsum += std::exp(tz - bm);
      if (std::isnan(tz)) bsum = tz;
      // merge into the running (max, sum)
      const float om = rmax[i];
      const float nm = std::isnan(bm) ? bm : std::max(om, bm);
      const float os = rsum[i] == 0.0f ? 0.0f : rsum[i] * std::exp(om - nm);
      rsum[i] = os + bsum * std::exp(bm - nm);
      rmax[i] = nm;
    }
  });
}

void grad_block_impl(const TensorView& cos, const TensorView& target_col, int64_t col0, const MarginParams& p,
                     const float* rm, const TensorView& lse, const TensorView& row_weight,
                     const TensorView& target_cos, int num_threads) {
  const int64_t b = cos.size(0), n = cos.size(1), lda = cos.stride(0);
  float* base = cos.ptr<float>();
  const int64_t* tcol = target_col.ptr<int64_t>();
  const float* l = lse.ptr<float>();
  const float* rw = row_weight.ptr<float>();
  const float* tcos = target_cos.ptr<float>();
  const float s = static_cast<float>(p.scale);
  const bool plain = plain_negatives(p);
  parallel_for(b, num_threads, min_rows(n * 4), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* a = base + i * lda;
      const bool has = tcol[i] >= col0 && tcol[i] - col0 < n;  // no overflow for any tcol
      const int64_t t = has ? tcol[i] - col0 : n;
      // d loss_i / d logit = rw·(softmax − one-hot); d logit / d cos = s for plain negatives
      if (plain) {
        softmax(a, t, s, l[i], rw[i] * s);
        if (has) softmax(a + t + 1, n - t - 1, s, l[i], rw[i] * s);
      } else {
        const NegativeLogit f = row_negatives(p, rm, tcos, i);
        softmax(a, t, f, l[i], rw[i]);
        if (has) softmax(a + t + 1, n - t - 1, f, l[i], rw[i]);
      }
      if (!has) continue;
      const RowTarget r = row_target(tcos[i], p, rm, i);
      // the target logit as the exp-sum took it (float32): a row whose only class is its target
      // then has prob = exp(0) = 1 and a gradient of exactly 0
      const double tz = static_cast<float>(p.scale * r.psi);
      const double prob = std::exp(tz - static_cast<double>(l[i]));
      a[t] = static_cast<float>(static_cast<double>(rw[i]) * p.scale * (prob - 1.0) * r.slope);
    }
  });
}

// One pass per centre q over all classes j (strided loads, branch-free, vectorised), the
// running best kept in o / arg: the first maximum wins and NaN wins over numbers.
SIMCORE_CLONES void subcenter_max_row(const float* a, int64_t n, int64_t k, float* o, uint8_t* arg) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    o[j] = a[j * k];
    arg[j] = 0;
  }
  for (int64_t q = 1; q < k; ++q) {
    const uint8_t qq = static_cast<uint8_t>(q);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float v = a[j * k + q], best = o[j];
      const bool take = v > best || (v != v && best == best);
      o[j] = take ? v : best;
      arg[j] = take ? qq : arg[j];
    }
  }
}

template <class S, class T>
SIMCORE_CLONES float normalize_row(const S* row, T* o, int64_t d, double eps) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < d; ++k) {
    const double x = to_float(row[k]);
    acc += x * x;
  }
  const double norm = std::sqrt(acc);
  // scaled in double: for rows with norm > 1/FLT_MIN (~8.5e37, reachable with bfloat16/float32
  // inputs) 1/norm is subnormal in float32 and loses up to all of its precision
  const double inv = 1.0 / std::max(norm, eps);
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) o[k] = from_float<T>(static_cast<float>(to_float(row[k]) * inv));
  return static_cast<float>(norm);
}

template <class S, class T>
void normalize_rows_impl(const TensorView& src, const int64_t* index, const TensorView& out,
                         const TensorView& norms, double eps, int num_threads) {
  const int64_t n = out.size(0), d = out.size(1);
  const S* sp = src.ptr<S>();
  T* op = out.ptr<T>();
  float* np = norms.ptr<float>();
  const int64_t ls = src.stride(0), lo = out.stride(0);
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(S) + sizeof(T));
  parallel_for(n, num_threads, min_rows(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (index && r + kPrefetchRows < end) prefetch_row(sp + index[r + kPrefetchRows] * ls, d * sizeof(S), false);
      np[r] = normalize_row(sp + (index ? index[r] : r) * ls, op + r * lo, d, eps);
    }
  });
}

// d(x/‖x‖)ᵀu = (u − (u·x̂)x̂)/‖x‖; below eps F.normalize divides by eps: the Jacobian is I/eps
template <class V, class O>
SIMCORE_CLONES void project_row(const float* ur, const V* vr, O* o, int64_t d, double norm, double eps) {
  if (norm > eps) {
    double dot = 0.0;
#pragma omp simd reduction(+ : dot)
    for (int64_t k = 0; k < d; ++k) dot += static_cast<double>(ur[k]) * to_float(vr[k]);
    const float fd = static_cast<float>(dot), inv = static_cast<float>(1.0 / norm);
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) o[k] = from_float<O>((ur[k] - fd * to_float(vr[k])) * inv);
  } else {
    const float inv = static_cast<float>(1.0 / eps);
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) o[k] = from_float<O>(ur[k] * inv);
  }
}

template <class V, class O>
void project_rows_impl(const TensorView& u, const TensorView& v, const TensorView& norms, const TensorView& out,
                       const int64_t* index, double eps, int num_threads) {
  const int64_t n = u.size(0), d = u.size(1);
  const float* up = u.ptr<float>();
  const V* vp = v.ptr<V>();
  const float* np = norms.ptr<float>();
  O* op = out.ptr<O>();
  const int64_t lu = u.stride(0), lv = v.stride(0), lo = out.stride(0);
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(float) + sizeof(V) + sizeof(O));
  parallel_for(n, num_threads, min_rows(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (index && r + kPrefetchRows < end) prefetch_row(op + index[r + kPrefetchRows] * lo, d * sizeof(O), true);
      project_row(up + r * lu, vp + r * lv, op + (index ? index[r] : r) * lo, d, static_cast<double>(np[r]), eps);
    }
  });
}

void check_index_range(const int64_t* idx, int64_t n, int64_t limit, const char* what) {
  for (int64_t r = 0; r < n; ++r)
    SIMCORE_CHECK(idx[r] >= 0 && idx[r] < limit, what, " holds ", idx[r], " at position ", r,
                  ", outside [0, ", limit, ")");
}

}  // namespace

void normalize_rows(const TensorView& src, const TensorView* index, const TensorView& out,
                    const TensorView& norms, double eps, int num_threads) {
  ms_check::normalize_rows(src, index, out, norms);
  src.expect_device(Device::CPU, 0);
  SIMCORE_CHECK(eps > 0, "eps must be positive");
  const int64_t* idx = index ? index->ptr<int64_t>() : nullptr;
  if (idx) check_index_range(idx, out.size(0), src.size(0), "index");
  dispatch_float_dtype(src.dtype, "input", [&](auto s) {
    dispatch_float_dtype(out.dtype, "GEMM operand", [&](auto o) {
      normalize_rows_impl<decltype(s), decltype(o)>(src, idx, out, norms, eps, num_threads);
    });
  });
}

void targets(const TensorView& labels, const TensorView& sampled, int64_t num_classes, const TensorView& out,
             int num_threads) {
  ms_check::targets(labels, sampled, num_classes, out);
  labels.expect_device(Device::CPU, 0);
  const int64_t b = labels.size(0), s = sampled.size(0);
  const int64_t* lp = labels.ptr<int64_t>();
  const int64_t* sp = sampled.ptr<int64_t>();
  int64_t* op = out.ptr<int64_t>();
  for (int64_t j = 0; j < s; ++j) {
    SIMCORE_CHECK(sp[j] >= 0 && sp[j] < num_classes, "sampled holds class ", sp[j], ", outside [0, ", num_classes,
                  ")");
    SIMCORE_CHECK(j == 0 || sp[j] > sp[j - 1], "sampled must be strictly increasing");
  }
  for (int64_t i = 0; i < b; ++i) {
    SIMCORE_CHECK(lp[i] >= 0 && lp[i] < num_classes, "labels[", i, "] = ", lp[i], " is outside [0, ", num_classes,
                  ")");
    const int64_t* it = std::lower_bound(sp, sp + s, lp[i]);
    SIMCORE_CHECK(it != sp + s && *it == lp[i], "labels[", i, "] = ", lp[i], " is not in the sampled classes");
    op[i] = it - sp;
  }
}

// Per-row margins obey the scalar rules (m1 > 0, |m2| < π, m3 finite); checked on the host.
static const float* checked_row_margins(const TensorView* row_margins) {
  if (!row_margins) return nullptr;
  const float* rm = row_margins->ptr<float>();
  for (int64_t i = 0; i < row_margins->size(0); ++i) {
    const float m1 = rm[3 * i], m2 = rm[3 * i + 1], m3 = rm[3 * i + 2];
    SIMCORE_CHECK(std::isfinite(m1) && m1 > 0 && std::isfinite(m2) && std::fabs(m2) < 3.14159265f &&
                      std::isfinite(m3),
                  "row_margins[", i, "] = (", m1, ", ", m2, ", ", m3,
                  ") must have m1 > 0, |m2| < pi and finite values");
  }
  return rm;
}

// p with dyn's values in place (host memory here), checked as the scalars are.
static MarginParams with_dynamic(const MarginParams& p, const TensorView* dyn) {
  check_margin_params(p);
  if (!dyn) return p;
  MarginParams q = p;
  const double* v = dyn->ptr<double>();
  if (!apply_dynamic(q, v[0], v[1])) check_margin_params(q);  // raises, naming the value
  return q;
}

void lse_block(const TensorView& cos, const TensorView& target_col, int64_t col0, const MarginParams& p,
               const TensorView* dyn, const TensorView* row_margins, const TensorView& run_max,
               const TensorView& run_sum, const TensorView& target_cos, const TensorView& target_logit,
               int num_threads) {
  ms_check::lse_block(cos, target_col, col0, dyn, row_margins, run_max, run_sum, target_cos, target_logit);
  cos.expect_device(Device::CPU, 0);
  const MarginParams q = with_dynamic(p, dyn);
  const float* rm = checked_row_margins(row_margins);
  lse_block_impl(cos, target_col, col0, q, rm, run_max, run_sum, target_cos, target_logit, num_threads);
}

void grad_block(const TensorView& cos, const TensorView& target_col, int64_t col0, const MarginParams& p,
                const TensorView* dyn, const TensorView* row_margins, const TensorView& lse,
                const TensorView& row_weight, const TensorView& target_cos, int num_threads) {
  ms_check::grad_block(cos, target_col, col0, dyn, row_margins, lse, row_weight, target_cos);
  cos.expect_device(Device::CPU, 0);
  const MarginParams q = with_dynamic(p, dyn);
  const float* rm = checked_row_margins(row_margins);
  grad_block_impl(cos, target_col, col0, q, rm, lse, row_weight, target_cos, num_threads);
}

void subcenter_max(const TensorView& cos_k, int64_t k, const TensorView& out, const TensorView& argmax,
                   int num_threads) {
  ms_check::subcenter_max(cos_k, k, out, argmax);
  cos_k.expect_device(Device::CPU, 0);
  const int64_t b = out.size(0), n = out.size(1);
  const float* cp = cos_k.ptr<float>();
  float* op = out.ptr<float>();
  uint8_t* ap = argmax.ptr<uint8_t>();
  const int64_t lc = cos_k.stride(0), lo = out.stride(0);
  parallel_for(b, num_threads, min_rows(n * k * 4), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) subcenter_max_row(cp + i * lc, n, k, op + i * lo, ap + i * n);
  });
}

void subcenter_expand(const TensorView& grad, const TensorView& argmax, int64_t k, const TensorView& out,
                      int num_threads) {
  ms_check::subcenter_expand(grad, argmax, k, out);
  grad.expect_device(Device::CPU, 0);
  const int64_t b = grad.size(0), n = grad.size(1);
  const float* gp = grad.ptr<float>();
  const uint8_t* ap = argmax.ptr<uint8_t>();
  float* op = out.ptr<float>();
  const int64_t lg = grad.stride(0), lo = out.stride(0);
  if (b > 0 && n > 0) {  // never write outside a row
    const uint8_t worst = *std::max_element(ap, ap + b * n);
    SIMCORE_CHECK(worst < k, "argmax holds ", int{worst}, ", outside [0, ", k, ")");
  }
  parallel_for(b, num_threads, min_rows(n * k * 4), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* o = op + i * lo;
      std::fill(o, o + n * k, 0.0f);
      for (int64_t j = 0; j < n; ++j) o[j * k + ap[i * n + j]] = gp[i * lg + j];
    }
  });
}

void project_rows(const TensorView& u, const TensorView& v, const TensorView& norms, const TensorView& out,
                  const TensorView* out_index, double eps, int num_threads) {
  ms_check::project_rows(u, v, norms, out, out_index);
  u.expect_device(Device::CPU, 0);
  SIMCORE_CHECK(eps > 0, "eps must be positive");
  const int64_t* idx = out_index ? out_index->ptr<int64_t>() : nullptr;
  if (idx) check_index_range(idx, u.size(0), out.size(0), "out_index");
  dispatch_float_dtype(v.dtype, "GEMM operand", [&](auto vt) {
    dispatch_float_dtype(out.dtype, "input", [&](auto ot) {
      project_rows_impl<decltype(vt), decltype(ot)>(u, v, norms, out, idx, eps, num_threads);
    });
  });
}

void sample_classes(const TensorView& positives, const TensorView& randoms, int64_t num_classes,
                    const TensorView& bitmap, const TensorView& out) {
  for (const TensorView* t : {&positives, &randoms, &bitmap, &out}) {
    t->expect_dtype(DType::Int64).expect_ndim(1).expect_contiguous().expect_device(Device::CPU, 0);
  }
  const int64_t p = positives.size(0), k = randoms.size(0);
  SIMCORE_CHECK(num_classes >= 1, "num_classes must be positive, got ", num_classes);
  SIMCORE_CHECK(p <= num_classes, "more positives (", p, ") than classes (", num_classes, ")");
  const int64_t n = num_classes - p;  // negatives to draw from
  SIMCORE_CHECK(k <= n, "cannot draw ", k, " negatives from ", n, " classes");
  const int64_t words = n / 64 + (n % 64 != 0);  // ceil(n/64) without overflowing for n near INT64_MAX
  SIMCORE_CHECK(bitmap.size(0) >= words, "bitmap must hold at least ", words, " words");
  out.expect_size(0, p + k);
  const int64_t* pos = positives.ptr<int64_t>();
  for (int64_t j = 0; j < p; ++j) {
    SIMCORE_CHECK(pos[j] >= 0 && pos[j] < num_classes, "positive class ", pos[j], " is outside [0, ", num_classes,
                  ")");
    SIMCORE_CHECK(j == 0 || pos[j] > pos[j - 1], "positives must be sorted and unique");
  }
  uint64_t* bits = reinterpret_cast<uint64_t*>(bitmap.ptr<int64_t>());
  if (words) std::memset(bits, 0, static_cast<size_t>(words) * sizeof(uint64_t));  // an empty bitmap may be null
  const int64_t* rnd = randoms.ptr<int64_t>();
  // Floyd: for j = n−k .. n−1 pick t uniform in [0, j]; take t, or j if t is taken.
  for (int64_t j = n - k, i = 0; j < n; ++j, ++i) {
    const uint64_t r = static_cast<uint64_t>(rnd[i]) & ((uint64_t{1} << 63) - 1);
    const uint64_t t = static_cast<uint64_t>((static_cast<unsigned __int128>(r) * static_cast<uint64_t>(j + 1)) >> 63);
    const uint64_t pick = (bits[t >> 6] >> (t & 63)) & 1u ? static_cast<uint64_t>(j) : t;
    bits[pick >> 6] |= uint64_t{1} << (pick & 63);
  }
  // Ranks in increasing order -> classes (rank r is class r + #{j : pos[j] − j <= r}), merged with the positives.
  int64_t* o = out.ptr<int64_t>();
  int64_t pi = 0, w = 0;
  for (int64_t q = 0; q < words; ++q) {
    uint64_t word = bits[q];
    while (word) {
      const int64_t r = q * 64 + __builtin_ctzll(word);
      word &= word - 1;
      while (pi < p && pos[pi] - pi <= r) o[w++] = pos[pi++];
      o[w++] = r + pi;
    }
  }
  while (pi < p) o[w++] = pos[pi++];
  SIMCORE_CHECK(w == p + k, "internal error: sampled ", w, " classes, expected ", p + k);
}

}  // namespace cpu
}  // namespace simcore
