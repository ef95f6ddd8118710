// CUDA sparse row optimizers: host-side declarations (no CUDA headers, so the bindings
// can include it). Same names, arguments and checks as csrc/cpu/row_optimizer.h;
// `stream` is torch's current cudaStream_t as an integer. Launched asynchronously,
// allocating nothing.
#pragma once

#include <cstdint>

#include "common/tensor_view.h"
#include "cpu/row_optimizer.h"

namespace simcore {
namespace cuda {

void row_sgd(const TensorView& weight, const TensorView& rows, const TensorView& grad,
             const TensorView* momentum_buffer, const TensorView* grad_scale, const TensorView* found_inf,
             const RowSgdParams& p, uint64_t stream);
void row_adamw(const TensorView& weight, const TensorView& rows, const TensorView& grad, const TensorView& exp_avg,
               const TensorView& exp_avg_sq, const TensorView& row_step, const TensorView* grad_scale,
               const TensorView* found_inf, const RowAdamwParams& p, uint64_t stream);

}  // namespace cuda
}  // namespace simcore
