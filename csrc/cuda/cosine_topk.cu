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
//  - half tiles: a chunk's nominees (candidates by the error bound) are listed
//    in shared memory and rescored one warp per nominee: the lanes read the
//    database row and the query with coalesced strided loads, accumulate in
//    float32 (fmaf) and reduce by a fixed shuffle tree (warp_dot), so a
//    nominee's exact score has the same bits in every launch and on both paths
//    below; any float32 summation order is within the bound gamma_D that
//    simcore/search/error_bounds.py assumes;
//  - small tiles (qb <= kTopkSplitMaxRows query rows, with a workspace from
//    Python): one block per query row would leave most SMs idle, so the scan
//    is split in two launches. update_kernel_score_segments runs one block per
//    (row, 256-column segment): nominate against the row's threshold at the
//    start of the tile, rescore, apply the exclusions, and write the segment's
//    exact scores (-inf where nothing passes) and its count of survivors.
//    update_kernel_merge_segments then walks each row's segments in order with one
//    block per row exactly as the one-launch kernel walks its chunks (same
//    chunk boundaries, same threshold tests, same appends and compactions),
//    skipping segments without survivors. Thresholds only rise, so "passed at
//    the tile's threshold and beats the current one" is the one-launch test:
//    both paths leave identical reservoirs;
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
#include <type_traits>

#include "cuda/cosine_topk.cuh"
#include "cuda/kernel_util.cuh"
#include "cuda/runtime.h"

namespace simcore {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
static_assert(kThreads <= kTopkMinSlack, "a compaction must leave room for one chunk");
static_assert(kThreads == kTopkSegment, "a workspace segment is one chunk of one thread block");

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
    const float f = ld(row + i);
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
  int nominee[kThreads];     // rescoring: chunk slots of this chunk's nominees, in slot order
  float rescored[kThreads];  // rescoring: exact score per chunk slot (read only at nominated slots)
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

// Exact float32 dot q . d over D entries, one warp: lane l accumulates entries
// l, l + 32, ... with fmaf (coalesced loads), then a fixed shuffle tree sums the
// lanes into lane 0 (the only lane whose result is used). Every lane of the warp
// must call it (full-mask shuffles): callers loop warp-uniformly.
template <class B>
__device__ __forceinline__ float warp_dot(const float* __restrict__ q, const B* __restrict__ d, int64_t D, int lane) {
  float acc = 0.f;
  for (int64_t i = lane; i < D; i += 32) acc = fmaf(q[i], ld(d + i), acc);
  for (int o = 16; o > 0; o /= 2) acc += __shfl_down_sync(0xffffffffu, acc, o);
  return acc;
}

// Scores column j = c0 + threadIdx.x of one tile row against `thr` (the threshold at
// the chunk's start); returns whether it passes (exact > thr and not excluded) and
// its exact score in *exact. Called by every thread of the block with the same c0
// (it holds barriers when Rescore); threads with j >= nb take part and pass nothing.
template <class S, class B, bool Rescore>
__device__ int score_chunk(const S* __restrict__ srow, int64_t c0, int64_t nb, const float* __restrict__ scale,
                           const float* __restrict__ slack, float qn, const float* __restrict__ qrow,
                           const B* __restrict__ block, int64_t bs, int64_t D, float slack_rel, float thr,
                           const int64_t* __restrict__ eidx, int64_t e0, int64_t e1, int64_t db_base, Shared& sh,
                           float* exact_out) {
  const int64_t j = c0 + threadIdx.x;
  float approx = 0.f;
  int cand = 0;
  if (j < nb) {
    approx = ld(srow + j) * scale[j];
    cand = Rescore ? nominated(approx, qn * slack[j] + slack_rel * fabsf(approx), thr) : approx > thr;
  }
  float exact = approx;
  if (Rescore) {
    // __syncthreads_or is block-uniform, so the barriers inside are reached by every thread or none.
    if (__syncthreads_or(cand)) {
      int total;
      const int pos = block_scan(cand, sh, &total);  // ends with a barrier
      if (cand) sh.nominee[pos] = threadIdx.x;
      __syncthreads();                                // nominee[0, total) written
      const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
      // t and total are the same in all lanes of a warp: the shuffles see full warps
      for (int t = warp; t < total; t += kWarps) {
        const int slot = sh.nominee[t];
        const int64_t jj = c0 + slot;  // < nb: only threads with j < nb nominate
        const float dot = warp_dot(qrow, block + jj * bs, D, lane);
        if (lane == 0) sh.rescored[slot] = dot * scale[jj];
      }
      __syncthreads();  // rescored[] written; the next chunk writes nominee/rescored only after its own barriers
      if (cand) exact = sh.rescored[threadIdx.x];
    }
  }
  int pass = 0;
  if (cand && exact > thr) {
    const int64_t idx = db_base + j;
    int64_t lo = e0, hi = e1;  // binary search for idx among the exclusions
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (eidx[mid] < idx) lo = mid + 1; else hi = mid;
    }
    pass = !(lo < e1 && eidx[lo] == idx);
  }
  *exact_out = exact;
  return pass;
}

// Appends the chunk's passing entries (exact score, database index idx) to the
// reservoir e in index order, compacting it to its k best first when they would not
// fit. Called by every thread with sh.cnt, sh.thr current; `pass` must already hold
// exact > sh.thr (and the exclusions). Ends with a barrier.
__device__ void append_chunk(TopkEntry* e, int pass, float exact, int64_t idx, int64_t cap, int64_t k, Shared& sh) {
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
    e[at].index = idx;
  }
  __syncthreads();
  if (threadIdx.x == 0) sh.cnt = sh.cnt + total > cap ? cap : sh.cnt + total;
  __syncthreads();
}

// The query's exclusions [e0, e1), clamped into [0, E] (values validated in Python).
__device__ __forceinline__ void exclusion_range(const int64_t* eoff, int64_t q, int64_t E, int64_t* e0, int64_t* e1) {
  int64_t a = eoff[q], b = eoff[q + 1];
  a = a < 0 ? 0 : (a > E ? E : a);
  b = b < a ? a : (b > E ? E : b);
  *e0 = a;
  *e1 = b;
}

__device__ __forceinline__ void load_state(Shared& sh, const long long* count, const float* threshold, int64_t q,
                                           int64_t cap) {
  if (threadIdx.x == 0) {
    sh.thr = threshold[q];
    long long c = count[q];
    sh.cnt = (c < 0 || c > cap) ? cap : c;  // never index outside the reservoir
  }
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
  load_state(sh, count, threshold, q, cap);
  int64_t e0, e1;
  exclusion_range(eoff, q, E, &e0, &e1);
  const S* srow = scores + r * ss;
  const float qn = Rescore ? qslack[r] : 0.f;
  const float* qrow = Rescore ? queries + r * qs : nullptr;
  __syncthreads();
  for (int64_t c0 = 0; c0 < nb; c0 += blockDim.x) {
    float exact;
    const int pass = score_chunk<S, B, Rescore>(srow, c0, nb, scale, slack, qn, qrow, block, bs, D, slack_rel, sh.thr,
                                                eidx, e0, e1, db_base, sh, &exact);
    // Once the threshold has warmed up most chunks have no survivor: one barrier, then the next chunk.
    if (!__syncthreads_or(pass)) continue;
    append_chunk(e, pass, exact, db_base + c0 + threadIdx.x, cap, k, sh);
  }
  if (threadIdx.x == 0) {
    count[q] = sh.cnt;
    threshold[q] = sh.thr;
  }
}

// Small tiles, launch 1 of 2: block (segment, row) scores columns
// [segment * kThreads, + kThreads) of tile row `row` against the row's threshold at the
// tile's start (update_kernel_merge_segments raises it only afterwards, on the same stream), and
// writes each column's exact score where it passes, -inf elsewhere (a passing score is
// > threshold >= -inf, so -inf never marks a survivor), and the segment's survivor count.
template <class S, class B, bool Rescore>
__global__ void update_kernel_score_segments(
    const S* __restrict__ scores, int64_t ss, int64_t nb, const float* __restrict__ scale,
    const float* __restrict__ slack, const float* __restrict__ queries, int64_t qs, const float* __restrict__ qslack,
    const B* __restrict__ block, int64_t bs, int64_t D, const int64_t* __restrict__ eoff,
    const int64_t* __restrict__ eidx, int64_t E, const float* __restrict__ threshold, int64_t q_begin,
    int64_t db_base, float slack_rel, float* __restrict__ seg_scores, int* __restrict__ seg_count, int64_t nseg) {
  __shared__ Shared sh;
  const int64_t seg = blockIdx.x, r = blockIdx.y;
  const int64_t q = q_begin + r;
  int64_t e0, e1;
  exclusion_range(eoff, q, E, &e0, &e1);
  const float thr = threshold[q];  // the same value in every thread: control flow stays uniform
  const int64_t c0 = seg * kThreads;
  const float qn = Rescore ? qslack[r] : 0.f;
  const float* qrow = Rescore ? queries + r * qs : nullptr;
  float exact;
  const int pass = score_chunk<S, B, Rescore>(scores + r * ss, c0, nb, scale, slack, qn, qrow, block, bs, D,
                                              slack_rel, thr, eidx, e0, e1, db_base, sh, &exact);
  const int64_t j = c0 + threadIdx.x;
  if (j < nb) seg_scores[r * nb + j] = pass ? exact : -INFINITY;
  const int n = __syncthreads_count(pass);
  if (threadIdx.x == 0) seg_count[r * nseg + seg] = n;
}

// Small tiles, launch 2 of 2: one block per tile row walks its segments in index order
// and merges the survivors as update_kernel merges its chunks. seg_count is read by
// every thread (the same value), so skipping a segment is block-uniform.
__global__ void update_kernel_merge_segments(const float* __restrict__ seg_scores, const int* __restrict__ seg_count,
                                             int64_t nb, int64_t nseg, TopkEntry* __restrict__ reservoir, int64_t cap,
                                             long long* __restrict__ count, float* __restrict__ threshold,
                                             int64_t q_begin, int64_t db_base, int64_t k) {
  __shared__ Shared sh;
  const int64_t r = blockIdx.x;
  const int64_t q = q_begin + r;
  TopkEntry* e = reservoir + q * cap;
  load_state(sh, count, threshold, q, cap);
  __syncthreads();
  for (int64_t seg = 0; seg < nseg; ++seg) {
    if (seg_count[r * nseg + seg] == 0) continue;
    const int64_t j = seg * kThreads + threadIdx.x;
    const float v = j < nb ? seg_scores[r * nb + j] : -INFINITY;
    const int pass = v > sh.thr;  // sh.thr >= the tile's threshold: v passed it, and beats the current one
    if (!__syncthreads_or(pass)) continue;
    append_chunk(e, pass, v, db_base + j, cap, k, sh);
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
  const S* scores = a.scores.ptr<S>();
  const float* slack = Rescore ? a.slack.ptr<float>() : nullptr;
  const float* queries = Rescore ? a.queries.ptr<float>() : nullptr;
  const int64_t qs = Rescore ? a.queries.stride(0) : 0;
  const float* qslack = Rescore ? a.query_slack.ptr<float>() : nullptr;
  const B* block = Rescore ? a.block.ptr<B>() : nullptr;
  const int64_t bs = Rescore ? a.block.stride(0) : 0, D = Rescore ? a.block.size(1) : 0;
  const int64_t nseg = (nb + kThreads - 1) / kThreads;
  if (a.has_workspace && qb <= kTopkSplitMaxRows) {  // small tile: (row, segment) blocks, then a merge
    SIMCORE_CHECK(a.workspace.numel() >= topk_split_workspace(qb, nb), "cosine_topk workspace holds ",
                  a.workspace.numel(), " floats, the tile needs ", topk_split_workspace(qb, nb));
    SIMCORE_CHECK(nseg <= 2147483647LL, "too many column segments in one tile");
    float* seg_scores = a.workspace.ptr<float>();
    int* seg_count = reinterpret_cast<int*>(seg_scores + qb * nb);  // 4-byte slots after the scores
    const dim3 segments_by_rows(static_cast<unsigned>(nseg), static_cast<unsigned>(qb));
    SIMCORE_LAUNCH(segments_by_rows, kThreads, 0, stream, update_kernel_score_segments<S, B, Rescore>)(
            scores, a.scores.stride(0), nb, a.scale.ptr<float>(), slack, queries, qs, qslack, block, bs, D,
            a.excl_offsets.ptr<int64_t>(), a.excl_index.ptr<int64_t>(), a.excl_index.size(0), a.threshold.ptr<float>(),
            a.q_begin, a.db_base, static_cast<float>(a.slack_rel), seg_scores, seg_count, nseg);
    check(cudaGetLastError(), "cosine_topk_update segment kernel launch");
    SIMCORE_LAUNCH(static_cast<unsigned>(qb), kThreads, 0, stream, update_kernel_merge_segments)(
        seg_scores, seg_count, nb, nseg, a.reservoir.ptr<TopkEntry>(), a.reservoir.size(1), a.count.ptr<long long>(),
        a.threshold.ptr<float>(), a.q_begin, a.db_base, a.k);
    check(cudaGetLastError(), "cosine_topk_update merge kernel launch");
    return;
  }
  SIMCORE_LAUNCH(static_cast<unsigned>(qb), kThreads, 0, stream, update_kernel<S, B, Rescore>)(
      scores, a.scores.stride(0), nb, a.scale.ptr<float>(), slack, queries, qs, qslack, block, bs, D,
      a.excl_offsets.ptr<int64_t>(), a.excl_index.ptr<int64_t>(), a.excl_index.size(0),
      a.reservoir.ptr<TopkEntry>(), a.reservoir.size(1), a.count.ptr<long long>(), a.threshold.ptr<float>(),
      a.q_begin, a.db_base, a.k, static_cast<float>(a.slack_rel));
  check(cudaGetLastError(), "cosine_topk_update kernel launch");
}

template <class S>
void update_block_dtype(const TopkUpdateArgs& a, cudaStream_t stream) {
  dispatch_float_dtype(a.block.dtype, "database", [&](auto b) {
    launch_update<S, std::remove_pointer_t<decltype(b)>, true>(a, stream);
  });
}

}  // namespace

void cosine_topk_prepare_block(const TopkPrepareArgs& a, uint64_t stream) {
  check_prepare_args(a);
  const int64_t nb = a.block.size(0);
  if (nb == 0) return;
  const cudaStream_t s = as_stream(stream);
  const unsigned grid = static_cast<unsigned>((nb + kWarps - 1) / kWarps);
  auto* status = a.status.ptr<long long>();
  const double slack_floor = a.slack_factor > 0 ? topk_slack_floor(a.block.size(1)) : 0.0;
  __nv_bfloat16* conv = a.convert ? a.converted.ptr<__nv_bfloat16>() : nullptr;
  dispatch_float_dtype(a.block.dtype, "database", [&](auto b) {
    using T = std::remove_pointer_t<decltype(b)>;
    SIMCORE_LAUNCH(grid, kThreads, 0, s, prepare_kernel<T>)(a.block.ptr<T>(), nb, a.block.size(1), a.block.stride(0),
                                                a.scale.ptr<float>(), a.slack.ptr<float>(), status, a.row_base,
                                                a.cosine, a.slack_factor, slack_floor, conv);
  });
  check(cudaGetLastError(), "cosine_topk_prepare_block kernel launch");
}

void cosine_topk_update(const TopkUpdateArgs& a, uint64_t stream) {
  check_update_args(a);
  SIMCORE_CHECK(a.scores.size(0) <= 2147483647LL, "too many query rows in one tile");
  const cudaStream_t s = as_stream(stream);
  if (!a.rescore) return launch_update<float, float, false>(a, s);
  dispatch_float_dtype(a.scores.dtype, "scores", [&](auto sc) {
    update_block_dtype<std::remove_pointer_t<decltype(sc)>>(a, s);
  });
}

}  // namespace cuda
}  // namespace simcore
