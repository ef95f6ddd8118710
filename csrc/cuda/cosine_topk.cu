// CUDA k-selection epilogues of cosine_topk: the mirror of
// csrc/cpu/cosine_topk.cpp. The tile GEMMs run in cuBLAS through torch (in the
// database's own dtype for float16/bfloat16 databases: read as such); these
// kernels scan the tile, rescore half candidates exactly in float32, apply the
// exclusions and merge into the per-query reservoirs.
//
// Design (straightforward, correct for every k):
//  - one thread block per query row of the tile; the block walks the row in
//    chunks of blockDim elements; candidates (score > threshold) are appended
//    in index order with a block-wide prefix sum, so a reservoir stays sorted
//    by database index;
//  - when a chunk would overflow the reservoir, the block compacts it to its k
//    best entries: an MSB radix select (4 passes of 8 bits over the
//    order-preserving float key) finds the k-th best score T; a stable
//    compaction keeps every entry > T and the first (lowest-index) entries
//    equal to T; the threshold becomes T. Cost O(cap) per compaction, so any
//    k (up to N) works; kTopkMinSlack >= blockDim guarantees room afterwards.
// The final sort of the reservoirs is done by torch in Python (shared code).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "cuda/cosine_topk.cuh"
#include "cuda/runtime.h"

namespace simcore {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
static_assert(kThreads <= kTopkMinSlack, "a compaction must leave room for one chunk");

__device__ __forceinline__ float load_f(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float load_f(const __half* p, int64_t i) { return __half2float(p[i]); }

// ---------------------------------------------------------------- prepare
template <class T>
__global__ void prepare_kernel(const T* __restrict__ block, int64_t nb, int64_t D, int64_t rs,
                               float* __restrict__ scale, float* __restrict__ slack,
                               long long* __restrict__ status, int64_t row_base, bool cosine, double slack_factor,
                               double slack_floor, __nv_bfloat16* __restrict__ converted) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (j >= nb) return;
  const T* row = block + j * rs;
  double ss = 0, ff = 0;  // ||d_j||^2 and ||bf16(d_j) - d_j||^2
  for (int64_t i = lane; i < D; i += 32) {
    const float f = load_f(row, i);
    if (converted) {
      const __nv_bfloat16 b = __float2bfloat16_rn(f);  // nearest even
      converted[j * D + i] = b;
      const double err = static_cast<double>(__bfloat162float(b)) - f;
      ff += err * err;
    }
    const double v = f;
    ss += v * v;
  }
  for (int o = 16; o > 0; o /= 2) {
    ss += __shfl_down_sync(0xffffffffu, ss, o);
    ff += __shfl_down_sync(0xffffffffu, ff, o);
  }
  if (lane != 0) return;
  if (!(ss <= kTopkMaxRowNorm * kTopkMaxRowNorm)) {  // NaN/Inf, or beyond float32 arithmetic
    atomicMin(status, static_cast<long long>(row_base + j));
    scale[j] = 0.f;
    slack[j] = 0.f;
    return;
  }
  const double norm = sqrt(ss);
  const double s = cosine ? 1.0 / fmax(norm, 1e-12) : 1.0;
  scale[j] = static_cast<float>(s);
  slack[j] = slack_factor > 0 ? static_cast<float>((slack_factor * norm + sqrt(ff) + slack_floor) * s) : 0.f;
}

// ---------------------------------------------------------------- update
struct Shared {
  int warp_sums[kWarps + 1];
  unsigned hist[256];
  float thr;
  long long cnt;
  unsigned prefix, mask;
  int want;        // rank still wanted inside the current radix bin
  long long out;   // compaction: entries written so far
  long long eq_seen;
};

// Exclusive block-wide prefix sum of 0/1 flags; *total gets the sum.
__device__ int block_scan(int flag, Shared& sh, int* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  const int prefix = __popc(ballot & ((1u << lane) - 1u));
  if (lane == 0) sh.warp_sums[warp] = __popc(ballot);
  __syncthreads();
  if (threadIdx.x == 0) {
    int s = 0;
    for (int w = 0; w < kWarps; ++w) {
      const int t = sh.warp_sums[w];
      sh.warp_sums[w] = s;
      s += t;
    }
    sh.warp_sums[kWarps] = s;
  }
  __syncthreads();
  const int result = sh.warp_sums[warp] + prefix;
  *total = sh.warp_sums[kWarps];
  __syncthreads();
  return result;
}

// Order-preserving key: larger float -> larger key (no NaN reaches here).
__device__ __forceinline__ unsigned float_key(float f) {
  const unsigned u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_float(unsigned key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// Keeps the k best entries of e[0, n) (score desc, index asc; e is in index
// order) in e[0, k), in index order. Returns the k-th best score.
__device__ float compact(TopkEntry* e, long long n, long long k, Shared& sh) {
  if (threadIdx.x == 0) {
    sh.prefix = 0;
    sh.mask = 0;
    sh.want = static_cast<int>(k);
  }
  __syncthreads();
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) sh.hist[b] = 0;
    __syncthreads();
    const unsigned prefix = sh.prefix, mask = sh.mask;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
      const unsigned key = float_key(e[i].score);
      if ((key & mask) == prefix) atomicAdd(&sh.hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      long long cum = 0;
      for (int d = 255; d >= 0; --d) {
        if (cum + sh.hist[d] >= static_cast<long long>(sh.want)) {
          sh.want -= static_cast<int>(cum);
          sh.prefix |= static_cast<unsigned>(d) << shift;
          sh.mask |= 255u << shift;
          break;
        }
        cum += sh.hist[d];
      }
      sh.out = 0;
      sh.eq_seen = 0;
    }
    __syncthreads();
  }
  const unsigned T = sh.prefix;
  const long long keep_eq = sh.want;  // entries equal to T to keep (lowest indices first)
  for (long long c = 0; c < n; c += blockDim.x) {
    const long long i = c + threadIdx.x;
    TopkEntry v{};
    int gt = 0, eq = 0;
    if (i < n) {
      v = e[i];
      const unsigned key = float_key(v.score);
      gt = key > T;
      eq = key == T;
    }
    int eq_total, keep_total;
    const int eq_rank = block_scan(eq, sh, &eq_total);
    const int keep = gt || (eq && sh.eq_seen + eq_rank < keep_eq);
    const int pos = block_scan(keep, sh, &keep_total);
    if (keep) e[sh.out + pos] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
      sh.out += keep_total;
      sh.eq_seen += eq_total;
    }
    __syncthreads();
  }
  return key_float(T);
}

// Whether a half-GEMM candidate must be rescored exactly: its approximate score
// plus the error bound can beat thr. A non-finite approximate score is always
// nominated: a float16 tile GEMM overflows to +-inf for rows of norm beyond
// 65504 (their cosines can still be anything), and the bound says nothing
// about NaN. The CPU mirror (hit_scalar) nominates the same entries, through
// its NaN-is-a-hit comparison (-inf + inf and 0 * inf give NaN).
__device__ __forceinline__ bool nominated(float approx, float bound, float thr) {
  return !isfinite(approx) || !(approx + bound <= thr);
}

template <class S, class B, bool Rescore>
__global__ void update_kernel(const S* __restrict__ scores, int64_t ss, int64_t nb,
                              const float* __restrict__ scale, const float* __restrict__ slack,
                              const float* __restrict__ queries, int64_t qs, const float* __restrict__ qslack,
                              const B* __restrict__ block, int64_t bs, int64_t D,
                              const int64_t* __restrict__ eoff, const int64_t* __restrict__ eidx, int64_t E,
                              TopkEntry* __restrict__ reservoir, int64_t cap, long long* __restrict__ count,
                              float* __restrict__ threshold, int64_t q_begin, int64_t db_base, int64_t k,
                              float slack_rel) {
  __shared__ Shared sh;
  const int64_t r = blockIdx.x;
  const int64_t q = q_begin + r;
  TopkEntry* e = reservoir + q * cap;
  if (threadIdx.x == 0) {
    sh.thr = threshold[q];
    long long c = count[q];
    sh.cnt = (c < 0 || c > cap) ? cap : c;  // never index outside the reservoir
  }
  // Exclusions of this query, clamped into [0, E] (values validated in Python).
  int64_t e0 = eoff[q], e1 = eoff[q + 1];
  e0 = e0 < 0 ? 0 : (e0 > E ? E : e0);
  e1 = e1 < e0 ? e0 : (e1 > E ? E : e1);
  const S* srow = scores + r * ss;
  const float qn = Rescore ? qslack[r] : 0.f;
  const float* qrow = Rescore ? queries + r * qs : nullptr;
  __syncthreads();
  for (int64_t c0 = 0; c0 < nb; c0 += blockDim.x) {
    const int64_t j = c0 + threadIdx.x;
    const float thr = sh.thr;
    float exact = 0.f;
    int pass = 0;
    if (j < nb) {
      const float approx = load_f(srow, j) * scale[j];
      const bool cand = Rescore ? nominated(approx, qn * slack[j] + slack_rel * fabsf(approx), thr) : approx > thr;
      if (cand) {
        exact = approx;
        if (Rescore) {
          const B* drow = block + j * bs;
          float acc = 0.f;
          for (int64_t i = 0; i < D; ++i) acc = fmaf(qrow[i], load_f(drow, i), acc);
          exact = acc * scale[j];
        }
        if (exact > thr) {
          const int64_t idx = db_base + j;
          int64_t lo = e0, hi = e1;  // binary search for idx among the exclusions
          while (lo < hi) {
            const int64_t mid = (lo + hi) / 2;
            if (eidx[mid] < idx) lo = mid + 1; else hi = mid;
          }
          pass = !(lo < e1 && eidx[lo] == idx);
        }
      }
    }
    // Once the threshold has warmed up most chunks have no survivor: one barrier, then the next chunk.
    if (!__syncthreads_or(pass)) continue;
    int total;
    int pos = block_scan(pass, sh, &total);
    if (sh.cnt + total > cap && sh.cnt > k) {  // uniform: shared values
      const float t = compact(e, sh.cnt, k, sh);
      __syncthreads();
      if (threadIdx.x == 0) {
        sh.thr = t;
        sh.cnt = k;
      }
      __syncthreads();
      pass = pass && exact > sh.thr;
      pos = block_scan(pass, sh, &total);
    }
    const long long at = sh.cnt + pos;
    if (pass && at < cap) {
      e[at].score = exact;
      e[at].pad = 0;
      e[at].index = db_base + j;
    }
    __syncthreads();
    if (threadIdx.x == 0) sh.cnt = sh.cnt + total > cap ? cap : sh.cnt + total;
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    count[q] = sh.cnt;
    threshold[q] = sh.thr;
  }
}

template <class S, class B, bool Rescore>
void launch_update(const TopkUpdateArgs& a, cudaStream_t stream) {
  const int64_t qb = a.scores.size(0), nb = a.scores.size(1);
  if (qb == 0 || nb == 0) return;
  update_kernel<S, B, Rescore><<<static_cast<unsigned>(qb), kThreads, 0, stream>>>(
      a.scores.ptr<S>(), a.scores.stride(0), nb, a.scale.ptr<float>(),
      Rescore ? a.slack.ptr<float>() : nullptr, Rescore ? a.queries.ptr<float>() : nullptr,
      Rescore ? a.queries.stride(0) : 0, Rescore ? a.query_slack.ptr<float>() : nullptr,
      Rescore ? a.block.ptr<B>() : nullptr, Rescore ? a.block.stride(0) : 0, Rescore ? a.block.size(1) : 0,
      a.excl_offsets.ptr<int64_t>(), a.excl_index.ptr<int64_t>(), a.excl_index.size(0),
      a.reservoir.ptr<TopkEntry>(), a.reservoir.size(1), a.count.ptr<long long>(), a.threshold.ptr<float>(),
      a.q_begin, a.db_base, a.k, static_cast<float>(a.slack_rel));
  check(cudaGetLastError(), "cosine_topk_update kernel launch");
}

template <class S>
void update_block_dtype(const TopkUpdateArgs& a, cudaStream_t stream) {
  switch (a.block.dtype) {
    case DType::BFloat16: return launch_update<S, __nv_bfloat16, true>(a, stream);
    case DType::Float16: return launch_update<S, __half, true>(a, stream);
    case DType::Float32: return launch_update<S, float, true>(a, stream);
    default: throw TypeError("unsupported database dtype");
  }
}

}  // namespace

void cosine_topk_prepare_block(const TopkPrepareArgs& a, uint64_t stream) {
  check_prepare_args(a);
  const int64_t nb = a.block.size(0);
  if (nb == 0) return;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(stream));
  const unsigned grid = static_cast<unsigned>((nb + kWarps - 1) / kWarps);
  auto* status = a.status.ptr<long long>();
  const double slack_floor = a.slack_factor > 0 ? topk_slack_floor(a.block.size(1)) : 0.0;
  __nv_bfloat16* conv = a.convert ? a.converted.ptr<__nv_bfloat16>() : nullptr;
  switch (a.block.dtype) {
    case DType::Float32:
      prepare_kernel<float><<<grid, kThreads, 0, s>>>(a.block.ptr<float>(), nb, a.block.size(1), a.block.stride(0),
                                                      a.scale.ptr<float>(), a.slack.ptr<float>(), status, a.row_base,
                                                      a.cosine, a.slack_factor, slack_floor, conv);
      break;
    case DType::BFloat16:
      prepare_kernel<__nv_bfloat16><<<grid, kThreads, 0, s>>>(
          a.block.ptr<__nv_bfloat16>(), nb, a.block.size(1), a.block.stride(0), a.scale.ptr<float>(),
          a.slack.ptr<float>(), status, a.row_base, a.cosine, a.slack_factor, slack_floor, conv);
      break;
    case DType::Float16:
      prepare_kernel<__half><<<grid, kThreads, 0, s>>>(a.block.ptr<__half>(), nb, a.block.size(1), a.block.stride(0),
                                                       a.scale.ptr<float>(), a.slack.ptr<float>(), status,
                                                       a.row_base, a.cosine, a.slack_factor, slack_floor, conv);
      break;
    default: throw TypeError("unsupported database dtype");
  }
  check(cudaGetLastError(), "cosine_topk_prepare_block kernel launch");
}

void cosine_topk_update(const TopkUpdateArgs& a, uint64_t stream) {
  check_update_args(a);
  SIMCORE_CHECK(a.scores.size(0) <= 2147483647LL, "too many query rows in one tile");
  cudaStream_t s = reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(stream));
  if (!a.rescore) return launch_update<float, float, false>(a, s);
  switch (a.scores.dtype) {
    case DType::BFloat16: return update_block_dtype<__nv_bfloat16>(a, s);
    case DType::Float16: return update_block_dtype<__half>(a, s);
    case DType::Float32: return update_block_dtype<float>(a, s);
    default: throw TypeError("unsupported scores dtype");
  }
}

}  // namespace cuda
}  // namespace simcore
