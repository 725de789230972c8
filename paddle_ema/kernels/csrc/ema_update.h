// The entry points of the CPU passes, shared by the Python bindings (ema_python.cc), the
// static-program operators (ema_ops.cc) and the guarded update (ema_guard.cc); the CUDA glue
// (ema_ops.cu) implements UpdateSegmentsCUDA. See ema_update.cc for what each one does.
#pragma once

#include <cstdint>
#include <map>
#include <vector>

#include "ema_segments.h"
#include "paddle/extension.h"

struct TensorFacts;  // ema_tensors.h

// Which loop an (average, value) pair takes, or Kind::kUnsupported: dense, contiguous, one device
// (the CPU, or a GPU), same size. Half-precision averages (kHalf, kBfloat16) only on a GPU.
Kind KindOf(const TensorFacts& average, const TensorFacts& value);

// The pairs of one update sorted by where they run: CPU segments, GPU segments by device, and
// the indices of the pairs the extension does not take (for the caller's fallback).
struct Pairs {
  std::vector<Segment> cpu;
  std::map<int, std::vector<Segment>> gpu;  // by device id
  std::map<int, size_t> gpu_example;        // a tensor on that device, for its stream
  std::vector<int64_t> skipped;
};

// The pairs `formula` takes (shape mismatches refused first, whatever the formula); `op` names
// the kernel in the refusal.
Pairs SortPairs(Formula formula, const std::vector<const paddle::Tensor*>& averages,
                const std::vector<const paddle::Tensor*>& values, const char* op);

// Every segment of `pairs` updated in place by `formula` (CPU: one multi-threaded pass, taken
// backwards when `backwards`; GPU: one launch per device).
void UpdatePairs(Formula formula, const Pairs& pairs, const std::vector<const paddle::Tensor*>& averages,
                 const Factors& factors, int threads, bool backwards);

// CPU segments updated in one multi-threaded pass; averages <- values widened, in one pass.
void UpdateSegmentsCPU(Formula formula, const std::vector<Segment>& segments, const Factors& factors, int threads,
                       bool backwards = false);
void CopySegmentsCPU(const std::vector<Segment>& segments, int threads);

// The CPU values a scan reads, as segments with the index of each in `values`; the rest go to
// `unchecked`.
void ScanSegments(const std::vector<const paddle::Tensor*>& values, std::vector<Segment>* cpu,
                  std::vector<int64_t>* index_of, std::vector<int64_t>* unchecked);
// The position in `segments` of the first one holding a NaN or Inf, or -1.
int64_t FirstNonfiniteSegment(const std::vector<Segment>& segments, int threads);

// The dygraph entry points: the indices of the pairs left to the fallback, or the scan's answer.
std::vector<int64_t> UpdateTensors(Formula formula, const std::vector<const paddle::Tensor*>& averages,
                                   const std::vector<const paddle::Tensor*>& values, const Factors& factors,
                                   int threads);
int64_t ScanNonfinite(const std::vector<const paddle::Tensor*>& values, int threads,
                      std::vector<int64_t>* unchecked);
std::vector<int64_t> CopyTensors(const std::vector<const paddle::Tensor*>& targets,
                                 const std::vector<const paddle::Tensor*>& sources, int threads);

// The guarded updates (ema_guard.cc).
int64_t GuardedUpdateTensors(Formula formula, const std::vector<const paddle::Tensor*>& averages,
                             const std::vector<const paddle::Tensor*>& values,
                             const std::vector<const paddle::Tensor*>& scan, const Factors& factors, int threads,
                             std::vector<int64_t>* unchecked, std::vector<int64_t>* skipped);
int64_t GuardedLerpSwapTensors(const std::vector<const paddle::Tensor*>& averages,
                               const std::vector<const paddle::Tensor*>& values,
                               const std::vector<const paddle::Tensor*>& scan,
                               const std::vector<const paddle::Tensor*>& spares, double weight, int threads);

#ifdef PADDLE_EMA_WITH_CUDA
// Updates all segments (all on the device of `example`) in one launch on `example`'s stream.
void UpdateSegmentsCUDA(Formula formula, const std::vector<Segment>& segments, const Factors& factors,
                        const paddle::Tensor& example);
#endif
