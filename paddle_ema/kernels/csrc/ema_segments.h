// What one multi-tensor update works on, free of Paddle's headers so that the CUDA kernel
// (ema_cuda_kernel.cuh) can also be built and checked on its own (benchmarks/cuda/).
#pragma once

#include <cstdint>

// The dtypes of one (average, value) pair.
enum class Kind : int32_t { kFloat, kFloatHalf, kFloatBfloat16, kDouble, kUnsupported };

// One pair's memory: `numel` elements of average (written) and value (read).
struct Segment {
  void* average;
  const void* value;
  int64_t numel;
  Kind kind;
};
