#include "bindings/tensor_arg.h"

#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

namespace py = pybind11;

namespace simcore {
namespace {

DType parse_dtype(const std::string& s, const char* name) {
  if (s == "float32") return DType::Float32;
  if (s == "float16") return DType::Float16;
  if (s == "bfloat16") return DType::BFloat16;
  if (s == "float64") return DType::Float64;
  if (s == "int64") return DType::Int64;
  if (s == "int32") return DType::Int32;
  if (s == "uint8") return DType::UInt8;
  if (s == "bool") return DType::Bool;
  throw TypeError(detail::concat(name, ": unsupported dtype ", s));
}

}  // namespace

TensorView tensor_from_py(const py::handle& obj, const char* name) {
  SIMCORE_CHECK_TYPE(py::isinstance<py::tuple>(obj) && py::len(obj) == 8, name,
                     ": expected a packed tensor (simcore.dispatch.tensor_arg)");
  auto t = py::reinterpret_borrow<py::tuple>(obj);
  TensorView v;
  v.name = name;
  uint64_t data = 0, storage = 0;
  int64_t storage_nbytes = 0;
  std::string dtype, device;
  std::vector<int64_t> shape, strides;
  try {  // a malformed field is the caller's type error, not pybind11's RuntimeError
    data = t[0].cast<uint64_t>();
    storage = t[1].cast<uint64_t>();
    storage_nbytes = t[2].cast<int64_t>();
    dtype = t[3].cast<std::string>();
    device = t[4].cast<std::string>();
    v.device_index = t[5].cast<int>();
    shape = t[6].cast<std::vector<int64_t>>();
    strides = t[7].cast<std::vector<int64_t>>();
  } catch (const py::cast_error&) {
    throw TypeError(detail::concat(name, ": malformed packed tensor (expected (int, int, int, str, str, int, "
                                         "tuple of ints, tuple of ints) from simcore.dispatch.tensor_arg)"));
  }
  v.dtype = parse_dtype(dtype, name);
  SIMCORE_CHECK(device == "cpu" || device == "cuda", name, ": unsupported device ", device);
#ifdef SIMCORE_CUDA_EMULATION
  // simcore._C_emu runs the CUDA kernels on the host: a CPU tensor is device 0's memory there,
  // so every check and kernel takes its CUDA path (a real CUDA tensor has no place in it).
  SIMCORE_CHECK(device == "cpu", name, ": the CUDA emulation (simcore._C_emu) takes CPU tensors, got a ", device,
                " tensor");
  v.device = Device::CUDA;
  v.device_index = 0;
#else
  v.device = device == "cpu" ? Device::CPU : Device::CUDA;
#endif
  SIMCORE_CHECK(v.device == Device::CPU || v.device_index >= 0, name, ": a CUDA tensor needs its device index");
  SIMCORE_CHECK(shape.size() == strides.size() && shape.size() <= static_cast<size_t>(kMaxDims), name,
                ": at most ", kMaxDims, " dimensions are supported, got ", shape.size());
  v.ndim = static_cast<int>(shape.size());
  v.data = reinterpret_cast<void*>(static_cast<uintptr_t>(data));

  // The view must lie inside its storage: [data + min_offset, data + max_offset].
  const int64_t item = itemsize(v.dtype);
  int64_t max_offset = 0;
  bool empty = false, too_large = false;
  for (int d = 0; d < v.ndim; ++d) {
    SIMCORE_CHECK(shape[d] >= 0, name, ": negative size");
    SIMCORE_CHECK(strides[d] >= 0, name, ": negative strides are not supported");
    v.shape[d] = shape[d];
    v.strides[d] = strides[d];
    if (shape[d] == 0) {
      empty = true;
    } else if (strides[d] != 0) {  // (size-1)*stride must not overflow int64
      if (shape[d] - 1 > (INT64_MAX - max_offset) / strides[d]) too_large = true;
      else max_offset += (shape[d] - 1) * strides[d];
    }
  }
  if (!empty) {
    SIMCORE_CHECK(!too_large && max_offset < INT64_MAX / item, name,
                  ": view reaches past the end of its storage (its extent overflows)");
    SIMCORE_CHECK(data != 0, name, ": null data pointer");
    SIMCORE_CHECK(data % static_cast<uint64_t>(item) == 0, name, ": data pointer is not aligned to its dtype");
    SIMCORE_CHECK(data >= storage && storage_nbytes >= 0 && data - storage <= static_cast<uint64_t>(storage_nbytes),
                  name, ": data lies outside its storage");
    const uint64_t bytes = static_cast<uint64_t>(max_offset + 1) * static_cast<uint64_t>(item);
    SIMCORE_CHECK(bytes <= static_cast<uint64_t>(storage_nbytes) - (data - storage), name,
                  ": view reaches past the end of its storage");
  }
  return v;
}

}  // namespace simcore
