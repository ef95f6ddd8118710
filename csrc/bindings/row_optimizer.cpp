// Bindings of the sparse row optimizers (CPU and, with SIMCORE_WITH_CUDA, CUDA); the
// device of `weight` picks the implementation (run_on_device). `exec` as in
// bindings/margin_softmax.cpp: a thread count for CPU tensors, the stream for CUDA.
#include "bindings/ops.h"
#include "bindings/run_on_device.h"
#include "bindings/tensor_arg.h"
#include "cpu/row_optimizer.h"

#ifdef SIMCORE_WITH_CUDA
#include "cuda/row_optimizer.h"
#endif

namespace py = pybind11;

namespace simcore {
namespace {

void row_sgd(py::handle weight_, py::handle rows_, py::handle grad_, py::handle momentum_buffer_,
             py::handle grad_scale_, py::handle found_inf_, double lr, double momentum, double weight_decay,
             int64_t exec) {
  const TensorView weight = tensor_from_py(weight_, "weight");
  const TensorView rows = tensor_from_py(rows_, "rows");
  const TensorView grad = tensor_from_py(grad_, "grad");
  const auto momentum_buffer = optional_tensor(momentum_buffer_, "momentum_buffer");
  const auto grad_scale = optional_tensor(grad_scale_, "grad_scale");
  const auto found_inf = optional_tensor(found_inf_, "found_inf");
  const RowSgdParams p{lr, momentum, weight_decay};
  run_on_device(SIMCORE_KERNEL(row_sgd), weight, exec_args(exec), weight, rows, grad, ptr(momentum_buffer),
                ptr(grad_scale), ptr(found_inf), p);
}

void row_adamw(py::handle weight_, py::handle rows_, py::handle grad_, py::handle exp_avg_, py::handle exp_avg_sq_,
               py::handle row_step_, py::handle grad_scale_, py::handle found_inf_, double lr, double beta1,
               double beta2, double eps, double weight_decay, int64_t exec) {
  const TensorView weight = tensor_from_py(weight_, "weight");
  const TensorView rows = tensor_from_py(rows_, "rows");
  const TensorView grad = tensor_from_py(grad_, "grad");
  const TensorView exp_avg = tensor_from_py(exp_avg_, "exp_avg");
  const TensorView exp_avg_sq = tensor_from_py(exp_avg_sq_, "exp_avg_sq");
  const TensorView row_step = tensor_from_py(row_step_, "row_step");
  const auto grad_scale = optional_tensor(grad_scale_, "grad_scale");
  const auto found_inf = optional_tensor(found_inf_, "found_inf");
  const RowAdamwParams p{lr, beta1, beta2, eps, weight_decay};
  run_on_device(SIMCORE_KERNEL(row_adamw), weight, exec_args(exec), weight, rows, grad, exp_avg, exp_avg_sq,
                row_step, ptr(grad_scale), ptr(found_inf), p);
}

}  // namespace

void bind_row_optimizer(py::module_& m) {
  m.def("ro_sgd", &row_sgd,
        "in place on rows `rows` of weight (and momentum_buffer): PyTorch SGD with the gradient rows grad "
        "(divided by grad_scale; nothing written when found_inf > 0)",
        py::arg("weight"), py::arg("rows"), py::arg("grad"), py::arg("momentum_buffer"), py::arg("grad_scale"),
        py::arg("found_inf"), py::arg("lr"), py::arg("momentum"), py::arg("weight_decay"), py::arg("exec"));
  m.def("ro_adamw", &row_adamw,
        "in place on rows `rows` of weight, exp_avg, exp_avg_sq and row_step: AdamW with per-row step counts "
        "(grad divided by grad_scale; nothing written when found_inf > 0)",
        py::arg("weight"), py::arg("rows"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
        py::arg("row_step"), py::arg("grad_scale"), py::arg("found_inf"), py::arg("lr"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("exec"));
}

}  // namespace simcore
