// Scalar conversions between the storage types we accept and float32, the type all CPU
// arithmetic happens in. Written by hand because the compilers we target do not all
// provide bfloat16 / _Float16 on x86-64.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace jax_flash::cpu {

struct BFloat16 { uint16_t bits; };
struct Float16 { uint16_t bits; };

inline float to_float(float x) { return x; }

inline float to_float(BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float to_float(Float16 x) {
  const uint32_t sign = (x.bits & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1fu;
  const uint32_t mantissa = x.bits & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal half: value = mantissa * 2^-24
    float f = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -f : f;
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename T> T from_float(float x);

template <> inline float from_float<float>(float x) { return x; }

template <> inline BFloat16 from_float<BFloat16>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if (std::isnan(x)) return {static_cast<uint16_t>((bits >> 16) | 0x40u)};
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  return {static_cast<uint16_t>((bits + rounding) >> 16)};
}

template <> inline Float16 from_float<Float16>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits >= 0x7f800000u) {  // inf or nan
    return {static_cast<uint16_t>(sign | 0x7c00u | (abs_bits > 0x7f800000u ? 0x200u : 0u))};
  }
  float abs_value;
  std::memcpy(&abs_value, &abs_bits, sizeof abs_value);
  if (abs_value >= 65520.0f) return {static_cast<uint16_t>(sign | 0x7c00u)};
  if (abs_value < 6.103515625e-05f) {  // below the smallest normal half: 2^-24 steps
    const float scaled = abs_value * 16777216.0f;
    return {static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(scaled)))};
  }
  // Normal half: drop 13 mantissa bits with round-to-nearest-even, then rebias.
  const uint32_t rounded = abs_bits + 0xfffu + ((abs_bits >> 13) & 1u);
  return {static_cast<uint16_t>(sign | (((rounded >> 13) - (112u << 10)) & 0x7fffu))};
}

}  // namespace jax_flash::cpu
