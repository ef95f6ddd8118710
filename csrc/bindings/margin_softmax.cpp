// Bindings of the margin_softmax kernels (CPU and, with SIMCORE_WITH_CUDA, CUDA).
#include "bindings/ops.h"
#include "bindings/tensor_arg.h"

namespace py = pybind11;

namespace simcore {

void bind_margin_softmax(py::module_& m) {}

}  // namespace simcore
