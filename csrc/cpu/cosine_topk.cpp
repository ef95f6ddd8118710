// CPU k-selection epilogues of cosine_topk (see cosine_topk.h for the design).
#include "cpu/cosine_topk.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/half.h"
#include "common/parallel.h"

namespace simcore {

namespace {

bool is_half(DType t) { return t == DType::Float16 || t == DType::BFloat16; }

void expect_vector(const TensorView& v, int64_t n, DType t, Device dev, int index) {
  v.expect_dtype(t).expect_ndim(1).expect_size(0, n).expect_contiguous().expect_device(dev, index);
}

// Byte range [first, last) spanned by a view with non-negative strides.
void byte_range(const TensorView& v, uintptr_t& first, uintptr_t& last) {
  int64_t span = 1;
  for (int d = 0; d < v.ndim; ++d) {
    if (v.shape[d] == 0) span = 0;
    else span += (v.shape[d] - 1) * v.strides[d];
  }
  if (v.ndim > 0 && v.numel() == 0) span = 0;
  first = reinterpret_cast<uintptr_t>(v.data);
  last = first + static_cast<uintptr_t>(span * itemsize(v.dtype));
}

bool overlap(const TensorView& a, const TensorView& b) {
  uintptr_t a0, a1, b0, b1;
  byte_range(a, a0, a1);
  byte_range(b, b0, b1);
  return a0 < a1 && b0 < b1 && a0 < b1 && b0 < a1;
}

}  // namespace

void check_prepare_args(const TopkPrepareArgs& a) {
  const Device dev = a.block.device;
  const int di = a.block.device_index;
  a.block.expect_ndim(2).expect_row_major();
  SIMCORE_CHECK_TYPE(a.block.dtype == DType::Float32 || is_half(a.block.dtype),
                     "database block must be float32, float16 or bfloat16, got ", dtype_name(a.block.dtype));
  const int64_t nb = a.block.size(0);
  expect_vector(a.scale, nb, DType::Float32, dev, di);
  expect_vector(a.slack, nb, DType::Float32, dev, di);
  expect_vector(a.status, 1, DType::Int64, dev, di);
  SIMCORE_CHECK(a.row_base >= 0, "row_base must be >= 0, got ", a.row_base);
  if (a.convert) {
    SIMCORE_CHECK_TYPE(a.block.dtype != DType::BFloat16, "a bfloat16 block needs no conversion");
    a.converted.expect_dtype(DType::BFloat16).expect_ndim(2).expect_size(0, nb).expect_size(1, a.block.size(1));
    a.converted.expect_contiguous().expect_device(dev, di);
    SIMCORE_CHECK(!overlap(a.block, a.converted), "converted must not overlap the database block");
  }
  SIMCORE_CHECK(std::isfinite(a.slack_factor) && a.slack_factor >= 0, "slack_factor must be finite and >= 0");
}

void check_update_args(const TopkUpdateArgs& a) {
  const Device dev = a.scores.device;
  const int di = a.scores.device_index;
  a.scores.expect_ndim(2).expect_row_major().expect_device(dev, di);
  SIMCORE_CHECK_TYPE(a.scores.dtype == DType::Float32 || is_half(a.scores.dtype),
                     "scores must be float32, float16 or bfloat16, got ", dtype_name(a.scores.dtype));
  const int64_t qb = a.scores.size(0), nb = a.scores.size(1);
  expect_vector(a.scale, nb, DType::Float32, dev, di);
  a.reservoir.expect_dtype(DType::Int64).expect_ndim(3).expect_size(2, 2).expect_contiguous().expect_device(dev, di);
  const int64_t Q = a.reservoir.size(0), cap = a.reservoir.size(1);
  expect_vector(a.count, Q, DType::Int64, dev, di);
  expect_vector(a.threshold, Q, DType::Float32, dev, di);
  a.excl_offsets.expect_dtype(DType::Int64).expect_ndim(1).expect_size(0, Q + 1).expect_contiguous().expect_device(dev, di);
  a.excl_index.expect_dtype(DType::Int64).expect_ndim(1).expect_contiguous().expect_device(dev, di);
  SIMCORE_CHECK(a.q_begin >= 0 && a.q_begin <= Q && qb <= Q - a.q_begin, "query rows [", a.q_begin, ", ", a.q_begin + qb,
                ") are outside the ", Q, " reservoirs");
  SIMCORE_CHECK(a.db_base >= 0, "db_base must be >= 0, got ", a.db_base);
  SIMCORE_CHECK(a.k >= 1 && a.k < cap, "k must be in [1, cap), got k=", a.k, " with cap=", cap);
  if (a.n_total >= 0) {
    SIMCORE_CHECK(a.db_base <= a.n_total && nb <= a.n_total - a.db_base, "tile rows [", a.db_base, ", ", a.db_base + nb,
                  ") exceed the database size ", a.n_total);
  }
  // CUDA appends up to a thread block after a compaction; the CPU one entry.
  const int64_t min_slack = dev == Device::CUDA ? kTopkMinSlack : 1;
  SIMCORE_CHECK(cap >= a.k + min_slack || (a.n_total >= 0 && cap > a.n_total),
                "reservoir capacity ", cap, " is too small for k=", a.k);
  if (a.has_workspace) {
    a.workspace.expect_dtype(DType::Float32).expect_ndim(1).expect_contiguous().expect_device(dev, di);
    // the CUDA small-tile kernels write it while reading (or, later, writing) every other tensor
    for (const TensorView* t : {&a.scores, &a.scale, &a.excl_offsets, &a.excl_index, &a.reservoir, &a.count,
                                &a.threshold})
      SIMCORE_CHECK(!overlap(a.workspace, *t), "workspace must not overlap the other tensors");
    if (a.rescore)
      for (const TensorView* t : {&a.slack, &a.queries, &a.query_slack, &a.block})
        SIMCORE_CHECK(!overlap(a.workspace, *t), "workspace must not overlap the other tensors");
  }
  if (a.rescore) {
    expect_vector(a.slack, nb, DType::Float32, dev, di);
    expect_vector(a.query_slack, qb, DType::Float32, dev, di);
    SIMCORE_CHECK(std::isfinite(a.slack_rel) && a.slack_rel >= 0 && a.slack_rel < 1,
                  "slack_rel must be in [0, 1), got ", a.slack_rel);
    a.queries.expect_dtype(DType::Float32).expect_ndim(2).expect_size(0, qb).expect_row_major().expect_device(dev, di);
    a.block.expect_ndim(2).expect_size(0, nb).expect_size(1, a.queries.size(1)).expect_row_major().expect_device(dev, di);
    SIMCORE_CHECK_TYPE(a.block.dtype == DType::Float32 || is_half(a.block.dtype),
                       "database block must be float32, float16 or bfloat16, got ", dtype_name(a.block.dtype));
  } else {
    SIMCORE_CHECK_TYPE(a.scores.dtype == DType::Float32, "exact (non-rescored) scores must be float32, got ",
                       dtype_name(a.scores.dtype));
  }
}

namespace cpu {
namespace {

template <class T>
inline float load(const T* p, int64_t i) { return to_float(p[i]); }

template <class T>
float dot_generic(const float* q, const T* d, int64_t D) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= D; i += 8)
    for (int t = 0; t < 8; ++t) acc[t] += q[i + t] * to_float(d[i + t]);
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < D; ++i) s += q[i] * to_float(d[i]);
  return s;
}

// Sum of squares of a row in float (16 lanes); non-finite when the row holds
// NaN/Inf or overflows float, in which case the caller redoes it in double.
template <class T>
float row_sumsq_generic(const T* row, int64_t D) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= D; i += 16)
    for (int t = 0; t < 16; ++t) {
      const float v = to_float(row[i + t]);
      acc[t] += v * v;
    }
  float s = 0;
  for (int t = 0; t < 16; ++t) s += acc[t];
  for (; i < D; ++i) {
    const float v = to_float(row[i]);
    s += v * v;
  }
  return s;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SIMCORE_TOPK_AVX512 1
__attribute__((target("avx512f"))) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f"))) inline __m512 load16(const BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
__attribute__((target("avx512f"))) inline __m512 load16(const Float16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <class T>
__attribute__((target("avx512f"))) float row_sumsq_avx512(const T* row, int64_t D) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= D; i += 32) {
    const __m512 x = load16(row + i), y = load16(row + i + 16);
    a0 = _mm512_fmadd_ps(x, x, a0);
    a1 = _mm512_fmadd_ps(y, y, a1);
  }
  for (; i + 16 <= D; i += 16) {
    const __m512 x = load16(row + i);
    a0 = _mm512_fmadd_ps(x, x, a0);
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  for (; i < D; ++i) {
    const float v = to_float(row[i]);
    s += v * v;
  }
  return s;
}

template <class T>
__attribute__((target("avx512f"))) float dot_avx512(const float* q, const T* d, int64_t D) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= D; i += 32) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(d + i), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i + 16), load16(d + i + 16), a1);
  }
  for (; i + 16 <= D; i += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(d + i), a0);
  float s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  for (; i < D; ++i) s += q[i] * to_float(d[i]);
  return s;
}

// Rounds a row to bfloat16, nearest even, quiet NaNs (bit-exact with
// to_bfloat16 in common/half.h and torch); returns ||bf16(row) - row||^2, whose
// terms are exact in float32 (the error fits in the dropped 16 bits).
template <class T>
__attribute__((target("avx512f"))) float row_to_bf16_avx512(const T* row, BFloat16* out, int64_t D) {
  const __m512i one = _mm512_set1_epi32(1), half_ulp = _mm512_set1_epi32(0x7fff), quiet = _mm512_set1_epi32(0x400000);
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  __m512 err = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= D; i += 16) {
    const __m512 x = load16(row + i);
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(half_ulp, lsb));
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_or_si512(u, quiet));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
    const __m512 f = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_and_si512(r, high)), x);
    err = _mm512_fmadd_ps(f, f, err);
  }
  float e = _mm512_reduce_add_ps(err);
  for (; i < D; ++i) {
    const float x = to_float(row[i]);
    out[i] = to_bfloat16(x);
    const float f = to_float(out[i]) - x;
    e += f * f;
  }
  return e;
}

inline bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}
#endif

// Exact float32 rescoring dot product (summation order is the implementation's).
template <class T>
inline float dot(const float* q, const T* d, int64_t D) {
#ifdef SIMCORE_TOPK_AVX512
  if (cpu_has_avx512()) return dot_avx512<T>(q, d, D);
#endif
  return dot_generic<T>(q, d, D);
}

template <class T>
inline float row_to_bf16(const T* row, BFloat16* out, int64_t D) {
#ifdef SIMCORE_TOPK_AVX512
  if (cpu_has_avx512()) return row_to_bf16_avx512<T>(row, out, D);
#endif
  float e = 0;
  for (int64_t i = 0; i < D; ++i) {
    const float x = to_float(row[i]);
    out[i] = to_bfloat16(x);
    const float f = to_float(out[i]) - x;
    e += f * f;
  }
  return e;
}

template <class T>
inline float row_sumsq(const T* row, int64_t D) {
#ifdef SIMCORE_TOPK_AVX512
  if (cpu_has_avx512()) return row_sumsq_avx512<T>(row, D);
#endif
  return row_sumsq_generic<T>(row, D);
}

template <class T>
void prepare_rows(const TopkPrepareArgs& a, int num_threads, std::atomic<int64_t>& bad) {
  const int64_t nb = a.block.size(0), D = a.block.size(1), rs = a.block.stride(0);
  const T* base = a.block.ptr<T>();
  float* scale = a.scale.ptr<float>();
  float* slack = a.slack.ptr<float>();
  BFloat16* conv = a.convert ? a.converted.ptr<BFloat16>() : nullptr;
  const double slack_floor = a.slack_factor > 0 ? topk_slack_floor(D) : 0.0;
  const int64_t min_rows = std::max<int64_t>(64, (int64_t{1} << 21) / std::max<int64_t>(1, D));
  parallel_for(nb, num_threads, min_rows, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const T* row = base + j * rs;
      // The row is in L1 for the norm below. The error norm can only be rounded
      // down by a few float32 ulps, far inside the 1.25 margin of the bound.
      const double ferr = conv ? std::sqrt(static_cast<double>(row_to_bf16<T>(row, conv + j * D, D))) : 0.0;
      double ss = row_sumsq<T>(row, D);
      if (!std::isfinite(ss)) {  // NaN/Inf, or only a float overflow: redo in double
        ss = 0;
        for (int64_t i = 0; i < D; ++i) {
          const double v = to_float(row[i]);
          ss += v * v;
        }
      }
      if (!(ss <= kTopkMaxRowNorm * kTopkMaxRowNorm)) {  // NaN/Inf in the row, or beyond float32 arithmetic
        int64_t cur = bad.load();
        while (j < cur && !bad.compare_exchange_weak(cur, j)) {}
        scale[j] = 0.f;
        slack[j] = 0.f;
        continue;
      }
      const double norm = std::sqrt(ss);
      const double s = a.cosine ? 1.0 / std::max(norm, 1e-12) : 1.0;
      scale[j] = static_cast<float>(s);
      slack[j] = a.slack_factor > 0 ? static_cast<float>((a.slack_factor * norm + ferr + slack_floor) * s) : 0.f;
    }
  });
}

// Better in the result order: larger score, then lower index.
inline bool better(const TopkEntry& x, const TopkEntry& y) {
  return x.score > y.score || (x.score == y.score && x.index < y.index);
}

// Keeps the k best of e[0, n) in e[0, k); returns the k-th best score.
inline float compact(TopkEntry* e, int64_t n, int64_t k) {
  std::nth_element(e, e + (k - 1), e + n, better);
  return e[k - 1].score;
}

// ---- the threshold scan: index of the first j in [j, nb) whose scaled score
// can beat thr (exact: s*scale > thr; approximate: !(s*scale + qn*slack <= thr),
// so NaN counts as a hit and the exact rescoring decides), or nb.
template <class S, bool Rescore>
inline bool hit_scalar(const S* s, const float* scale, const float* slack, float qn, float rel, float thr,
                       int64_t j) {
  const float v = to_float(s[j]) * scale[j];
  return Rescore ? !(v + qn * slack[j] + rel * std::fabs(v) <= thr) : v > thr;
}

template <class S, bool Rescore>
int64_t next_hit_generic(const S* s, const float* scale, const float* slack, float qn, float rel, float thr,
                         int64_t j, int64_t nb) {
  constexpr int W = 16;
  for (; j + W <= nb; j += W) {
    int hit = 0;
    for (int t = 0; t < W; ++t) {
      const float v = to_float(s[j + t]) * scale[j + t];
      hit |= Rescore ? !(v + qn * slack[j + t] + rel * std::fabs(v) <= thr) : v > thr;
    }
    if (hit) break;
  }
  for (; j < nb; ++j)
    if (hit_scalar<S, Rescore>(s, scale, slack, qn, rel, thr, j)) return j;
  return nb;
}

#ifdef SIMCORE_TOPK_AVX512
template <class S, bool Rescore>
__attribute__((target("avx512f"))) int64_t next_hit_avx512(const S* s, const float* scale, const float* slack,
                                                            float qn, float rel, float thr, int64_t j, int64_t nb) {
  const __m512 t = _mm512_set1_ps(thr);
  const __m512 qv = _mm512_set1_ps(qn);
  const __m512 rv = _mm512_set1_ps(rel);
  for (; j + 16 <= nb; j += 16) {
    __m512 v = _mm512_mul_ps(load16(s + j), _mm512_loadu_ps(scale + j));
    __mmask16 m;
    if (Rescore) {
      v = _mm512_add_ps(_mm512_add_ps(v, _mm512_mul_ps(qv, _mm512_loadu_ps(slack + j))),
                        _mm512_mul_ps(rv, _mm512_abs_ps(v)));
      m = _mm512_cmp_ps_mask(v, t, _CMP_NLE_UQ);
    } else {
      m = _mm512_cmp_ps_mask(v, t, _CMP_GT_OQ);
    }
    if (m) {  // confirm with the scalar rule (identical for exact scores)
      for (int u = 0; u < 16; ++u)
        if (hit_scalar<S, Rescore>(s, scale, slack, qn, rel, thr, j + u)) return j + u;
    }
  }
  for (; j < nb; ++j)
    if (hit_scalar<S, Rescore>(s, scale, slack, qn, rel, thr, j)) return j;
  return nb;
}

#endif

template <class S, bool Rescore>
inline int64_t next_hit(const S* s, const float* scale, const float* slack, float qn, float rel, float thr,
                        int64_t j, int64_t nb) {
#ifdef SIMCORE_TOPK_AVX512
  if constexpr (std::is_same_v<S, float> || std::is_same_v<S, BFloat16>) {
    if (cpu_has_avx512()) return next_hit_avx512<S, Rescore>(s, scale, slack, qn, rel, thr, j, nb);
  }
#endif
  return next_hit_generic<S, Rescore>(s, scale, slack, qn, rel, thr, j, nb);
}

template <class S, class B, bool Rescore>
void update_rows(const TopkUpdateArgs& a, int num_threads) {
  const int64_t qb = a.scores.size(0), nb = a.scores.size(1);
  const int64_t cap = a.reservoir.size(1), k = a.k;
  const S* scores = a.scores.ptr<S>();
  const int64_t ss = a.scores.stride(0);
  const float* scale = a.scale.ptr<float>();
  const float* slack = Rescore ? a.slack.ptr<float>() : nullptr;
  const float* qn = Rescore ? a.query_slack.ptr<float>() : nullptr;
  const float rel = Rescore ? static_cast<float>(a.slack_rel) : 0.f;
  const float* qv = Rescore ? a.queries.ptr<float>() : nullptr;
  const int64_t qs = Rescore ? a.queries.stride(0) : 0;
  const B* dv = Rescore ? a.block.ptr<B>() : nullptr;
  const int64_t ds = Rescore ? a.block.stride(0) : 0;
  const int64_t D = Rescore ? a.block.size(1) : 0;
  const int64_t* eoff = a.excl_offsets.ptr<int64_t>();
  const int64_t* eidx = a.excl_index.ptr<int64_t>();
  TopkEntry* res = a.reservoir.ptr<TopkEntry>();
  int64_t* count = a.count.ptr<int64_t>();
  float* thr_all = a.threshold.ptr<float>();
  const int64_t base = a.db_base;

  // The scan is cheap next to the GEMM (~1 ns per score): split a tile over
  // threads only when each gets >= 2M scores, since on a busy machine an
  // OpenMP fork/join can cost a whole time slice.
  const int64_t min_rows = std::max<int64_t>(1, (int64_t{1} << 21) / std::max<int64_t>(1, nb));
  // Rescoring reads database rows: walk the tile in column chunks of 256 KB of
  // rows (L2-resident), so a thread's queries rescore from cache. Measured at
  // k=100 (fp32 rows, D=256): update time -35% against whole-tile rows;
  // 128 KB to 512 KB chunks were within noise of each other.
  constexpr int64_t kChunkBytes = int64_t{1} << 18;
  const int64_t chunk = Rescore ? std::max<int64_t>(16, kChunkBytes / std::max<int64_t>(1, D * int64_t(sizeof(B)))) : nb;
  parallel_for(qb, num_threads, min_rows, [&](int64_t rbegin, int64_t rend) {
    for (int64_t c0 = 0; c0 < nb; c0 += chunk) {
      const int64_t c1 = std::min(nb, c0 + chunk);
      for (int64_t r = rbegin; r < rend; ++r) {
        const int64_t q = a.q_begin + r;
        TopkEntry* e = res + q * cap;
        int64_t cnt = count[q];
        float thr = thr_all[q];
        if (cnt < 0 || cnt > cap) continue;  // corrupt state: rejected before the call, never indexed
        // Excluded indices of this query that can fall in this chunk (sorted).
        const int64_t* ex_end = eidx + eoff[q + 1];
        const int64_t* ex = std::lower_bound(eidx + eoff[q], ex_end, base + c0);
        const S* srow = scores + r * ss;
        const float qnorm = Rescore ? qn[r] : 0.f;
        const float* qrow = Rescore ? qv + r * qs : nullptr;

        auto consider = [&](int64_t j, float approx) {
          float exact = approx;
          if (Rescore) exact = dot(qrow, dv + j * ds, D) * scale[j];
          if (!(exact > thr)) return;
          const int64_t idx = base + j;
          while (ex != ex_end && *ex < idx) ++ex;
          if (ex != ex_end && *ex == idx) return;
          if (cnt == cap) {
            thr = compact(e, cnt, k);
            cnt = k;
            if (!(exact > thr)) return;
          }
          e[cnt].score = exact;
          e[cnt].pad = 0;
          e[cnt].index = idx;
          ++cnt;
        };

        int64_t j = c0;
        while ((j = next_hit<S, Rescore>(srow, scale, slack, qnorm, rel, thr, j, c1)) < c1) {
          consider(j, load(srow, j) * scale[j]);
          ++j;
        }
        count[q] = cnt;
        thr_all[q] = thr;
      }
    }
  });
}

template <class S>
void update_dispatch_block(const TopkUpdateArgs& a, int num_threads) {
  switch (a.block.dtype) {
    case DType::BFloat16: return update_rows<S, BFloat16, true>(a, num_threads);
    case DType::Float16: return update_rows<S, Float16, true>(a, num_threads);
    case DType::Float32: return update_rows<S, float, true>(a, num_threads);
    default: throw TypeError("unsupported database dtype");
  }
}

}  // namespace

bool has_fast_bf16() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

void cosine_topk_prepare_block(const TopkPrepareArgs& a, int num_threads) {
  check_prepare_args(a);
  a.block.expect_device(Device::CPU, 0);
  std::atomic<int64_t> bad{kTopkNoBadRow};
  switch (a.block.dtype) {
    case DType::Float32: prepare_rows<float>(a, num_threads, bad); break;
    case DType::BFloat16: prepare_rows<BFloat16>(a, num_threads, bad); break;
    case DType::Float16: prepare_rows<Float16>(a, num_threads, bad); break;
    default: throw TypeError("unsupported database dtype");
  }
  int64_t* status = a.status.ptr<int64_t>();
  const int64_t b = bad.load();
  if (b != kTopkNoBadRow) *status = std::min(*status, a.row_base + b);
}

void cosine_topk_update(const TopkUpdateArgs& a, int num_threads) {
  check_update_args(a);
  a.scores.expect_device(Device::CPU, 0);
  // Host memory: validate the exclusion CSR values too (offsets index memory).
  const int64_t Q = a.reservoir.size(0), E = a.excl_index.size(0);
  const int64_t* off = a.excl_offsets.ptr<int64_t>();
  const int64_t* idx = a.excl_index.ptr<int64_t>();
  SIMCORE_CHECK(off[0] == 0 && off[Q] == E, "exclude offsets must start at 0 and end at ", E);
  for (int64_t q = 0; q < Q; ++q)
    SIMCORE_CHECK(off[q] <= off[q + 1] && off[q + 1] <= E, "exclude offsets must be non-decreasing within [0, ", E,
                  "] (query ", q, ")");
  for (int64_t q = 0; q < Q; ++q) {
    for (int64_t i = off[q] + 1; i < off[q + 1]; ++i)
      SIMCORE_CHECK(idx[i - 1] <= idx[i], "exclude indices must be sorted within each query (query ", q, ")");
  }
  const int64_t* cnt = a.count.ptr<int64_t>();
  const int64_t cap = a.reservoir.size(1);
  for (int64_t q = a.q_begin; q < a.q_begin + a.scores.size(0); ++q)
    SIMCORE_CHECK(cnt[q] >= 0 && cnt[q] <= cap, "reservoir count of query ", q, " is out of range");
  if (!a.rescore) return update_rows<float, float, false>(a, num_threads);
  switch (a.scores.dtype) {
    case DType::BFloat16: return update_dispatch_block<BFloat16>(a, num_threads);
    case DType::Float16: return update_dispatch_block<Float16>(a, num_threads);
    case DType::Float32: return update_dispatch_block<float>(a, num_threads);
    default: throw TypeError("unsupported scores dtype");
  }
}

}  // namespace cpu
}  // namespace simcore
