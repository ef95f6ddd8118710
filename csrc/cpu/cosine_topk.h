// cosine_topk: k-selection epilogues of the blocked exact cosine / inner-product
// search. The Python layer (simcore/cosine_topk.py) runs the GEMM of each tile
// (queries block x database block) through torch; these kernels do the rest:
//
//   cosine_topk_prepare_block  per database block: row norms -> the score scale
//                              (1/||d_j|| for cosine, 1 for inner product), the
//                              candidate slack for approximate (half) GEMMs, the
//                              first non-finite row (reported, not thrown) and,
//                              optionally, the block rounded to bfloat16.
//   cosine_topk_update         per tile: threshold scan of the tile's scores,
//                              optional exact float32 rescoring of candidates
//                              (half databases), exclusion, and the merge into
//                              the per-query running top-k reservoirs.
//
// The per-query state is a reservoir of `cap` >= k + kMinSlack entries
// (score, index) plus a count and a threshold, all allocated by torch. An
// entry is accepted iff its score is > the query's threshold (-inf at start,
// so NaN and -inf scores are never accepted). When a reservoir is full it is
// compacted to its k best entries in the order (score desc, index asc) and the
// threshold becomes the k-th best score: any later database row has a higher
// index, so it beats the k-th entry only with a strictly larger score. The
// result is therefore exactly the first k of a stable descending sort.
//
// The same names exist in csrc/cuda/cosine_topk.cu (namespace simcore::cuda).
// This header is host-only and shared by both.
#pragma once

#include <cstdint>

#include "common/tensor_view.h"

namespace simcore {

// One reservoir slot; the Python side allocates an int64 tensor (Q, cap, 2)
// and reads scores through a float32 view of column 0 (little-endian).
struct TopkEntry {
  float score;
  uint32_t pad;
  int64_t index;
};
static_assert(sizeof(TopkEntry) == 16, "TopkEntry must be 16 bytes");

// Sentinel for "no non-finite row seen" in the status tensor.
constexpr int64_t kTopkNoBadRow = INT64_MAX;
// Rows with a larger norm are rejected like NaN/Inf rows: their float32 dot
// products (GEMM and rescoring) can overflow before the 1/norm scale applies.
constexpr double kTopkMaxRowNorm = 1e38;

struct TopkPrepareArgs {
  TensorView block;   // (nb, D) float32 / float16 / bfloat16 database rows (row-major)
  TensorView scale;   // (nb) float32 out: 1/max(||d_j||, 1e-12) (cosine) or 1
  // (nb) float32 out: (slack_factor * ||d_j|| + ||bf16(d_j) - d_j|| (when convert)
  // + topk_slack_floor(D)) * scale_j when slack_factor > 0, else 0.
  TensorView slack;
  TensorView status;  // (1) int64 in/out: min(status, row_base + first non-finite row)
  // (nb, D) bfloat16 out when convert: the block rounded to nearest even, written
  // in the same pass as the norms (the operand of a bfloat16 candidate GEMM).
  TensorView converted;
  int64_t row_base = 0;
  bool cosine = true;
  bool convert = false;
  double slack_factor = 0.0;
};

struct TopkUpdateArgs {
  TensorView scores;       // (qb, nb) float32 (exact) or bfloat16/float16 (approximate) raw tile scores
  TensorView scale;        // (nb) float32 from prepare
  TensorView slack;        // (nb) float32 from prepare (used when rescore)
  TensorView queries;      // (qb, D) float32 (normalised) queries of the tile (used when rescore)
  TensorView query_slack;  // (qb) float32 per-query multiplier m_q of slack_j (used when rescore)
  TensorView block;        // (nb, D) database rows in their own dtype (used when rescore)
  TensorView excl_offsets; // (Q + 1) int64 CSR offsets of the excluded indices per query
  TensorView excl_index;   // (E) int64, sorted ascending within each query
  TensorView reservoir;    // (Q, cap, 2) int64 = TopkEntry[Q][cap]
  TensorView count;        // (Q) int64
  TensorView threshold;    // (Q) float32
  int64_t q_begin = 0;     // first query row of this tile
  int64_t db_base = 0;     // database index of the tile's first row
  int64_t k = 1;
  int64_t n_total = -1;    // database rows in all, -1 when unknown (streams)
  bool rescore = false;
  // Rescoring nominates row j when !(v + m_q * slack_j + slack_rel * |v| <= thr),
  // v = scores * scale_j: slack_rel bounds the rounding of the GEMM's output.
  double slack_rel = 0.0;
  // CUDA, tiles of at most kTopkSplitMaxRows query rows: float32 scratch of at least
  // topk_split_workspace(qb, nb) elements (allocated by torch), which lets the scan
  // run one thread block per (row, segment). Optional; the CPU ignores it.
  TensorView workspace;
  bool has_workspace = false;
};

// CUDA small tiles (see cuda/cosine_topk.cu): tiles of up to this many query rows
// are scanned by (row, kTopkSegment-column segment) blocks when a workspace is given.
constexpr int64_t kTopkSplitMaxRows = 64;
constexpr int64_t kTopkSegment = 256;
// Elements of that workspace: qb x nb float32 scores, then qb x ceil(nb / segment) int32 counts.
inline int64_t topk_split_workspace(int64_t qb, int64_t nb) {
  return qb * nb + qb * ((nb + kTopkSegment - 1) / kTopkSegment);
}

// Absolute part of the candidate slack of an approximate (half) GEMM, added
// to slack_factor * ||d_j|| before scaling. The relative bound fails near
// float32's underflow: AVX-512 BF16 GEMMs treat subnormal inputs as zero and
// flush subnormal sums, each costing up to 2^-126 (at most 2D + 1 such
// errors, plus 2^-126 * sqrt(D) * ||q|| from subnormal row entries). With
// ||q|| <= 1 (cosine) this is <= (D + 1) * 2^-124; 2^-120 leaves margin, and
// makes tiny-norm rows (scale ~ 1/||d_j||) always rescored instead of missed.
inline double topk_slack_floor(int64_t D) { return static_cast<double>(D + 1) * 0x1p-120; }

// Reservoir capacity rule: cap > n_total (a known database size: the reservoir
// never fills), or cap >= k + kTopkMinSlack on CUDA (the kernel appends up to
// one thread block of candidates after a compaction), cap >= k + 1 on the CPU.
constexpr int64_t kTopkMinSlack = 256;

// Boundary checks shared by the CPU and CUDA entry points: shapes, dtypes,
// strides, one device for all tensors, k and capacity ranges, and the
// exclusion CSR (offsets monotone inside [0, E]; indices sorted per query).
void check_prepare_args(const TopkPrepareArgs& a);
void check_update_args(const TopkUpdateArgs& a);

namespace cpu {
// True when the CPU has AVX-512 BF16 (bfloat16 GEMMs run at about twice the
// float32 rate): cosine_topk then nominates float32 candidates with them.
bool has_fast_bf16();
void cosine_topk_prepare_block(const TopkPrepareArgs& a, int num_threads);
void cosine_topk_update(const TopkUpdateArgs& a, int num_threads);
}  // namespace cpu

}  // namespace simcore
