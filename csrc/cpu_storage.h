// Storage types of the CPU kernels and their float32 conversions, written with integer and
// float operations only so that the compiler can vectorise loops that use them.
#pragma once

#include <stdint.h>

namespace eupmu {
namespace cpu {

struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

inline __attribute__((always_inline)) uint32_t bits_of(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof(u));
  return u;
}

inline __attribute__((always_inline)) float float_of(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}

inline __attribute__((always_inline)) float to_float(float x) { return x; }

inline __attribute__((always_inline)) float to_float(bf16_t x) { return float_of(uint32_t(x.bits) << 16); }

// IEEE binary16 -> binary32. Normal numbers: move exponent and mantissa into place and rescale by
// 2^-112 (fixes the exponent bias). Subnormals: build 0.5 + m*2^-24 in the float's mantissa and
// subtract 0.5. Inf/NaN land on exponent 255 because of the rescaling's overflow.
inline __attribute__((always_inline)) float to_float(f16_t x) {
  const uint32_t w = uint32_t(x.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t twice = w + w;  // drops the sign
  const float normal = float_of((twice >> 4) + (0xE0u << 23)) * float_of(0x07800000u);  // 0x1p-112
  const float subnormal = float_of((twice >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = twice < (1u << 27) ? bits_of(subnormal) : bits_of(normal);
  return float_of(sign | magnitude);
}

template <typename T>
struct StoreAs;

template <>
struct StoreAs<float> {
  static inline __attribute__((always_inline)) float from(float f) { return f; }
};

// Round to nearest even; NaN becomes the canonical quiet NaN, as in c10::BFloat16.
template <>
struct StoreAs<bf16_t> {
  static inline __attribute__((always_inline)) bf16_t from(float f) {
    const uint32_t u = bits_of(f);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return bf16_t{uint16_t(f != f ? 0x7FC0u : rounded)};
  }
};

// binary32 -> binary16, round to nearest even. Scaling |f| by 2^112 then 2^-110 and adding a
// power of two aligned with f's exponent makes the FPU do the rounding at the binary16 mantissa
// position (this needs exact float products and sums: compile without FMA contraction).
template <>
struct StoreAs<f16_t> {
  static inline __attribute__((always_inline)) f16_t from(float f) {
    const uint32_t w = bits_of(f);
    const uint32_t twice = w + w;
    const uint32_t sign = w & 0x80000000u;
    float base = (__builtin_fabsf(f) * float_of(0x77800000u)) * float_of(0x08800000u);  // 2^112, 2^-110
    uint32_t bias = twice & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = float_of((bias >> 1) + 0x07800000u) + base;
    const uint32_t b = bits_of(base);
    const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
    const uint32_t result = (sign >> 16) | (twice > 0xFF000000u ? 0x7E00u : nonsign);
    return f16_t{uint16_t(result)};
  }
};

}  // namespace cpu
}  // namespace eupmu
