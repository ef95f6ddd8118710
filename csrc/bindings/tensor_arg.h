// Python -> TensorView at the boundary. simcore/dispatch.py:tensor_arg()
// packs a torch tensor as a tuple; this re-checks every field, because the
// core never trusts Python.
#pragma once

#include <pybind11/pybind11.h>

#include <optional>

#include "common/tensor_view.h"

namespace simcore {

// Tuple layout: (data_ptr, storage_ptr, storage_nbytes, dtype, device,
//                device_index, shape, strides)
TensorView tensor_from_py(const pybind11::handle& obj, const char* name);

// An optional tensor argument: None, or a packed tensor checked as above.
inline std::optional<TensorView> optional_tensor(const pybind11::handle& obj, const char* name) {
  if (obj.is_none()) return std::nullopt;
  return tensor_from_py(obj, name);
}

// The kernels take optional tensors as pointers: nullptr for None.
inline const TensorView* ptr(const std::optional<TensorView>& t) { return t ? &*t : nullptr; }

}  // namespace simcore
