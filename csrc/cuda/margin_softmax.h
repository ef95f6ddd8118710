// CUDA epilogues of the margin-softmax loss: host-side declarations (no CUDA
// headers, so the bindings can include it). Same names, arguments and checks
// as csrc/cpu/margin_softmax.h; `stream` is torch's current cudaStream_t as an
// integer. Kernels are launched asynchronously on that stream and allocate nothing.
#pragma once

#include <cstdint>

#include "common/tensor_view.h"
#include "cpu/margin_softmax.h"

namespace simcore {
namespace cuda {

void normalize_rows(const TensorView& src, const TensorView* index, const TensorView& out,
                    const TensorView& norms, double eps, uint64_t stream);
void targets(const TensorView& labels, const TensorView& sampled, int64_t num_classes, const TensorView& out,
             uint64_t stream);
// dyn: see apply_dynamic (read by the kernels from device memory: no host read).
void lse_block(const TensorView& cos, const TensorView& target_col, int64_t col0, const MarginParams& p,
               const TensorView* dyn, const TensorView* row_margins, const TensorView& run_max,
               const TensorView& run_sum, const TensorView& target_cos, const TensorView& target_logit,
               uint64_t stream);
void grad_block(const TensorView& cos, const TensorView& target_col, int64_t col0, const MarginParams& p,
                const TensorView* dyn, const TensorView* row_margins, const TensorView& lse,
                const TensorView& row_weight, const TensorView& target_cos, uint64_t stream);
void subcenter_max(const TensorView& cos_k, int64_t k, const TensorView& out, const TensorView& argmax,
                   uint64_t stream);
void subcenter_expand(const TensorView& grad, const TensorView& argmax, int64_t k, const TensorView& out,
                      uint64_t stream);
void project_rows(const TensorView& u, const TensorView& v, const TensorView& norms, const TensorView& out,
                  const TensorView* out_index, double eps, uint64_t stream);

}  // namespace cuda
}  // namespace simcore
