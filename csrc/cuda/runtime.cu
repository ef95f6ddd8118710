#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <vector>

#include "common/tensor_view.h"
#include "cuda/kernel_util.cuh"
#include "cuda/runtime.h"

namespace simcore {
namespace cuda {
namespace {

__global__ void launch_probe_kernel(int* sink) {
  if (sink) *sink = 1;
}

Probe run_probe() {
  Probe p;
  cudaRuntimeGetVersion(&p.runtime_version);
  if (cudaDriverGetVersion(&p.driver_version) != cudaSuccess) p.driver_version = 0;
  const cudaError_t err = cudaGetDeviceCount(&p.device_count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear it: the error is reported through p.error
    p.device_count = 0;
    p.error = cudaGetErrorString(err);
  } else if (p.device_count == 0) {
    p.error = "no CUDA device";
  }
  return p;
}

// Per device: "" once a launch succeeded there, else the error that launch gave.
std::mutex launch_mutex;
std::vector<std::string> launch_checked;  // "?" = not tried yet

void check_launchable(int device, uint64_t stream) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  if (launch_checked.empty()) launch_checked.assign(static_cast<size_t>(probe().device_count), "?");
  std::string& state = launch_checked[static_cast<size_t>(device)];
  if (state == "?") {  // the device is current: an empty kernel, no host synchronisation
    SIMCORE_LAUNCH(1, 1, 0, as_stream(stream), launch_probe_kernel)(nullptr);
    const cudaError_t err = cudaGetLastError();
    state = err == cudaSuccess ? "" : cudaGetErrorString(err);
  }
  if (!state.empty())
    throw std::runtime_error(detail::concat("simcore's CUDA kernels cannot run on cuda:", device, ": ", state,
                                            " (simcore.cuda_status() has the details)"));
}

}  // namespace

const Probe& probe() {
  static const Probe p = run_probe();
  return p;
}

int device_count() { return probe().device_count; }

int runtime_version() { return probe().runtime_version; }

void check(int err, const char* what) {
  if (err != cudaSuccess) {
    throw ValueError(detail::concat(what, ": ", cudaGetErrorString(static_cast<cudaError_t>(err))));
  }
}

DeviceGuard::DeviceGuard(int device, uint64_t stream) : device_(device) {
  const Probe& p = probe();
  if (!p.error.empty())
    throw std::runtime_error(detail::concat("simcore's CUDA kernels cannot run: ", p.error, " (CUDA runtime ",
                                            p.runtime_version, ", driver supports ", p.driver_version,
                                            "; simcore.cuda_status() has the details)"));
  SIMCORE_CHECK(device >= 0 && device < p.device_count, "CUDA device index ", device, " is out of range (",
                p.device_count, " devices)");
  check(cudaGetDevice(&previous_), "cudaGetDevice");
  if (previous_ != device_) check(cudaSetDevice(device_), "cudaSetDevice");
  try {
    check_launchable(device_, stream);
  } catch (...) {
    if (previous_ != device_) cudaSetDevice(previous_);
    throw;
  }
}

DeviceGuard::~DeviceGuard() {
  if (previous_ != device_) cudaSetDevice(previous_);
}

}  // namespace cuda
}  // namespace simcore
