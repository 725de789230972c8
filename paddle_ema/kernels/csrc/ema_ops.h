// Shared between the CPU operator (ema_ops.cc) and the CUDA kernel (ema_ops.cu).
#pragma once

#include <cstdint>
#include <vector>

#include "paddle/extension.h"

// The dtypes of one (average, value) pair.
enum class Kind : int32_t { kFloat, kFloatHalf, kFloatBfloat16, kDouble, kUnsupported };

// One pair's memory: `numel` elements of average (written) and value (read).
struct Segment {
  void* average;
  const void* value;
  int64_t numel;
  Kind kind;
};

#ifdef PADDLE_EMA_WITH_CUDA
// Updates all segments (all on the device of `example`) in one launch on `example`'s stream.
void LerpSegmentsCUDA(const std::vector<Segment>& segments, double weight, const paddle::Tensor& example);
#endif
