// float16 and bfloat16 <-> float32, both ways, bit-exact and free of Paddle: the widening is
// exact; the narrowing rounds to nearest, ties to even, as numpy and Paddle 3.2+ do on the CPU.
#pragma once

#include <cstdint>
#include <cstring>

// IEEE half -> float, exact for every input (normals, subnormals, inf, nan). Written with
// selects instead of branches so that the loop around it vectorises.
inline float HalfToFloat(uint16_t h) {
  uint32_t magnitude = static_cast<uint32_t>(h & 0x7fffu) << 13;
  uint32_t exponent = magnitude & 0x0f800000u;
  uint32_t bits = magnitude + (static_cast<uint32_t>(127 - 15) << 23);
  // inf / nan: push the exponent to all ones.
  bits = exponent == 0x0f800000u ? bits + (static_cast<uint32_t>(128 - 16) << 23) : bits;
  // zero / subnormal: let the FPU normalise, (m + 2^-14 scaled) - 2^-14.
  float sub;
  uint32_t sub_bits = bits + (1u << 23);
  std::memcpy(&sub, &sub_bits, 4);
  sub -= 6.103515625e-05f;  // 2^-14
  uint32_t sub_as_bits;
  std::memcpy(&sub_as_bits, &sub, 4);
  bits = exponent == 0 ? sub_as_bits : bits;
  bits |= static_cast<uint32_t>(h & 0x8000u) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

inline float Bfloat16ToFloat(uint16_t b) {
  uint32_t bits = static_cast<uint32_t>(b) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// float32 -> IEEE half, round to nearest, ties to even, in integer arithmetic (the result
// does not depend on the FPU's rounding mode or flush-to-zero). Bit for bit numpy's
// npy_floatbits_to_halfbits, NaN payloads included, as Paddle 3.2+'s CPU cast.
inline uint16_t FloatToHalf(uint32_t f) {
  const uint16_t sign = static_cast<uint16_t>((f >> 16) & 0x8000u);
  const uint32_t a = f & 0x7fffffffu;
  if (a >= 0x7f800000u) {  // inf, or NaN with the top of its payload (still a NaN)
    if (a == 0x7f800000u) return sign | 0x7c00u;
    const uint16_t nan = static_cast<uint16_t>(0x7c00u | ((a >> 13) & 0x3ffu));
    return sign | (nan == 0x7c00u ? 0x7c01u : nan);
  }
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520: ties to even past 65504 = inf
  if (a >= 0x38800000u) {                       // a normal half: drop 13 bits, rounded
    const uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
    return sign | static_cast<uint16_t>((rounded - (static_cast<uint32_t>(127 - 15) << 23)) >> 13);
  }
  if (a < 0x33000000u) return sign;  // below half the smallest subnormal (2^-25): zero
  // A subnormal half, counted in units of 2^-24: the 24-bit significand shifted down, rounded
  // (a carry into 0x400 is the smallest normal half, encoded the same).
  const uint32_t shift = 126u - (a >> 23);  // 14 .. 24
  const uint32_t significand = (a & 0x7fffffu) | 0x800000u;
  const uint32_t kept = significand >> shift;
  const uint32_t rest = significand & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  return sign | static_cast<uint16_t>(kept + (rest > half || (rest == half && (kept & 1u))));
}

// float32 -> bfloat16: the top 16 bits rounded to nearest, ties to even (an overflow carries into
// inf, subnormals round like the rest); every NaN becomes 0x7fff.
inline uint16_t FloatToBfloat16(uint32_t f) {
  if ((f & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  return static_cast<uint16_t>((f + 0x7fffu + ((f >> 16) & 1u)) >> 16);
}
