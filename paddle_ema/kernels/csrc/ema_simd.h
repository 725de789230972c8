// The element loops of every CPU kernel, on raw pointers and free of Paddle's headers: the update
// formulas for each dtype pair, the finiteness scan, the guarded update's one pass into a second
// buffer, the widening copy, the half-precision narrowing and the streaming copy. The passes that
// cut tensors into ranges and hand them out to threads are ema_update.cc and ema_guard.cc.
#pragma once

#include <cstdint>

#include "ema_segments.h"

// The streaming loops are compiled twice, for AVX2 and for any x86-64 (SSE2), and the loader
// picks one for the CPU (target_clones): SSE2 alone issues too many instructions to keep up
// with the memory of a recent server core.
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define PADDLE_EMA_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PADDLE_EMA_VECTOR_CLONES
#endif

// a[0, n) <- formula(a, x) for n elements of one pair of `kind` (kFloat, kFloatHalf,
// kFloatBfloat16, kDouble; others are left alone). Float32 averages compute in float32 with
// float32(decay) and float32(weight), as Paddle rounds a Python float factor for a float32
// tensor; float64 averages in float64.
void UpdateRange(Formula formula, Kind kind, void* a, const void* x, int64_t n, const Factors& factors);

// a[0, n) <- x widened to the average's dtype, exactly (half -> float is exact).
void CopyWidenRange(Kind kind, void* a, const void* x, int64_t n);

// Whether any of n values of `kind`'s value dtype is NaN or Inf (an all-ones exponent).
bool AnyNonfinite(Kind kind, const void* x, int64_t n);

// out[0, n) <- a + w (x - a), bit for bit UpdateRange's lerp, written to a separate buffer, and
// whether any of the n values is NaN or Inf (then `out` holds garbage). With `streaming` the
// float32 stores are non-temporal (call StoreFence() before another thread reads `out`).
bool LerpIntoChecking(Kind kind, void* out, const void* a, const void* x, int64_t n, double weight, bool streaming);

// Orders the non-temporal stores before what follows.
void StoreFence();

// memcpy, with non-temporal stores for a block large enough to push everything else out of a
// core's cache anyway.
void CopyBytes(char* dst, const char* src, int64_t n);

// out[0, n) <- float32 `in` narrowed to float16 (or bfloat16) bits, rounded to nearest, ties to even.
void NarrowRange(bool bfloat16, uint16_t* out, const uint32_t* in, int64_t n);
