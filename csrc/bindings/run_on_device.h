// The one CPU/CUDA switch of the bindings. Every kernel exists as csrc/cpu's
// cpu::name(args..., int threads) and csrc/cuda's cuda::name(args..., uint64_t stream);
// SIMCORE_KERNEL(name) names both (the CUDA one is nullptr in a CPU-only build) and
// run_on_device picks one from the device of a checked tensor, so no binding writes
// the branch or the #ifdef out again (the idea of flash-attention's static_switch.h:
// a runtime value selects a compiled variant). The kernels re-check every argument,
// devices included.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "common/tensor_view.h"

#ifdef SIMCORE_WITH_CUDA
#include "cuda/runtime.h"
#endif

namespace simcore {

template <class CpuFn, class CudaFn>
struct DeviceKernel {
  CpuFn cpu;
  CudaFn cuda;
};
template <class CpuFn, class CudaFn>
DeviceKernel(CpuFn, CudaFn) -> DeviceKernel<CpuFn, CudaFn>;

#ifdef SIMCORE_WITH_CUDA
#define SIMCORE_KERNEL(name) (::simcore::DeviceKernel{&::simcore::cpu::name, &::simcore::cuda::name})
#else
#define SIMCORE_KERNEL(name) (::simcore::DeviceKernel{&::simcore::cpu::name, nullptr})
#endif

// Where a call runs, as Python passes it: an OpenMP thread count for CPU tensors,
// torch's current cudaStream_t (as an integer) for CUDA tensors.
struct ExecArgs {
  const char* threads_name;  // the Python argument holding the thread count, for messages
  int64_t threads;
  uint64_t stream;
};

// The ops' last Python argument `exec`: a thread count for CPU tensors, the stream for CUDA ones.
inline ExecArgs exec_args(int64_t exec) { return ExecArgs{"exec", exec, static_cast<uint64_t>(exec)}; }

constexpr int64_t kMaxThreads = 4096;

// kernel.cpu(args..., threads) or kernel.cuda(args..., stream) by the device of `on`,
// with the GIL released. A CUDA kernel runs with `on`'s device current (restored
// afterwards); the kernels reject any other tensor that is not on that device.
template <class CpuFn, class CudaFn, class... Args>
void run_on_device(const DeviceKernel<CpuFn, CudaFn>& kernel, const TensorView& on, const ExecArgs& exec,
                   const Args&... args) {
  if (on.device == Device::CPU) {
    SIMCORE_CHECK(exec.threads >= 1 && exec.threads <= kMaxThreads, exec.threads_name,
                  " must be a thread count for CPU tensors, got ", exec.threads);
    pybind11::gil_scoped_release release;
    kernel.cpu(args..., static_cast<int>(exec.threads));
  } else {
#ifdef SIMCORE_WITH_CUDA
    const cuda::DeviceGuard guard(on.device_index, exec.stream);
    pybind11::gil_scoped_release release;
    kernel.cuda(args..., exec.stream);
#else
    throw ValueError("simcore was built without CUDA; CUDA tensors cannot run the compiled kernels");
#endif
  }
}

}  // namespace simcore
