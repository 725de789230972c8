// The element loops (see ema_simd.h). No Paddle here: raw pointers, one dtype pair and one
// formula per loop, each operation rounded on its own (-ffp-contract=off, no -ffast-math, so the
// + 0.0 of a scale op stays and nothing is fused into an FMA).

#include "ema_simd.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "ema_half.h"

namespace {

#if defined(__x86_64__) || defined(__i386__)
bool HasAVX() {
  static const bool has = __builtin_cpu_supports("avx");
  return has;
}

bool HasAVX2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}

bool HasF16C() {
  static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return has;
}
#endif

// One element of each formula, in the average's dtype T.
template <Formula F, typename T>
__attribute__((always_inline)) inline T Apply(T a, T x, T d, T w) {
  if constexpr (F == Formula::kLerp) {
    return a + w * (x - a);
  } else if constexpr (F == Formula::kScaleAdd) {
    return (d * a + T(0)) + (w * x + T(0));  // the + 0 are the scale ops' bias: -0 products become +0
  } else {
    return a - (w * (a - x) + T(0));
  }
}

// The loops, with the value widened on the way in (exactly).
template <Formula F>
__attribute__((always_inline)) inline void FloatLoop(float* __restrict a, const float* __restrict x, int64_t n,
                                                     float d, float w) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) a[i] = Apply<F, float>(a[i], x[i], d, w);
}

template <Formula F>
__attribute__((always_inline)) inline void Bfloat16Loop(float* __restrict a, const uint16_t* __restrict x, int64_t n,
                                                        float d, float w) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) a[i] = Apply<F, float>(a[i], Bfloat16ToFloat(x[i]), d, w);
}

template <Formula F>
__attribute__((always_inline)) inline void DoubleLoop(double* __restrict a, const double* __restrict x, int64_t n,
                                                      double d, double w) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) a[i] = Apply<F, double>(a[i], x[i], d, w);
}

template <Formula F>
void HalfPortable(float* __restrict a, const uint16_t* __restrict x, int64_t n, float d, float w) {
  for (int64_t i = 0; i < n; ++i) a[i] = Apply<F, float>(a[i], HalfToFloat(x[i]), d, w);
}

// Each loop once per formula, as a function the loader picks the AVX2 or the generic clone of.
#define PADDLE_EMA_LOOPS(NAME, F)                                                                               \
  PADDLE_EMA_VECTOR_CLONES void NAME##Float(float* __restrict a, const float* __restrict x, int64_t n, float d,    \
                                            float w) {                                                            \
    FloatLoop<F>(a, x, n, d, w);                                                                                  \
  }                                                                                                               \
  PADDLE_EMA_VECTOR_CLONES void NAME##Bfloat16(float* __restrict a, const uint16_t* __restrict x, int64_t n,      \
                                               float d, float w) {                                                \
    Bfloat16Loop<F>(a, x, n, d, w);                                                                               \
  }                                                                                                               \
  PADDLE_EMA_VECTOR_CLONES void NAME##Double(double* __restrict a, const double* __restrict x, int64_t n,         \
                                             double d, double w) {                                                \
    DoubleLoop<F>(a, x, n, d, w);                                                                                 \
  }

PADDLE_EMA_LOOPS(Lerp, Formula::kLerp)
PADDLE_EMA_LOOPS(ScaleAdd, Formula::kScaleAdd)
PADDLE_EMA_LOOPS(SubScaleSub, Formula::kSubScaleSub)
#undef PADDLE_EMA_LOOPS

#if defined(__x86_64__) || defined(__i386__)
// The portable half conversion does not vectorise; x86 CPUs since 2012 convert 8 halves at once
// (F16C). Chosen at run time, so the extension still loads on older CPUs. The same formulas,
// not fused into an FMA.
template <Formula F>
__attribute__((target("avx"), always_inline)) inline __m256 ApplyVec(__m256 a, __m256 x, __m256 d, __m256 w) {
  const __m256 zero = _mm256_setzero_ps();
  if constexpr (F == Formula::kLerp) {
    return _mm256_add_ps(a, _mm256_mul_ps(w, _mm256_sub_ps(x, a)));
  } else if constexpr (F == Formula::kScaleAdd) {
    return _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(d, a), zero), _mm256_add_ps(_mm256_mul_ps(w, x), zero));
  } else {
    return _mm256_sub_ps(a, _mm256_add_ps(_mm256_mul_ps(w, _mm256_sub_ps(a, x)), zero));
  }
}

template <Formula F>
__attribute__((target("avx,f16c"))) void HalfF16C(float* __restrict a, const uint16_t* __restrict x, int64_t n,
                                                  float d, float w) {
  const __m256 vd = _mm256_set1_ps(d), vw = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 vx = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
    _mm256_storeu_ps(a + i, ApplyVec<F>(_mm256_loadu_ps(a + i), vx, vd, vw));
  }
  HalfPortable<F>(a + i, x + i, n - i, d, w);
}
#endif

template <Formula F>
void Half(float* a, const uint16_t* x, int64_t n, float d, float w) {
#if defined(__x86_64__) || defined(__i386__)
  if (HasF16C()) return HalfF16C<F>(a, x, n, d, w);
#endif
  HalfPortable<F>(a, x, n, d, w);
}

// One pair's range for formula F: the dtype pair chosen here, the loop above.
template <Formula F, void (*FloatFn)(float*, const float*, int64_t, float, float),
          void (*Bfloat16Fn)(float*, const uint16_t*, int64_t, float, float),
          void (*DoubleFn)(double*, const double*, int64_t, double, double)>
void RangeOf(Kind kind, void* a, const void* x, int64_t n, const Factors& f) {
  const float d = static_cast<float>(f.decay), w = static_cast<float>(f.weight);
  switch (kind) {
    case Kind::kFloat:
      FloatFn(static_cast<float*>(a), static_cast<const float*>(x), n, d, w);
      break;
    case Kind::kFloatHalf:
      Half<F>(static_cast<float*>(a), static_cast<const uint16_t*>(x), n, d, w);
      break;
    case Kind::kFloatBfloat16:
      Bfloat16Fn(static_cast<float*>(a), static_cast<const uint16_t*>(x), n, d, w);
      break;
    case Kind::kDouble:
      DoubleFn(static_cast<double*>(a), static_cast<const double*>(x), n, f.decay, f.weight);
      break;
    default:  // half-precision averages: GPU only
      break;
  }
}

// Non-finite means an all-ones exponent: a test on the bits, OR-reduced so that it vectorises.
template <typename Bits>
inline bool AnyAllOnesExponent(const Bits* __restrict x, int64_t n, Bits mask) {
  Bits any = 0;
#pragma omp simd reduction(| : any)
  for (int64_t i = 0; i < n; ++i) any |= static_cast<Bits>((x[i] & mask) == mask);
  return any != 0;
}

PADDLE_EMA_VECTOR_CLONES bool AnyNonfinite32Portable(const uint32_t* x, int64_t n) {
  return AnyAllOnesExponent<uint32_t>(x, n, 0x7f800000u);
}

#if defined(__x86_64__) || defined(__i386__)
// A single sequential read stream does not keep enough cache misses in flight on one core, so
// the OR reduction over one stream took twice as long as its bytes need. This reads four streams
// (the quarters of the range) at once, each into its own accumulator (docs/performance.md, "The
// in-place guard reads four streams"). Same test: an all-ones exponent.
__attribute__((target("avx2"))) inline __m256i AllOnesExponent8(const uint32_t* x, __m256i mask) {
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)), mask), mask);
}

__attribute__((target("avx2"))) bool AnyNonfinite32AVX2(const uint32_t* x, int64_t n) {
  const __m256i mask = _mm256_set1_epi32(0x7f800000);
  __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  const int64_t quarter = n / 32 * 8;
  const uint32_t* x1 = x + quarter;
  const uint32_t* x2 = x1 + quarter;
  const uint32_t* x3 = x2 + quarter;
  for (int64_t i = 0; i < quarter; i += 8) {
    acc0 = _mm256_or_si256(acc0, AllOnesExponent8(x + i, mask));
    acc1 = _mm256_or_si256(acc1, AllOnesExponent8(x1 + i, mask));
    acc2 = _mm256_or_si256(acc2, AllOnesExponent8(x2 + i, mask));
    acc3 = _mm256_or_si256(acc3, AllOnesExponent8(x3 + i, mask));
  }
  const __m256i any = _mm256_or_si256(_mm256_or_si256(acc0, acc1), _mm256_or_si256(acc2, acc3));
  if (!_mm256_testz_si256(any, any)) return true;
  return AnyNonfinite32Portable(x + 4 * quarter, n - 4 * quarter);
}

// memcpy of a large block with non-temporal stores: the copy's destination is not read first
// (no read-for-ownership), so it moves 8 bytes a float32 instead of 12. glibc's memcpy switches
// to such stores only above ~3/4 of the last-level cache, larger than one thread's chunk.
__attribute__((target("avx"))) void CopyStreaming(char* __restrict dst, const char* __restrict src, int64_t n) {
  const int64_t head = std::min<int64_t>(n, (32 - reinterpret_cast<uintptr_t>(dst) % 32) % 32);
  std::memcpy(dst, src, head);
  int64_t i = head;
  for (; i + 128 <= n; i += 128) {
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 32));
    const __m256i v2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 64));
    const __m256i v3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 96));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), v0);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 32), v1);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 64), v2);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 96), v3);
  }
  _mm_sfence();
  std::memcpy(dst + i, src + i, n - i);
}
#endif

bool AnyNonfinite32(const uint32_t* x, int64_t n) {
#if defined(__x86_64__) || defined(__i386__)
  if (HasAVX2()) return AnyNonfinite32AVX2(x, n);
#endif
  return AnyNonfinite32Portable(x, n);
}
PADDLE_EMA_VECTOR_CLONES bool AnyNonfinite64(const uint64_t* x, int64_t n) {
  return AnyAllOnesExponent<uint64_t>(x, n, 0x7ff0000000000000ull);
}
PADDLE_EMA_VECTOR_CLONES bool AnyNonfiniteHalf(const uint16_t* x, int64_t n) {
  return AnyAllOnesExponent<uint16_t>(x, n, 0x7c00u);
}
PADDLE_EMA_VECTOR_CLONES bool AnyNonfiniteBfloat16(const uint16_t* x, int64_t n) {
  return AnyAllOnesExponent<uint16_t>(x, n, 0x7f80u);
}

// out <- a + w * (x - a): the in-place loops' formula and rounding, written to a separate buffer.
PADDLE_EMA_VECTOR_CLONES void LerpFloatInto(float* __restrict out, const float* __restrict a,
                                            const float* __restrict x, int64_t n, float w) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + w * (x[i] - a[i]);
}

PADDLE_EMA_VECTOR_CLONES void LerpDoubleInto(double* __restrict out, const double* __restrict a,
                                             const double* __restrict x, int64_t n, double w) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + w * (x[i] - a[i]);
}

#if defined(__x86_64__) || defined(__i386__)
// The same, and the finiteness test of x, in one pass over the three streams: returns whether any
// x has an all-ones exponent. Separate multiply and add, as the in-place loop (no FMA). With
// kStreaming the stores are non-temporal: `out` is not read first (no read-for-ownership), so the
// pass moves 12 bytes a parameter, as the in-place update, instead of 16; for sets that fit in the
// cache plain stores are faster (non-temporal ones would send every line to memory).
template <bool kStreaming>
__attribute__((target("avx2"))) bool LerpFloatIntoCheckingAVX2(float* __restrict out, const float* __restrict a,
                                                               const float* __restrict x, int64_t n, float w) {
  // Aligned to a 64-byte line, so that each line is written whole by one iteration.
  const int64_t head = std::min<int64_t>(n, ((64 - reinterpret_cast<uintptr_t>(out) % 64) % 64) / sizeof(float));
  bool bad = AnyNonfinite32Portable(reinterpret_cast<const uint32_t*>(x), head);
  LerpFloatInto(out, a, x, head, w);
  const __m256 vw = _mm256_set1_ps(w);
  const __m256i mask = _mm256_set1_epi32(0x7f800000);
  __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0;
  int64_t i = head;
  for (; i + 32 <= n; i += 32) {
    for (int64_t j = i; j < i + 32; j += 16) {
      const __m256 a0 = _mm256_loadu_ps(a + j), a1 = _mm256_loadu_ps(a + j + 8);
      const __m256 x0 = _mm256_loadu_ps(x + j), x1 = _mm256_loadu_ps(x + j + 8);
      acc0 = _mm256_or_si256(acc0, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(x0), mask), mask));
      acc1 = _mm256_or_si256(acc1, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(x1), mask), mask));
      const __m256 r0 = _mm256_add_ps(a0, _mm256_mul_ps(vw, _mm256_sub_ps(x0, a0)));
      const __m256 r1 = _mm256_add_ps(a1, _mm256_mul_ps(vw, _mm256_sub_ps(x1, a1)));
      if (kStreaming) {
        _mm256_stream_ps(out + j, r0);
        _mm256_stream_ps(out + j + 8, r1);
      } else {
        _mm256_store_ps(out + j, r0);
        _mm256_store_ps(out + j + 8, r1);
      }
    }
  }
  const __m256i any = _mm256_or_si256(acc0, acc1);
  bad = bad || !_mm256_testz_si256(any, any);
  bad = AnyNonfinite32Portable(reinterpret_cast<const uint32_t*>(x + i), n - i) || bad;
  LerpFloatInto(out + i, a + i, x + i, n - i, w);
  return bad;
}
#endif

}  // namespace

void UpdateRange(Formula formula, Kind kind, void* a, const void* x, int64_t n, const Factors& factors) {
  switch (formula) {
    case Formula::kLerp:
      return RangeOf<Formula::kLerp, LerpFloat, LerpBfloat16, LerpDouble>(kind, a, x, n, factors);
    case Formula::kScaleAdd:
      return RangeOf<Formula::kScaleAdd, ScaleAddFloat, ScaleAddBfloat16, ScaleAddDouble>(kind, a, x, n, factors);
    case Formula::kSubScaleSub:
      return RangeOf<Formula::kSubScaleSub, SubScaleSubFloat, SubScaleSubBfloat16, SubScaleSubDouble>(kind, a, x, n,
                                                                                                   factors);
  }
}

void CopyWidenRange(Kind kind, void* a, const void* x, int64_t n) {
  float* af = static_cast<float*>(a);
  const uint16_t* h = static_cast<const uint16_t*>(x);
  switch (kind) {
    case Kind::kFloat:
      std::memcpy(a, x, n * sizeof(float));
      break;
    case Kind::kFloatHalf:
      for (int64_t i = 0; i < n; ++i) af[i] = HalfToFloat(h[i]);
      break;
    case Kind::kFloatBfloat16:
      for (int64_t i = 0; i < n; ++i) af[i] = Bfloat16ToFloat(h[i]);
      break;
    case Kind::kDouble:
      std::memcpy(a, x, n * sizeof(double));
      break;
    default:
      break;
  }
}

bool AnyNonfinite(Kind kind, const void* x, int64_t n) {
  switch (kind) {
    case Kind::kFloat:
      return AnyNonfinite32(static_cast<const uint32_t*>(x), n);
    case Kind::kFloatHalf:
    case Kind::kHalf:
      return AnyNonfiniteHalf(static_cast<const uint16_t*>(x), n);
    case Kind::kFloatBfloat16:
    case Kind::kBfloat16:
      return AnyNonfiniteBfloat16(static_cast<const uint16_t*>(x), n);
    case Kind::kDouble:
      return AnyNonfinite64(static_cast<const uint64_t*>(x), n);
    case Kind::kUnsupported:
      break;
  }
  return false;
}

bool LerpIntoChecking(Kind kind, void* out, const void* a, const void* x, int64_t n, double weight, bool streaming) {
  // paddle.lerp_ turns a Python float weight into a float32 tensor for a float32 average.
  const float w = static_cast<float>(weight);
  switch (kind) {
    case Kind::kFloat:
#if defined(__x86_64__) || defined(__i386__)
      if (HasAVX2()) {
        auto* lerp = streaming ? LerpFloatIntoCheckingAVX2<true> : LerpFloatIntoCheckingAVX2<false>;
        return lerp(static_cast<float*>(out), static_cast<const float*>(a), static_cast<const float*>(x), n, w);
      }
#endif
      LerpFloatInto(static_cast<float*>(out), static_cast<const float*>(a), static_cast<const float*>(x), n, w);
      break;
    case Kind::kDouble:
      LerpDoubleInto(static_cast<double*>(out), static_cast<const double*>(a), static_cast<const double*>(x), n,
                     weight);
      break;
    case Kind::kFloatHalf:  // rare pairs: the in-place loop on a copy, so the rounding is its own
    case Kind::kFloatBfloat16:
      std::memcpy(out, a, n * sizeof(float));
      UpdateRange(Formula::kLerp, kind, out, x, n, Factors{0.0, weight});
      break;
    default:
      break;
  }
  return AnyNonfinite(kind, x, n);  // these values were just read: from the cache
}

void StoreFence() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_sfence();
#endif
}

// Copies of at least this many bytes bypass the cache (CopyStreaming).
constexpr int64_t kStreamingCopyBytes = 1 << 20;

void CopyBytes(char* dst, const char* src, int64_t n) {
#if defined(__x86_64__) || defined(__i386__)
  if (n >= kStreamingCopyBytes && HasAVX()) return CopyStreaming(dst, src, n);
#endif
  std::memcpy(dst, src, n);
}

void NarrowRange(bool bfloat16, uint16_t* out, const uint32_t* in, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = bfloat16 ? FloatToBfloat16(in[i]) : FloatToHalf(in[i]);
}
