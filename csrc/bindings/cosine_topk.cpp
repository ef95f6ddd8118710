// Bindings of the cosine_topk kernels (CPU and, with SIMCORE_WITH_CUDA, CUDA).
#include "bindings/ops.h"
#include "bindings/tensor_arg.h"

namespace py = pybind11;

namespace simcore {

void bind_cosine_topk(py::module_& m) {}

}  // namespace simcore
