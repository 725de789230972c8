// What one multi-tensor update works on, free of Paddle's headers so that the element loops
// (ema_simd.cc) and the CUDA kernel (ema_cuda_kernel.cuh) can also be built and checked on their
// own (benchmarks/cuda/).
#pragma once

#include <cstdint>

// The dtypes of one (average, value) pair: float32 averages with float32/float16/bfloat16 values,
// float64 with float64, and (GPU only: Paddle has no CPU add for them) float16 or bfloat16
// averages with values of their own dtype, the model-dtype averages of some suites.
enum class Kind : int32_t { kFloat, kFloatHalf, kFloatBfloat16, kDouble, kUnsupported, kHalf, kBfloat16 };

// One pair's memory: `numel` elements of average (written) and value (read).
struct Segment {
  void* average;
  const void* value;
  int64_t numel;
  Kind kind;
};

// The update formulas, each rounded as the Paddle ops that write it round it (no FMA):
//   kLerp         a + w * (x - a)                 paddle.lerp_; the package's own averages
//   kScaleAdd     (d * a + 0) + (w * x + 0)       `d * a + w * x` as two scale ops and an add
//                                                  (PaddleDetection, PaddleOCR, PaddleClas, ...)
//   kSubScaleSub  a - (w * (a - x) + 0)           `a - w * (a - x)`: subtract, scale, subtract
//                                                  (ppdiffusers' EMAModel)
// The + 0 is the scale op's bias: it turns a -0 product into +0.
enum class Formula : int32_t { kLerp, kScaleAdd, kSubScaleSub };

// The factors of one update: `weight` (w) for every formula, `decay` (d) for kScaleAdd.
struct Factors {
  double decay;
  double weight;
};
