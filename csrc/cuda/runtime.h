// CUDA runtime facts and helpers shared by the CUDA kernels (host side).
// Plain C++: the bindings include it without CUDA headers.
#pragma once

#include <cstdint>
#include <string>

namespace simcore {
namespace cuda {

// What the statically linked runtime finds, probed once without creating a
// context: the versions, the device count and, when CUDA cannot be used at
// all (no driver, a driver older than the runtime, no device), the CUDA error.
struct Probe {
  int runtime_version = 0;  // e.g. 13000: the nvcc that built simcore
  int driver_version = 0;   // newest CUDA the driver supports; 0 without a driver
  int device_count = 0;
  std::string error;        // "" when at least one device is usable
};
const Probe& probe();

int device_count();     // 0 when no driver or device is present
int runtime_version();  // e.g. 13000

// Throws simcore::ValueError carrying the CUDA error string when err != 0.
void check(int err, const char* what);

// Makes `device` current for its lifetime and restores the previous device
// afterwards, so a kernel runs where its tensors live whatever device the
// caller made current. Before that, once per device, it checks that simcore's
// kernels can launch there (an empty kernel on `stream`, the call's own, so a
// CUDA graph capture stays valid: a driver too old or a missing kernel image
// fail here with one clear std::runtime_error, not mid-op).
class DeviceGuard {
 public:
  DeviceGuard(int device, uint64_t stream);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_ = 0;
  int previous_ = 0;
};

}  // namespace cuda
}  // namespace simcore
