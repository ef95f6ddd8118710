// Each op's binding file registers its functions on the module.
#pragma once

#include <pybind11/pybind11.h>

namespace simcore {
void bind_margin_softmax(pybind11::module_& m);
void bind_cosine_topk(pybind11::module_& m);
void bind_row_optimizer(pybind11::module_& m);
}  // namespace simcore
