// Shared between the CPU operator (ema_ops.cc) and the CUDA kernel's Paddle glue (ema_ops.cu).
#pragma once

#include <vector>

#include "ema_segments.h"
#include "paddle/extension.h"

#ifdef PADDLE_EMA_WITH_CUDA
// Updates all segments (all on the device of `example`) in one launch on `example`'s stream.
void LerpSegmentsCUDA(const std::vector<Segment>& segments, double weight, const paddle::Tensor& example);
#endif
