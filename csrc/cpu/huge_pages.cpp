// See huge_pages.h.
#include "cpu/huge_pages.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace simcore {
namespace cpu {

int64_t advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  if (!data || bytes <= 0) return 0;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + static_cast<uintptr_t>(bytes)) & ~(kHugePage - 1);
  if (last <= first) return 0;
  if (madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE) != 0) return 0;
  return static_cast<int64_t>(last - first);
#else
  (void)data;
  (void)bytes;
  return 0;
#endif
}

}  // namespace cpu
}  // namespace simcore
