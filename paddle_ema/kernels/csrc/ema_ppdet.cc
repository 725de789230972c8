// PaddleDetection's EMA step as one multi-tensor call (dygraph; ema_python.cc's ppdet_update_):
//
//   PpdetUpdateTensors(averages, values, decay, weight) -> skipped
//       averages[i] <- (d * averages[i] + 0) + (w * values[i] + 0), in place
//
// which is, rounding for rounding, what PaddleDetection's ModelEMA computes with Paddle's eager
// ops, `decay * v + (1 - decay) * x.astype('float32')`: each `python float * tensor` is Paddle's
// `scale` op (scale rounded to the tensor's dtype, then x * scale + bias with bias 0.0: the +0
// turns a -0 product into +0), and the `+` of two tensors is `add`. So d = float(decay) and
// w = float(weight) (the caller passes weight = 1 - decay computed in float64, as Python does;
// it is not 1 - d), each product and the sum rounded to float32 on its own, no FMA (the
// extension is compiled with -ffp-contract=off and without -ffast-math, so the + 0.0f stays).
//
// Pairs: float32 averages with float32/float16/bfloat16 values (the value widened exactly, as
// astype('float32') does), float64 with float64 (d and w used as float64, as scale does for a
// float64 tensor). Other pairs (another dtype, not contiguous, not both on the CPU) are left
// untouched and their indices returned, for the Paddle-ops fallback (kernels/reference.py).
//
// CPU only, multi-threaded over the total element count with ema_ops.cc's work split
// (ema_parallel.h; the thread count explicit because Paddle sets OMP_NUM_THREADS=1 at import).

#include <cstdint>
#include <cstring>
#include <vector>

#include "ema_compat.h"
#include "ema_half.h"
#include "ema_parallel.h"
#include "ema_ops.h"
#include "paddle/extension.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace {

// The + 0.0f are Paddle's scale bias: they make a -0 product +0, so they are not removable.
PADDLE_EMA_VECTOR_CLONES void StepFloat(float* __restrict a, const float* __restrict x, int64_t n, float d, float w) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) a[i] = (d * a[i] + 0.0f) + (w * x[i] + 0.0f);
}

PADDLE_EMA_VECTOR_CLONES void StepDouble(double* __restrict a, const double* __restrict x, int64_t n, double d,
                                        double w) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) a[i] = (d * a[i] + 0.0) + (w * x[i] + 0.0);
}

PADDLE_EMA_VECTOR_CLONES void StepBfloat16(float* __restrict a, const uint16_t* __restrict x, int64_t n, float d,
                                          float w) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) a[i] = (d * a[i] + 0.0f) + (w * Bfloat16ToFloat(x[i]) + 0.0f);
}

void StepHalfPortable(float* __restrict a, const uint16_t* __restrict x, int64_t n, float d, float w) {
  for (int64_t i = 0; i < n; ++i) a[i] = (d * a[i] + 0.0f) + (w * HalfToFloat(x[i]) + 0.0f);
}

#if defined(__x86_64__) || defined(__i386__)
// F16C widens 8 halves at once (exactly); the arithmetic is the same, not fused.
__attribute__((target("avx,f16c"))) void StepHalfF16C(float* __restrict a, const uint16_t* __restrict x, int64_t n,
                                                      float d, float w) {
  const __m256 vd = _mm256_set1_ps(d), vw = _mm256_set1_ps(w), zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 vx = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
    const __m256 va = _mm256_loadu_ps(a + i);
    const __m256 left = _mm256_add_ps(_mm256_mul_ps(vd, va), zero);
    const __m256 right = _mm256_add_ps(_mm256_mul_ps(vw, vx), zero);
    _mm256_storeu_ps(a + i, _mm256_add_ps(left, right));
  }
  StepHalfPortable(a + i, x + i, n - i, d, w);
}
#endif

void StepHalf(float* a, const uint16_t* x, int64_t n, float d, float w) {
#if defined(__x86_64__) || defined(__i386__)
  static const bool f16c = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  if (f16c) return StepHalfF16C(a, x, n, d, w);
#endif
  StepHalfPortable(a, x, n, d, w);
}

void StepRange(const Segment& s, int64_t b, int64_t e, double decay, double weight) {
  const float d = static_cast<float>(decay), w = static_cast<float>(weight);
  float* a = static_cast<float*>(s.average) + b;
  const uint16_t* h = static_cast<const uint16_t*>(s.value) + b;
  switch (s.kind) {
    case Kind::kFloat:
      StepFloat(a, static_cast<const float*>(s.value) + b, e - b, d, w);
      break;
    case Kind::kFloatHalf:
      StepHalf(a, h, e - b, d, w);
      break;
    case Kind::kFloatBfloat16:
      StepBfloat16(a, h, e - b, d, w);
      break;
    case Kind::kDouble:
      StepDouble(static_cast<double*>(s.average) + b, static_cast<const double*>(s.value) + b, e - b, decay, weight);
      break;
    case Kind::kUnsupported:
      break;
  }
}

void StepSegments(const std::vector<Segment>& segments, double decay, double weight, int threads) {
  ParallelOverElements(segments, threads, [decay, weight](const Segment& s, int64_t b, int64_t e) {
    StepRange(s, b, e, decay, weight);
  });
}

}  // namespace

std::vector<int64_t> PpdetUpdateTensors(const std::vector<const paddle::Tensor*>& averages,
                                        const std::vector<const paddle::Tensor*>& values, double decay,
                                        double weight, int threads) {
  PD_CHECK(averages.size() == values.size(), "paddle_ema ppdet_update_: ", averages.size(), " averages but ",
           values.size(), " values");
  std::vector<int64_t> skipped;
  std::vector<Segment> segments;
  segments.reserve(averages.size());
  for (size_t i = 0; i < averages.size(); ++i) {
    // The CPU pairs the update loops take (PaddleDetection's step has no CUDA kernel here).
    PrefetchFacts(averages, i);
    PrefetchFacts(values, i);
    const TensorFacts average = FactsOf(*averages[i]);
    const TensorFacts value = FactsOf(*values[i]);
    if (!SameDims(average, value)) ThrowShapeMismatch("ppdet_update_", i, "an average", average, "a value", value);
    const Kind kind = average.is_cpu() ? KindOf(average, value) : Kind::kUnsupported;
    if (kind == Kind::kUnsupported) {
      skipped.push_back(static_cast<int64_t>(i));
      continue;
    }
    if (average.numel == 0) continue;
    segments.push_back(Segment{average.data, value.data, average.numel, kind});
  }
  StepSegments(segments, decay, weight, threads);
  return skipped;
}
