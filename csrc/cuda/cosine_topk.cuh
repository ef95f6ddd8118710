// CUDA mirror of csrc/cpu/cosine_topk.h: same argument structs, same names,
// same reservoir state, so simcore/cosine_topk.py drives both with one loop.
// Host-side declarations only (includable from C++).
#pragma once

#include <cstdint>

#include "cpu/cosine_topk.h"

namespace simcore {
namespace cuda {

// Runs on the CUDA stream `stream` (torch's current stream, as an integer).
void cosine_topk_prepare_block(const TopkPrepareArgs& a, uint64_t stream);
void cosine_topk_update(const TopkUpdateArgs& a, uint64_t stream);

}  // namespace cuda
}  // namespace simcore
