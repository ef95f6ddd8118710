// Transparent huge pages for the head's row tables (weight and optimizer state).
//
// A step of a sampled head reads and writes ~10 % of the rows of tables of 0.5 GB each at
// 1M classes, in random order: with 4 KiB pages nearly every row is a TLB miss in each
// table. advise_huge_pages asks Linux to back the table with 2 MiB pages (madvise
// MADV_HUGEPAGE on the 2 MiB-aligned part of [data, data + bytes)); pages faulted in after
// the call come as huge pages where the system allows them (transparent_hugepage "madvise"
// or "always"). Returns the bytes advised: 0 when the range holds no aligned 2 MiB block,
// off Linux, or when the kernel refuses (the table then stays on normal pages).
#pragma once

#include <cstdint>

namespace simcore {
namespace cpu {
int64_t advise_huge_pages(void* data, int64_t bytes);
}  // namespace cpu
}  // namespace simcore
