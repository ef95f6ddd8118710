// Kernels that break CUDA's rules on purpose, one per check of the emulation
// (tests/test_cuda_emulation.py runs them through simcore._C_emu.emulation_selftest):
// each must fail with an error naming kernel, block and thread, never hang or pass.
#include "cuda/emulation/cuda_emulation.h"

#include <stdexcept>
#include <string>
#include <vector>

#include "common/tensor_view.h"

namespace simcore {
namespace emu {
namespace {

// Thread 5 of block 1 returns before the barrier the others wait at.
__global__ void divergent_barrier_kernel(int* out) {
  if (blockIdx.x == 1 && threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// Half of the block waits at __syncthreads_or, the other half at __syncthreads_count.
__global__ void mixed_barriers_kernel(int* out) {
  int v = threadIdx.x < 32 ? __syncthreads_or(1) : __syncthreads_count(1);
  out[threadIdx.x] = v;
}

// A full-mask shuffle that lane 7 of warp 1 never reaches.
__global__ void missing_lane_kernel(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x != 39) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// Lanes 0-15 shuffle with the low half-mask, lanes 16-31 with the full mask.
__global__ void wrong_mask_kernel(int* out) {
  const unsigned mask = (threadIdx.x & 31) < 16 ? 0x0000ffffu : 0xffffffffu;
  out[threadIdx.x] = static_cast<int>(__ballot_sync(mask, 1));
}

// Lane 15 of a half-mask shuffle reads lane 16, which the mask leaves out.
__global__ void outside_mask_kernel(int* out) {
  int v = threadIdx.x;
  if ((threadIdx.x & 31) < 16) v = __shfl_down_sync(0x0000ffffu, v, 1);
  out[threadIdx.x] = v;
}

// A correct kernel: block-wide sum with shuffles, a barrier and a shared array; the
// launch-limit cases launch it with bad configurations.
__global__ void block_sum_kernel(const int* in, int* out) {
  __shared__ int partial[32];
  int v = in[blockIdx.x * blockDim.x + threadIdx.x];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    int s = 0;
    for (unsigned w = 0; w < (blockDim.x + 31) / 32; ++w) s += partial[w];
    out[blockIdx.x] = s;
  }
}

// Block 0 fills a shared array; block 1 only reads it. On a GPU block 1 finds whatever the
// memory held; here it must find the poison (0xff bytes: -1), not block 0's values.
__global__ void stale_shared_kernel(int* out) {
  __shared__ int values[64];
  if (blockIdx.x == 0) values[threadIdx.x] = static_cast<int>(threadIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = values[threadIdx.x];
}

// One element past a heap array, and past a __shared__ array (33 threads): under ASan each
// is a report naming the kernel (tests/test_cuda_emulation.py runs them in a child process).
// Through a pointer, as kernels index: UBSan's bounds check sees only a declared array's index.
__global__ void global_out_of_bounds_kernel(const int* in, int* out) { out[threadIdx.x] = in[threadIdx.x + 1]; }
__global__ void shared_out_of_bounds_kernel(int* out) {
  __shared__ int values[32];
  values[threadIdx.x % 32] = static_cast<int>(threadIdx.x);
  __syncthreads();
  const int* v = values;
  out[threadIdx.x] = v[threadIdx.x];
}

std::string launch_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "" : cudaGetErrorString(e);
}

}  // namespace

// Runs the named case; returns the launch error ("" when the launch succeeded) or
// throws what the emulation found.
std::string selftest(const std::string& name) {
  static int in[4096], out[4096];
  for (int i = 0; i < 4096; ++i) in[i] = i;
  if (name == "divergent_barrier") SIMCORE_LAUNCH(2, 64, 0, nullptr, divergent_barrier_kernel)(out);
  else if (name == "mixed_barriers") SIMCORE_LAUNCH(1, 64, 0, nullptr, mixed_barriers_kernel)(out);
  else if (name == "missing_lane") SIMCORE_LAUNCH(1, 64, 0, nullptr, missing_lane_kernel)(out);
  else if (name == "wrong_mask") SIMCORE_LAUNCH(1, 32, 0, nullptr, wrong_mask_kernel)(out);
  else if (name == "outside_mask") SIMCORE_LAUNCH(1, 32, 0, nullptr, outside_mask_kernel)(out);
  else if (name == "block_sum") {
    SIMCORE_LAUNCH(3, 1024, 0, nullptr, block_sum_kernel)(in, out);
    for (int b = 0; b < 3; ++b) {
      const long long want = (1024LL * b + 1024LL * (b + 1) - 1) * 1024 / 2;
      SIMCORE_CHECK(out[b] == want, "block_sum: block ", b, " gave ", out[b], ", want ", want);
    }
  } else if (name == "stale_shared") {
    SIMCORE_LAUNCH(2, 64, 0, nullptr, stale_shared_kernel)(out);
    for (int t = 0; t < 128; ++t) {
      const int want = t < 64 ? t : -1;
      SIMCORE_CHECK(out[t] == want, "stale_shared: thread ", t % 64, " of block ", t / 64, " read ", out[t], ", want ",
                    want);
    }
  } else if (name == "global_out_of_bounds") {
    const std::vector<int> heap(64, 1);
    SIMCORE_LAUNCH(1, 64, 0, nullptr, global_out_of_bounds_kernel)(heap.data(), out);
  } else if (name == "shared_out_of_bounds") SIMCORE_LAUNCH(1, 33, 0, nullptr, shared_out_of_bounds_kernel)(out);
  else if (name == "too_many_threads") SIMCORE_LAUNCH(1, 1025, 0, nullptr, block_sum_kernel)(in, out);
  else if (name == "block_z_too_large") SIMCORE_LAUNCH(1, dim3(1, 1, 65), 0, nullptr, block_sum_kernel)(in, out);
  else if (name == "grid_y_too_large") SIMCORE_LAUNCH(dim3(1, 65536), 32, 0, nullptr, block_sum_kernel)(in, out);
  else if (name == "empty_grid") SIMCORE_LAUNCH(0, 32, 0, nullptr, block_sum_kernel)(in, out);
  else if (name == "too_much_dynamic_smem") SIMCORE_LAUNCH(1, 32, 49153, nullptr, block_sum_kernel)(in, out);
  else throw ValueError("unknown emulation selftest " + name);
  return launch_error();
}

}  // namespace emu
}  // namespace simcore
