// Fused epilogues of the margin-softmax loss (simcore.margin_softmax_partial).
//
// The GEMMs run through torch between these calls (see simcore/margin_softmax.py);
// these kernels are the work between them, in the same vocabulary on CPU
// (csrc/cpu/margin_softmax.cpp) and CUDA (csrc/cuda/margin_softmax.cu):
//
//   normalize_rows  gather rows of x or W (optionally by index), convert to the
//                   GEMM operand dtype (float32, bfloat16 or float16), divide by
//                   max(‖row‖, eps), keep the norms
//   targets         label -> column in the sorted sampled set (range-checked)
//   lse_block       a float32 block of cosines -> margin on the target, online log-sum-exp
//   grad_block      the same block, in place -> row_weight·(softmax − one-hot)·dlogit/dcos
//                   (dψ/dcos θ on the target column)
//   subcenter_max   (sub-centre ArcFace) a (B × n·K) block of centre cosines -> the
//                   (B × n) class cosines (max over K) and which centre won
//   subcenter_expand  a (B × n) gradient block -> (B × n·K), on the winning centres
//   project_rows    the normalisation Jacobian: (u − (u·v̂)v̂)/‖row‖, written
//                   (scattered by index) into a float32/float16/bfloat16 gradient
//
//   sample_classes  (host only) positives + uniform negatives without replacement
//
// Every entry point re-checks shapes, dtypes, devices and index ranges. Inputs and
// gradients are float32, float16 or bfloat16 (float64 runs the Python reference).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/tensor_view.h"

#ifdef __CUDACC__
#define SIMCORE_HD __host__ __device__
#else
#define SIMCORE_HD
#endif

namespace simcore {

// The margin family (docs/margin_softmax.md), one set of parameters per call.
// Target: ψ(θ) = cos(m1·θ + m2) − m3 up to θ* = (π − m2)/m1, cos θ − cos θ* − 1 − m3
// beyond; with m2 < 0 (AdaFace), 1 − m3 below θ = −m2/m1 where m1·θ + m2 < 0; the
// slope dψ/dcos θ uses θ clamped to [sin_eps, π − sin_eps]. m1, m2, m3 may instead
// come per row from a (B, 3) float32 tensor (row_margins).
// Cam-Softmax: cam_power > 0 replaces ψ by 2·((1 + cos θ)/2)^cam_power − 1.
// Non-targets: a cosine above filter_threshold counts as 0 (logit 0, no gradient;
// Partial FC's inter-class filtering); with `curricular`, a cosine a above the
// row's ψ becomes a·(curricular_t + a) (CurricularFace). target_cos is then an
// input: every row's target cosine, known before pass 1.
struct MarginParams {
  double m1 = 1.0, m2 = 0.5, m3 = 0.0, scale = 64.0, sin_eps = 1e-4;
  double cam_power = 0.0;
  double filter_threshold = INFINITY;
  bool curricular = false;
  double curricular_t = 0.0;
};

void check_margin_params(const MarginParams& p);

// The scalars that change between steps (CurricularFace's t, a scheduled Cam-Softmax
// exponent) may come from a float64 tensor `dyn` = (cam_power, curricular_t) instead of
// p (simcore/margin/engine.py: split_dynamic): a value that is not NaN replaces p's. p's
// switches stay as they are (cam_power > 0, curricular): the caller passes placeholders
// that keep the variant on. The kernels read dyn where it lives (host memory on CPU,
// device memory on CUDA), so a CUDA step needs no host read. Returns false when the
// resulting values break check_margin_params' rules (cam_power finite >= 0,
// curricular_t finite); the CPU entry points then raise, the CUDA kernels poison the
// rows they compute (scale NaN: a NaN loss and gradient, never undefined behaviour).
SIMCORE_HD inline bool apply_dynamic(MarginParams& p, double cam_power, double curricular_t) {
  if (cam_power == cam_power) p.cam_power = cam_power;
  if (curricular_t == curricular_t) p.curricular_t = curricular_t;
  // finite: x − x is 0 for finite x, NaN for ±inf and NaN
  return p.cam_power - p.cam_power == 0.0 && p.cam_power >= 0.0 && p.curricular_t - p.curricular_t == 0.0;
}

// ψ and dψ/dcos θ of the combined margin at the target cosine c, in double.
// Beyond θ* the slope is 1, below −m2/m1 it is 0. NaN in, NaN out.
SIMCORE_HD inline void margin_psi(double c, double m1, double m2, double m3, double sin_eps, double* psi,
                                  double* slope) {
  const double pi = 3.14159265358979323846;
  const double cc = c < -1.0 ? -1.0 : (c > 1.0 ? 1.0 : c);
  const double theta = acos(cc);
  const double t_star = (pi - m2) / m1;
  if (theta <= t_star) {
    if (m1 * theta + m2 < 0.0) {  // AdaFace's negative angular margin: cos is flat at 0
      *psi = 1.0 - m3;
      *slope = 0.0;
      return;
    }
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

// The target's ψ and slope for row margins (m1, m2, m3) under p (combined margin or Cam-Softmax).
// Cam's slope p·u^(p−1), u = (1 + c)/2, uses u >= sin_eps (finite for p < 1 at c = −1).
SIMCORE_HD inline void target_psi(double c, const MarginParams& p, double m1, double m2, double m3, double* psi,
                                  double* slope) {
  if (p.cam_power > 0.0) {
    const double cc = c < -1.0 ? -1.0 : (c > 1.0 ? 1.0 : c);
    const double u = 0.5 * (1.0 + cc);
    *psi = c != c ? c : 2.0 * pow(u, p.cam_power) - 1.0;
    *slope = c != c ? c : p.cam_power * pow(u < p.sin_eps ? p.sin_eps : u, p.cam_power - 1.0);
  } else {
    margin_psi(c, m1, m2, m3, p.sin_eps, psi, slope);
  }
}

// Logit of a non-target cosine a and its derivative, for a row whose ψ is `hard`
// (+inf unless curricular). NaN propagates through the logit.
struct NegativeLogit {
  float scale, filter, hard, t;
  SIMCORE_HD float operator()(float a) const {
    const float f = a > filter ? 0.0f : a;
    return f > hard ? scale * f * (t + f) : scale * f;
  }
  SIMCORE_HD float slope(float a) const {
    return a > filter ? 0.0f : (a > hard ? scale * (t + 2.0f * a) : scale);
  }
};

// True when the non-targets are plain s·cos (the fast path).
inline bool plain_negatives(const MarginParams& p) { return !p.curricular && !(p.filter_threshold < INFINITY); }

// Argument checks shared by the CPU and CUDA entry points (host side). `n_rows`
// etc. come from the tensors themselves; nothing is trusted from Python.
namespace ms_check {
void normalize_rows(const TensorView& src, const TensorView* index, const TensorView& out,
                    const TensorView& norms);
void targets(const TensorView& labels, const TensorView& sampled, int64_t num_classes, const TensorView& out);
// dyn (optional, both): float64, 2 elements, contiguous, on cos's device.
void lse_block(const TensorView& cos, const TensorView& target_col, int64_t col0, const TensorView* dyn,
               const TensorView* row_margins, const TensorView& run_max, const TensorView& run_sum,
               const TensorView& target_cos, const TensorView& target_logit);
void grad_block(const TensorView& cos, const TensorView& target_col, int64_t col0, const TensorView* dyn,
                const TensorView* row_margins, const TensorView& lse, const TensorView& row_weight,
                const TensorView& target_cos);
void subcenter_max(const TensorView& cos_k, int64_t k, const TensorView& out, const TensorView& argmax);
void subcenter_expand(const TensorView& grad, const TensorView& argmax, int64_t k, const TensorView& out);
void project_rows(const TensorView& u, const TensorView& v, const TensorView& norms, const TensorView& out,
                  const TensorView* out_index);
}  // namespace ms_check

namespace cpu {

void normalize_rows(const TensorView& src, const TensorView* index, const TensorView& out,
                    const TensorView& norms, double eps, int num_threads);
void targets(const TensorView& labels, const TensorView& sampled, int64_t num_classes, const TensorView& out,
             int num_threads);
// dyn: see apply_dynamic (read on the host here; out-of-range values raise).
void lse_block(const TensorView& cos, const TensorView& target_col, int64_t col0, const MarginParams& p,
               const TensorView* dyn, const TensorView* row_margins, const TensorView& run_max,
               const TensorView& run_sum, const TensorView& target_cos, const TensorView& target_logit,
               int num_threads);
void grad_block(const TensorView& cos, const TensorView& target_col, int64_t col0, const MarginParams& p,
                const TensorView* dyn, const TensorView* row_margins, const TensorView& lse,
                const TensorView& row_weight, const TensorView& target_cos, int num_threads);
// Sub-centre ArcFace: out[i, j] = max_k cos_k[i, j·K + k], argmax[i, j] = the first k
// attaining it (uint8, K <= 255; NaN wins). expand writes grad[i, j] to column
// j·K + argmax[i, j] of out and 0 to the other K − 1.
void subcenter_max(const TensorView& cos_k, int64_t k, const TensorView& out, const TensorView& argmax,
                   int num_threads);
void subcenter_expand(const TensorView& grad, const TensorView& argmax, int64_t k, const TensorView& out,
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
