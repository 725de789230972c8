// The multi-tensor passes: one call updates, copies or scans a whole list of tensors.
//
//   UpdateTensors(formula, averages, values, factors) -> skipped
//       averages[i] <- formula(averages[i], values[i]) in place, for each formula of
//       ema_segments.h (lerp, scale_add, sub_scale_sub) in the average's dtype, rounded step by
//       step as Paddle's ops round it (the element loops are ema_simd.cc).
//
// Each pair may have its own dtypes: float32 averages with float32/float16/bfloat16 values, or
// float64 with float64 (and on a GPU, float16/bfloat16 averages with values of their dtype, for
// scale_add and sub_scale_sub). Pairs this kernel does not handle (another dtype, average and
// value on different devices, a strided view) are left untouched and their indices returned for
// the caller's fallback (kernels/reference.py).
//
// CPU pairs are updated in one OpenMP pass of `threads` threads (<= 0: OpenMP's default) that
// splits the total element count evenly, whatever the tensor sizes (ema_parallel.h), so one big
// tensor and a thousand small ones both use every core. The thread count is explicit because
// Paddle sets OMP_NUM_THREADS=1 at import when it is unset. GPU pairs go to the CUDA kernel
// (ema_ops.cu, one launch per device) when it was compiled in.
//
//   ScanNonfinite(values) -> first: the index of the first tensor that holds a NaN or Inf (-1 if
//   none), in one multi-threaded read; the averages' guard against diverged weights.
//   CopyTensors(targets, sources): same-dtype CPU pairs byte for byte in one pass.

#include "ema_update.h"

#include <atomic>
#include <cstdint>
#include <vector>

#include "ema_parallel.h"
#include "ema_simd.h"
#include "ema_tensors.h"
#include "paddle/extension.h"

namespace {

int64_t AverageWidth(Kind kind) {
  return kind == Kind::kDouble ? 8 : (kind == Kind::kHalf || kind == Kind::kBfloat16) ? 2 : 4;
}

int64_t ValueWidth(Kind kind) {
  switch (kind) {
    case Kind::kDouble:
      return 8;
    case Kind::kFloat:
      return 4;
    default:
      return 2;
  }
}

}  // namespace

Kind KindOf(const TensorFacts& average, const TensorFacts& value) {
  using paddle::DataType;
  if (!average.usable || !value.usable || average.numel != value.numel || !average.contiguous ||
      !value.contiguous || average.where != value.where || average.device != value.device ||
      !(average.is_cpu() || average.is_gpu())) {
    return Kind::kUnsupported;
  }
  const DataType a = average.dtype, x = value.dtype;
  if (a == DataType::FLOAT32 && x == DataType::FLOAT32) return Kind::kFloat;
  if (a == DataType::FLOAT32 && x == DataType::FLOAT16) return Kind::kFloatHalf;
  if (a == DataType::FLOAT32 && x == DataType::BFLOAT16) return Kind::kFloatBfloat16;
  if (a == DataType::FLOAT64 && x == DataType::FLOAT64) return Kind::kDouble;
  // Half-precision arithmetic exists in Paddle on GPUs only (no CPU add for them).
  if (average.is_gpu() && a == DataType::FLOAT16 && x == DataType::FLOAT16) return Kind::kHalf;
  if (average.is_gpu() && a == DataType::BFLOAT16 && x == DataType::BFLOAT16) return Kind::kBfloat16;
  return Kind::kUnsupported;
}

Pairs SortPairs(Formula formula, const std::vector<const paddle::Tensor*>& averages,
                const std::vector<const paddle::Tensor*>& values, const char* op) {
  PD_CHECK(averages.size() == values.size(), "paddle_ema ", op, ": ", averages.size(), " averages but ",
           values.size(), " values");
  Pairs pairs;
  pairs.cpu.reserve(averages.size());
  for (size_t i = 0; i < averages.size(); ++i) {
    PrefetchFacts(averages, i);
    PrefetchFacts(values, i);
    const TensorFacts average = FactsOf(*averages[i]);
    const TensorFacts value = FactsOf(*values[i]);
    if (!SameDims(average, value)) ThrowShapeMismatch(op, i, "an average", average, "a value", value);
    const Kind kind = KindOf(average, value);
    // The package's own averages are float32/float64: the lerp has no half-precision average.
    const bool half_average = kind == Kind::kHalf || kind == Kind::kBfloat16;
    if (kind == Kind::kUnsupported || (half_average && formula == Formula::kLerp)) {
      pairs.skipped.push_back(static_cast<int64_t>(i));
      continue;
    }
    if (average.numel == 0) continue;
    Segment segment{average.data, value.data, average.numel, kind};
    if (average.is_cpu()) {
      pairs.cpu.push_back(segment);
    } else {
#ifdef PADDLE_EMA_WITH_CUDA
      const int device = average.device;
      pairs.gpu[device].push_back(segment);
      pairs.gpu_example.emplace(device, i);
#else
      pairs.skipped.push_back(static_cast<int64_t>(i));
#endif
    }
  }
  return pairs;
}

void UpdateSegmentsCPU(Formula formula, const std::vector<Segment>& segments, const Factors& factors, int threads,
                       bool backwards) {
  ParallelOverElements(segments, threads, [formula, &factors](const Segment& s, int64_t b, int64_t e) {
    UpdateRange(formula, s.kind, static_cast<char*>(s.average) + b * AverageWidth(s.kind),
                static_cast<const char*>(s.value) + b * ValueWidth(s.kind), e - b, factors);
  }, backwards);
}

void UpdatePairs(Formula formula, const Pairs& pairs, const std::vector<const paddle::Tensor*>& averages,
                 const Factors& factors, int threads, bool backwards) {
  UpdateSegmentsCPU(formula, pairs.cpu, factors, threads, backwards);
#ifdef PADDLE_EMA_WITH_CUDA
  for (const auto& [device, segments] : pairs.gpu) {
    UpdateSegmentsCUDA(formula, segments, factors, *averages[pairs.gpu_example.at(device)]);
  }
#else
  (void)averages;
#endif
}

// averages[i] <- values[i] exactly, widened to the average's dtype (half -> float is exact).
void CopySegmentsCPU(const std::vector<Segment>& segments, int threads) {
  ParallelOverElements(segments, threads, [](const Segment& s, int64_t b, int64_t e) {
    CopyWidenRange(s.kind, static_cast<char*>(s.average) + b * AverageWidth(s.kind),
                   static_cast<const char*>(s.value) + b * ValueWidth(s.kind), e - b);
  });
}

void ScanSegments(const std::vector<const paddle::Tensor*>& values, std::vector<Segment>* cpu,
                  std::vector<int64_t>* index_of, std::vector<int64_t>* unchecked) {
  using paddle::DataType;
  for (size_t i = 0; i < values.size(); ++i) {
    PrefetchFacts(values, i);
    const TensorFacts v = FactsOf(*values[i]);
    Kind kind = Kind::kUnsupported;
    if (v.is_cpu() && v.contiguous) {
      const DataType d = v.dtype;
      kind = d == DataType::FLOAT32    ? Kind::kFloat
             : d == DataType::FLOAT16  ? Kind::kFloatHalf
             : d == DataType::BFLOAT16 ? Kind::kFloatBfloat16
             : d == DataType::FLOAT64  ? Kind::kDouble
                                       : Kind::kUnsupported;
    }
    if (kind == Kind::kUnsupported) {
      unchecked->push_back(static_cast<int64_t>(i));
      continue;
    }
    if (v.numel == 0) continue;
    cpu->push_back(Segment{nullptr, v.data, v.numel, kind});
    index_of->push_back(static_cast<int64_t>(i));
  }
}

int64_t FirstNonfiniteSegment(const std::vector<Segment>& segments, int threads) {
  // The lowest segment found bad so far; segments after it need no more reading.
  std::atomic<int64_t> first{INT64_MAX};
  const Segment* base = segments.data();
  ParallelOverElements(segments, threads, [&first, base](const Segment& s, int64_t b, int64_t e) {
    const int64_t index = &s - base;
    if (index >= first.load(std::memory_order_relaxed)) return;
    if (AnyNonfinite(s.kind, static_cast<const char*>(s.value) + b * ValueWidth(s.kind), e - b)) {
      int64_t seen = first.load(std::memory_order_relaxed);
      while (index < seen && !first.compare_exchange_weak(seen, index, std::memory_order_relaxed)) {
      }
    }
  });
  const int64_t found = first.load();
  return found == INT64_MAX ? -1 : found;
}

std::vector<int64_t> UpdateTensors(Formula formula, const std::vector<const paddle::Tensor*>& averages,
                                   const std::vector<const paddle::Tensor*>& values, const Factors& factors,
                                   int threads) {
  static const char* const kNames[] = {"lerp_", "scale_add_", "sub_scale_sub_"};
  Pairs pairs = SortPairs(formula, averages, values, kNames[static_cast<int>(formula)]);
  UpdatePairs(formula, pairs, averages, factors, threads, false);
  return pairs.skipped;
}

// The index in `values` of the first tensor holding a NaN or Inf (-1 if none), read in one
// multi-threaded pass; the indices of tensors it cannot read (not on the CPU, not a floating
// dtype) go to `unchecked` and count as finite here.
int64_t ScanNonfinite(const std::vector<const paddle::Tensor*>& values, int threads,
                      std::vector<int64_t>* unchecked) {
  std::vector<int64_t> index_of;
  std::vector<Segment> cpu;
  ScanSegments(values, &cpu, &index_of, unchecked);
  const int64_t found = FirstNonfiniteSegment(cpu, threads);
  return found < 0 ? -1 : index_of[found];
}

// targets[i] <- sources[i] byte for byte where both are dense, contiguous CPU tensors of one dtype
// and size, in one multi-threaded pass (the swaps of apply()/restore()); the indices of the other
// pairs are returned for the caller's fallback.
std::vector<int64_t> CopyTensors(const std::vector<const paddle::Tensor*>& targets,
                                 const std::vector<const paddle::Tensor*>& sources, int threads) {
  PD_CHECK(targets.size() == sources.size(), "paddle_ema copy_: ", targets.size(), " targets but ",
           sources.size(), " sources");
  std::vector<int64_t> skipped;
  std::vector<Segment> bytes;  // numel counts bytes here
  bytes.reserve(targets.size());
  for (size_t i = 0; i < targets.size(); ++i) {
    PrefetchFacts(targets, i);
    PrefetchFacts(sources, i);
    const TensorFacts t = FactsOf(*targets[i]), s = FactsOf(*sources[i]);
    if (!SameDims(t, s)) ThrowShapeMismatch("copy_", i, "a target", t, "a source", s);
    if (!t.is_cpu() || !s.is_cpu() || !t.contiguous || !s.contiguous || t.dtype != s.dtype || t.numel != s.numel) {
      skipped.push_back(static_cast<int64_t>(i));
      continue;
    }
    if (t.numel == 0 || t.data == s.data) continue;
    bytes.push_back(Segment{t.data, s.data, t.numel * static_cast<int64_t>(phi::SizeOf(t.dtype)), Kind::kFloat});
  }
  ParallelOverElements(bytes, threads, [](const Segment& s, int64_t b, int64_t e) {
    CopyBytes(static_cast<char*>(s.average) + b, static_cast<const char*>(s.value) + b, e - b);
  });
  return skipped;
}
