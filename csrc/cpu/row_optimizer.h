// Sparse row optimizers: the update of PartialMarginHead's sampled centre rows, in place.
//
// A step of the head touches the n sampled rows of a (C, D) weight and of its optimizer
// state, nothing else. Done with torch ops it is ~15 passes over (n, D) temporaries
// (gather, arithmetic, scatter back); here it is one pass that reads each row's gradient
// and state once and writes them back where they live (csrc/cpu/row_optimizer.cpp,
// csrc/cuda/row_optimizer.cu; plain-PyTorch reference: simcore/reference/row_optimizer.py).
//
//   row_sgd    PyTorch SGD on rows `rows`: g = grad/scale (+ weight_decay·w);
//              buf = momentum·buf + g; w −= lr·buf (no momentum buffer: w −= lr·g)
//   row_adamw  AdamW with a step count per row: t = row_step[r] + 1;
//              m = β1·m + (1 − β1)·g; v = β2·v + (1 − β2)·g²; w ·= 1 − lr·weight_decay;
//              w −= lr·(m/(1 − β1^t)) / (sqrt(v/(1 − β2^t)) + eps)
//
// weight: (C, D) float32, float16 or bfloat16 (updated in float32, rounded once);
// rows: (n,) int64, strictly increasing, in [0, C); grad: (n, D) float32, row r for
// weight row rows[r]; state: float32 (C, D) rows (row_step: (C,) int64).
// grad_scale (optional, 1 float32): the loss scale still in grad (AMP); found_inf
// (optional, 1 float32): > 0 skips the step (nothing is written). Both are read where
// they live (device memory on CUDA: no synchronisation). The tensors that are written
// must not overlap each other or what is read.
#pragma once

#include <cstdint>

#include "common/tensor_view.h"

namespace simcore {

struct RowSgdParams {
  double lr = 0.1, momentum = 0.0, weight_decay = 0.0;
};

struct RowAdamwParams {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
};

// Argument checks shared by the CPU and CUDA entry points (host side; the row ids'
// values are checked by the CPU entry points only: on CUDA they live on the device).
namespace ro_check {
void sgd(const TensorView& weight, const TensorView& rows, const TensorView& grad, const TensorView* momentum_buffer,
         const TensorView* grad_scale, const TensorView* found_inf, const RowSgdParams& p);
void adamw(const TensorView& weight, const TensorView& rows, const TensorView& grad, const TensorView& exp_avg,
           const TensorView& exp_avg_sq, const TensorView& row_step, const TensorView* grad_scale,
           const TensorView* found_inf, const RowAdamwParams& p);
}  // namespace ro_check

namespace cpu {
void row_sgd(const TensorView& weight, const TensorView& rows, const TensorView& grad,
             const TensorView* momentum_buffer, const TensorView* grad_scale, const TensorView* found_inf,
             const RowSgdParams& p, int num_threads);
void row_adamw(const TensorView& weight, const TensorView& rows, const TensorView& grad, const TensorView& exp_avg,
               const TensorView& exp_avg_sq, const TensorView& row_step, const TensorView* grad_scale,
               const TensorView* found_inf, const RowAdamwParams& p, int num_threads);
}  // namespace cpu

}  // namespace simcore
