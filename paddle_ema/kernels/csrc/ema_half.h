// Half-precision bits -> float (exact) and the AVX2/any-x86-64 clones attribute, shared by the
// update loops of ema_ops.cc and the PaddleDetection-compatible loops of ema_ppdet.cc.
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

// The streaming loops are compiled twice, for AVX2 and for any x86-64 (SSE2), and the loader
// picks one for the CPU (target_clones): SSE2 alone issues too many instructions to keep up
// with the memory of a recent server core.
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define PADDLE_EMA_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PADDLE_EMA_VECTOR_CLONES
#endif
