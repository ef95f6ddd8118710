// The CUDA execution model of simcore's emulation build (simcore._C_emu): what a .cu
// file needs from nvcc's device side, for a host C++ compiler. setup.py compiles
// csrc/cuda/*.cu as C++ with this header force-included (g++ -x c++ -include ...), so
// the kernels run unchanged on the CPU: no kernel body knows it is emulated.
//
// What it models (docs/architecture.md, "CUDA emulation", says why and what it cannot show):
//  - a grid runs one block at a time; a block's threads are fibers on the calling
//    thread, switched only inside the synchronising intrinsics (scheduler.cpp), in
//    a deterministic order chosen by simcore::emu::set_schedule;
//  - __syncthreads and friends are real barriers; the warp intrinsics are warp-wide
//    rendezvous that check their mask against the lanes that arrive;
//  - __shared__ variables are function statics: valid because blocks never overlap;
//    each block finds them filled with 0xff bytes (NaN, -1), not the last block's values;
//  - atomics are plain read-modify-writes: threads never run at the same time;
//  - the launch limits of a GPU (block size, grid size, dynamic shared memory) fail the
//    launch as cudaErrorInvalidConfiguration; a divergent barrier, a warp mask that does
//    not match the arriving lanes and a deadlock throw, naming kernel, block and thread.
#pragma once

#include <cuda_bf16.h>  // host-compilable: the half and bfloat16 types and conversions
#include <cuda_fp16.h>
#include <cuda_runtime.h>  // dim3, uint3, cudaError_t, cudaStream_t, the runtime API declarations

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#define SIMCORE_CUDA_EMULATION 1

// nvcc's execution-space keywords: host functions here.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#define __global__
#define __device__
#define __host__
// One block at a time: a static is the block's shared memory. The linker gathers these
// statics into one section (shared_memory.ld), which the scheduler fills with 0xff bytes
// before each block. (A section attribute here would do, but GCC before 14 ignores it
// in function templates.)
#define __shared__ static

// CUDA's math library has these in the global namespace.
using std::isfinite;
using std::isinf;
using std::isnan;

// The built-in variables, set by the scheduler before it switches to a thread.
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

namespace simcore {
namespace emu {

enum class Schedule { Forward, Reverse, Random };
// The order in which a block's runnable threads run between synchronisations:
// forward (thread 0 first), reverse, or a permutation drawn per round from `seed`.
void set_schedule(Schedule s, uint64_t seed);

enum BarrierOp : int { kSyncThreads, kSyncThreadsOr, kSyncThreadsCount };
enum WarpOp : int { kShflXor, kShflDown, kBallot, kSyncWarp };

// The block barrier: returns the predicate reduced over the block (or / count).
int barrier(BarrierOp op, int predicate);
// A warp rendezvous of the lanes in `mask`: each lane contributes `bits`, gets what
// the op computes for it (the shuffled lane's bits, the ballot).
uint64_t warp_exchange(WarpOp op, unsigned mask, uint64_t bits, int arg, int width);

// Runs thread_body once per thread of every block (the grid), or records the
// launch error (cudaGetLastError) when the configuration exceeds a GPU's limits.
void launch(const char* kernel, dim3 grid, dim3 block, size_t dynamic_smem,
            const std::function<void()>& thread_body);

// Runs one of the rule-breaking kernels of selftest.cpp (tests/test_cuda_emulation.py).
std::string selftest(const std::string& name);

template <class T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value, "shuffle of a wide type");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// kernel<<<grid, block, smem, stream>>>(args...): the arguments are converted to the
// kernel's parameter types once, as a launch copies them; every thread gets its own copy.
template <class... P>
struct Launcher {
  const char* name;
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <class... A>
  void operator()(A&&... a) const {
    const std::tuple<std::decay_t<P>...> args(std::forward<A>(a)...);
    launch(name, grid, block, smem, [&] { std::apply(kernel, args); });
  }
};
template <class... P>
Launcher<P...> launcher(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t) {
  return Launcher<P...>{name, kernel, grid, block, smem};
}

}  // namespace emu
}  // namespace simcore

// The one launch syntax of csrc/cuda (kernel_util.cuh has nvcc's expansion).
#define SIMCORE_LAUNCH(grid, block, smem, stream, ...) \
  ::simcore::emu::launcher(#__VA_ARGS__, __VA_ARGS__, grid, block, smem, stream)

// ------------------------------------------------------------------ intrinsics
inline void __syncthreads() { simcore::emu::barrier(simcore::emu::kSyncThreads, 0); }
inline int __syncthreads_or(int p) { return simcore::emu::barrier(simcore::emu::kSyncThreadsOr, p); }
inline int __syncthreads_count(int p) { return simcore::emu::barrier(simcore::emu::kSyncThreadsCount, p); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  simcore::emu::warp_exchange(simcore::emu::kSyncWarp, mask, 0, 0, 32);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  using simcore::emu::from_bits;
  return from_bits<T>(simcore::emu::warp_exchange(simcore::emu::kShflXor, mask, simcore::emu::to_bits(v), lane_mask,
                                                  width));
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  using simcore::emu::from_bits;
  return from_bits<T>(simcore::emu::warp_exchange(simcore::emu::kShflDown, mask, simcore::emu::to_bits(v),
                                                  static_cast<int>(delta), width));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return static_cast<unsigned>(simcore::emu::warp_exchange(simcore::emu::kBallot, mask, predicate != 0, 0, 32));
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline unsigned __float_as_uint(float f) { return simcore::emu::from_bits<unsigned>(simcore::emu::to_bits(f)); }
inline float __uint_as_float(unsigned u) { return simcore::emu::from_bits<float>(u); }
template <class T>
T __ldg(const T* p) { return *p; }
// Threads never run at the same time, so a read-modify-write is atomic.
template <class T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <class T>
T atomicMin(T* p, T v) {
  const T old = *p;
  if (v < old) *p = v;
  return old;
}
