// CUDA runtime facts and helpers shared by the CUDA kernels (host side).
#pragma once

#include <cstdint>

namespace simcore {
namespace cuda {

int device_count();     // 0 when no driver or device is present
int runtime_version();  // e.g. 13000

// Throws simcore::ValueError carrying the CUDA error string when err != 0.
void check(int err, const char* what);

}  // namespace cuda
}  // namespace simcore
