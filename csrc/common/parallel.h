// Parallel loops for the CPU kernels (not for nvcc). OpenMP with an explicit thread count:
// Python passes torch.get_num_threads(), and the extension shares torch's
// libgomp (same soname), so there is one thread pool, not two.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>

// Hot loops are compiled for AVX-512, AVX2 and baseline and picked at load time, because the
// portable build has no -march=native (GCC on x86-64; not under ASan, which rejects ifuncs).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define SIMCORE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SIMCORE_CLONES
#endif

namespace simcore {

// Rows per thread so that each thread touches at least kMinBytesPerThread.
// These kernels run ~1 ms per 10-30 MB on one core; opening a parallel region
// costs far less on an idle machine, but on a loaded one (this project's shared
// 2-core CI machines) the region waits for a descheduled thread: up to ~10 ms
// measured per region. Large problems (millions of classes) still use every thread.
constexpr int64_t kMinBytesPerThread = int64_t{32} << 20;
inline int64_t min_rows(int64_t row_bytes) {
  return std::max<int64_t>(1, kMinBytesPerThread / std::max<int64_t>(1, row_bytes));
}

// Gathered rows (sorted random class ids, 1 in ~10 rows of a large head) defeat the hardware
// prefetcher: a loop that waits on each row's cache misses ran at ~1/3 of memory bandwidth
// (100,000 rows of 512 B: 26 ms against 9 ms for the same rows in order). The row that is
// kPrefetchRows ahead is requested while this one is computed.
constexpr int64_t kPrefetchRows = 6;
inline void prefetch_row(const void* row, int64_t bytes, bool for_write) {
  const char* p = static_cast<const char*>(row);
  for (int64_t off = 0; off < bytes; off += 64) {
    if (for_write)
      __builtin_prefetch(p + off, 1, 3);
    else
      __builtin_prefetch(p + off, 0, 3);
  }
}

// Calls body(begin, end) on contiguous chunks of [0, n), at most num_threads at
// once. Bodies must not throw: validate before calling.
template <class Body>
void parallel_for(int64_t n, int num_threads, int64_t min_chunk, const Body& body) {
  if (n <= 0) return;
  const int64_t max_chunks = std::max<int64_t>(1, n / std::max<int64_t>(1, min_chunk));
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, max_chunks)));
  if (threads == 1) {
    body(int64_t{0}, n);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    const int nt = omp_get_num_threads();
    const int64_t chunk = (n + nt - 1) / nt;
    const int64_t begin = std::min<int64_t>(n, t * chunk);
    const int64_t end = std::min<int64_t>(n, begin + chunk);
    if (begin < end) body(begin, end);
  }
}

}  // namespace simcore
