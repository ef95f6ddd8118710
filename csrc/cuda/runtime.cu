#include <cuda_runtime.h>

#include "common/tensor_view.h"
#include "cuda/runtime.h"

namespace simcore {
namespace cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

void check(int err, const char* what) {
  if (err != cudaSuccess) {
    throw ValueError(detail::concat(what, ": ", cudaGetErrorString(static_cast<cudaError_t>(err))));
  }
}

}  // namespace cuda
}  // namespace simcore
