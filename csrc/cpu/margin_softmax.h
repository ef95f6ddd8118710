// Fused epilogues of the margin-softmax loss (simcore.margin_softmax_partial).
//
// The GEMMs run through torch between these calls (see simcore/margin_softmax.py);
// these kernels are the work between them, in the same vocabulary on CPU
// (csrc/cpu/margin_softmax.cpp) and CUDA (csrc/cuda/margin_softmax.cu):
//
//   normalize_rows  gather rows of x or W (optionally by index), convert to the
//                   GEMM dtype, divide by max(‖row‖, eps), keep the norms
//   targets         label -> column in the sorted sampled set (range-checked)
//   lse_block       a block of cosines -> margin on the target, online log-sum-exp
//   grad_block      the same block, in place -> row_weight·s·(softmax − one-hot)
//                   with dψ/dcos θ on the target column
//   project_rows    the normalisation Jacobian: (u − (u·v̂)v̂)/‖row‖, written
//                   (scattered by index) into a gradient of any float dtype
//
//   sample_classes  (host only) positives + uniform negatives without replacement
//
// Every entry point re-checks shapes, dtypes, devices and index ranges.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/tensor_view.h"

#ifdef __CUDACC__
#define SIMCORE_HD __host__ __device__
#else
#define SIMCORE_HD
#endif

namespace simcore {

// ψ(θ) = cos(m1·θ + m2) − m3 up to θ* = (π − m2)/m1, cos θ − cos θ* − 1 − m3 beyond;
// the slope dψ/dcos θ uses θ clamped to [sin_eps, π − sin_eps].
struct MarginParams {
  double m1 = 1.0, m2 = 0.5, m3 = 0.0, scale = 64.0, sin_eps = 1e-4;
};

void check_margin_params(const MarginParams& p);

// ψ and dψ/dcos θ at the target cosine c, in double (B evaluations per block).
// Beyond θ* the slope is 1. NaN in, NaN out.
SIMCORE_HD inline void margin_psi(double c, double m1, double m2, double m3, double sin_eps, double* psi,
                                  double* slope) {
  const double pi = 3.14159265358979323846;
  const double cc = c < -1.0 ? -1.0 : (c > 1.0 ? 1.0 : c);
  const double theta = acos(cc);
  const double t_star = (pi - m2) / m1;
  if (theta <= t_star) {
    *psi = cos(m1 * theta + m2) - m3;
    double t = theta < sin_eps ? sin_eps : (theta > pi - sin_eps ? pi - sin_eps : theta);
    *slope = m1 * sin(m1 * t + m2) / sin(t);
  } else if (theta > t_star) {
    *psi = c - cos(t_star) - 1.0 - m3;
    *slope = 1.0;
  } else {  // NaN
    *psi = c;
    *slope = c;
  }
}

// Argument checks shared by the CPU and CUDA entry points (host side). `n_rows`
// etc. come from the tensors themselves; nothing is trusted from Python.
namespace ms_check {
void normalize_rows(const TensorView& src, const TensorView* index, const TensorView& out,
                    const TensorView& norms);
void targets(const TensorView& labels, const TensorView& sampled, int64_t num_classes, const TensorView& out);
void lse_block(const TensorView& cos, const TensorView& target_col, int64_t col0, const TensorView& run_max,
               const TensorView& run_sum, const TensorView& target_cos, const TensorView& target_logit);
void grad_block(const TensorView& cos, const TensorView& target_col, int64_t col0, const TensorView& lse,
                const TensorView& row_weight, const TensorView& target_cos);
void project_rows(const TensorView& u, const TensorView& v, const TensorView& norms, const TensorView& out,
                  const TensorView* out_index);
}  // namespace ms_check

namespace cpu {

void normalize_rows(const TensorView& src, const TensorView* index, const TensorView& out,
                    const TensorView& norms, double eps, int num_threads);
void targets(const TensorView& labels, const TensorView& sampled, int64_t num_classes, const TensorView& out,
             int num_threads);
void lse_block(const TensorView& cos, const TensorView& target_col, int64_t col0, const MarginParams& p,
               const TensorView& run_max, const TensorView& run_sum, const TensorView& target_cos,
               const TensorView& target_logit, int num_threads);
void grad_block(const TensorView& cos, const TensorView& target_col, int64_t col0, const MarginParams& p,
                const TensorView& lse, const TensorView& row_weight, const TensorView& target_cos,
                int num_threads);
void project_rows(const TensorView& u, const TensorView& v, const TensorView& norms, const TensorView& out,
                  const TensorView* out_index, double eps, int num_threads);

// Partial FC sampling on the host: out = sorted(positives ∪ k negatives), the k
// negatives a uniform k-subset of the classes not in `positives` (Floyd's
// algorithm over negative ranks, one 63-bit random per draw from `randoms`).
// `bitmap` holds >= ceil((C − P)/64) zeroed int64 words of workspace. O(k + C/64).
void sample_classes(const TensorView& positives, const TensorView& randoms, int64_t num_classes,
                    const TensorView& bitmap, const TensorView& out);

}  // namespace cpu
}  // namespace simcore
