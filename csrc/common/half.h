// float16 / bfloat16 <-> float32 on the host, bit-exact with torch's rounding
// (round to nearest even). Kernels read half inputs through these and
// accumulate in float32.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/tensor_view.h"

namespace simcore {

struct BFloat16 { uint16_t bits; };
struct Float16 { uint16_t bits; };

inline float to_float(float v) { return v; }

inline float to_float(BFloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float to_float(Float16 v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  uint32_t exp = (v.bits >> 10) & 0x1fu;
  uint32_t man = v.bits & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal half -> normal float
      int e = -1;
      do { man <<= 1; ++e; } while ((man & 0x400u) == 0);
      u = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else {
    u = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline BFloat16 to_bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet nan
  u += 0x7fffu + ((u >> 16) & 1u);
  return BFloat16{static_cast<uint16_t>(u >> 16)};
}

inline Float16 to_float16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return Float16{static_cast<uint16_t>(sign | 0x7e00u)};
  if (abs >= 0x477ff000u) return Float16{static_cast<uint16_t>(sign | 0x7c00u)};  // overflow -> inf
  if (abs < 0x38800000u) {                                                      // subnormal or zero
    if (abs < 0x33000000u) return Float16{sign};
    const uint32_t e = abs >> 23;
    uint32_t man = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14 + (113 - e)
    uint32_t half = man >> (shift);
    const uint32_t rem = man & ((1u << shift) - 1);
    const uint32_t mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return Float16{static_cast<uint16_t>(sign | half)};
  }
  uint32_t r = abs + 0xfffu + ((abs >> 13) & 1u) - (112u << 23);
  return Float16{static_cast<uint16_t>(sign | (r >> 13))};
}

template <class T> inline T from_float(float f);
template <> inline float from_float<float>(float f) { return f; }
template <> inline BFloat16 from_float<BFloat16>(float f) { return to_bfloat16(f); }
template <> inline Float16 from_float<Float16>(float f) { return to_float16(f); }

// f(T{}) with T the host element type of a float32, float16 or bfloat16 tensor; `what`
// names the argument in the error for any other dtype (the callers' checks reject those first).
template <class F>
void dispatch_float_dtype(DType t, const char* what, const F& f) {
  switch (t) {
    case DType::Float32: f(float{}); break;
    case DType::Float16: f(Float16{}); break;
    case DType::BFloat16: f(BFloat16{}); break;
    default: throw TypeError(detail::concat("unsupported ", what, " dtype ", dtype_name(t)));
  }
}

}  // namespace simcore
