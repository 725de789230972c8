// Shared between the CPU code (ema_ops.cc), its Python bindings (ema_python.cc) and the CUDA
// kernel's Paddle glue (ema_ops.cu). See ema_ops.cc for what each function does.
#pragma once

#include <cstdint>
#include <vector>

#include "ema_segments.h"
#include "paddle/extension.h"

struct TensorFacts;  // ema_compat.h

// Which kernel an (average, value) pair takes, or Kind::kUnsupported (ema_ops.cc).
Kind KindOf(const TensorFacts& average, const TensorFacts& value);
Kind KindOf(const paddle::Tensor& average, const paddle::Tensor& value);
std::vector<int64_t> LerpTensors(const std::vector<const paddle::Tensor*>& averages,
                                 const std::vector<const paddle::Tensor*>& values, double weight, int threads);
int64_t ScanNonfinite(const std::vector<const paddle::Tensor*>& values, int threads,
                      std::vector<int64_t>* unchecked);
int64_t GuardedLerpTensors(const std::vector<const paddle::Tensor*>& averages,
                           const std::vector<const paddle::Tensor*>& values,
                           const std::vector<const paddle::Tensor*>& scan, double weight, int threads,
                           std::vector<int64_t>* unchecked, std::vector<int64_t>* skipped);
int64_t GuardedLerpSwapTensors(const std::vector<const paddle::Tensor*>& averages,
                               const std::vector<const paddle::Tensor*>& values,
                               const std::vector<const paddle::Tensor*>& scan,
                               const std::vector<const paddle::Tensor*>& spares, double weight, int threads);
std::vector<int64_t> CopyTensors(const std::vector<const paddle::Tensor*>& targets,
                                 const std::vector<const paddle::Tensor*>& sources, int threads);
void StreamAdd(const paddle::Tensor& a, const paddle::Tensor& x, int threads);
// PaddleDetection's EMA step, a <- (d*a + 0) + (w*x + 0) (ema_ppdet.cc).
std::vector<int64_t> PpdetUpdateTensors(const std::vector<const paddle::Tensor*>& averages,
                                        const std::vector<const paddle::Tensor*>& values, double decay,
                                        double weight, int threads);

#ifdef PADDLE_EMA_WITH_CUDA
// Updates all segments (all on the device of `example`) in one launch on `example`'s stream.
void LerpSegmentsCUDA(const std::vector<Segment>& segments, double weight, const paddle::Tensor& example);
#endif
