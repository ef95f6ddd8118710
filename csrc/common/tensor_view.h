// A tensor as the compiled core sees it: pointer, dtype, device, shape and
// strides (in elements). No libtorch: Python hands these fields over and
// csrc/bindings/tensor_arg.cpp checks them before any kernel runs.
// Host-side header, included by both the C++ and the CUDA kernels.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace simcore {

enum class DType : int { Float32 = 0, Float16, BFloat16, Float64, Int64, Int32, UInt8, Bool };
enum class Device : int { CPU = 0, CUDA = 1 };

inline int64_t itemsize(DType t) {
  switch (t) {
    case DType::Float32: case DType::Int32: return 4;
    case DType::Float16: case DType::BFloat16: return 2;
    case DType::Float64: case DType::Int64: return 8;
    case DType::UInt8: case DType::Bool: return 1;
  }
  return 0;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Float64: return "float64";
    case DType::Int64: return "int64";
    case DType::Int32: return "int32";
    case DType::UInt8: return "uint8";
    case DType::Bool: return "bool";
  }
  return "unknown";
}

inline std::string device_label(Device d, int index) {
  return d == Device::CPU ? std::string("cpu") : "cuda:" + std::to_string(index);
}

// Errors the bindings turn into Python's ValueError and TypeError.
struct ValueError : std::invalid_argument { using std::invalid_argument::invalid_argument; };
struct TypeError : std::invalid_argument { using std::invalid_argument::invalid_argument; };

namespace detail {
template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

#define SIMCORE_CHECK(cond, ...) \
  do { if (!(cond)) throw ::simcore::ValueError(::simcore::detail::concat(__VA_ARGS__)); } while (0)
#define SIMCORE_CHECK_TYPE(cond, ...) \
  do { if (!(cond)) throw ::simcore::TypeError(::simcore::detail::concat(__VA_ARGS__)); } while (0)

constexpr int kMaxDims = 4;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::Float32;
  Device device = Device::CPU;
  int device_index = 0;
  int ndim = 0;
  int64_t shape[kMaxDims] = {0, 0, 0, 0};
  int64_t strides[kMaxDims] = {0, 0, 0, 0};  // in elements
  std::string name;                           // argument name, for messages

  int64_t size(int d) const { return shape[d]; }
  int64_t stride(int d) const { return strides[d]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= shape[d];
    return n;
  }
  bool is_contiguous() const {
    if (numel() == 0) return true;  // as torch: an empty view is contiguous whatever its strides
    int64_t expected = 1;
    for (int d = ndim - 1; d >= 0; --d) {
      if (shape[d] != 1 && strides[d] != expected) return false;
      expected *= shape[d];
    }
    return true;
  }
  template <class T> T* ptr() const { return static_cast<T*>(data); }

  // Boundary checks used by every kernel entry point.
  const TensorView& expect_dtype(DType t) const {
    SIMCORE_CHECK_TYPE(dtype == t, name, " must be ", dtype_name(t), ", got ", dtype_name(dtype));
    return *this;
  }
  const TensorView& expect_floating() const {
    SIMCORE_CHECK_TYPE(dtype == DType::Float32 || dtype == DType::Float16 || dtype == DType::BFloat16 ||
                           dtype == DType::Float64,
                       name, " must be a floating-point tensor, got ", dtype_name(dtype));
    return *this;
  }
  const TensorView& expect_ndim(int n) const {
    SIMCORE_CHECK(ndim == n, name, " must have ", n, " dimension(s), got ", ndim);
    return *this;
  }
  const TensorView& expect_size(int d, int64_t n) const {
    SIMCORE_CHECK(d < ndim && shape[d] == n, name, " must have size ", n, " in dimension ", d, ", got ",
                  d < ndim ? shape[d] : -1);
    return *this;
  }
  const TensorView& expect_contiguous() const {
    SIMCORE_CHECK(is_contiguous(), name, " must be contiguous");
    return *this;
  }
  // Rows may be strided, elements within a row must be adjacent (2-D).
  const TensorView& expect_row_major() const {
    SIMCORE_CHECK(ndim == 2 && (shape[1] <= 1 || strides[1] == 1) && strides[0] >= 0, name,
                  " must have unit stride along its last dimension");
    return *this;
  }
  const TensorView& expect_device(Device d, int index) const {
    SIMCORE_CHECK(device == d && (d == Device::CPU || device_index == index), name, " is on the wrong device (",
                  device_label(device, device_index), "; the call runs on ", device_label(d, index),
                  "): all tensors of one call must be on one device");
    return *this;
  }
};

}  // namespace simcore
