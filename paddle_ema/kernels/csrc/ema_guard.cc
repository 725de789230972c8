// The guarded updates: an update only when no weight of `scan` holds NaN or Inf.
//
//   GuardedUpdateTensors(formula, averages, values, scan): the scan, then the update in place
//   (16 bytes a float32 parameter), for every formula.
//   GuardedLerpSwapTensors(averages, values, scan, spares): the lerp written into spares in one
//   pass that also checks the values (12 bytes a parameter); the averages and spares trade
//   buffers only when every weight was finite.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "ema_compat.h"
#include "ema_parallel.h"
#include "ema_simd.h"
#include "ema_tensors.h"
#include "ema_update.h"
#include "paddle/extension.h"

// The update must not touch an average when any weight is non-finite, and a+w(x-a) cannot be
// undone exactly, so the whole scan comes first (4 bytes a parameter); the update then takes the
// chunks backwards, so that the values the scan read last come from the cache rather than from
// memory.
//
// Returns the index in `scan` of the first non-finite tensor (nothing updated), or -1. When some
// tensor of `scan` cannot be read here (`unchecked` not empty), nothing is read or updated at all
// and the caller takes its separate path; otherwise `skipped` lists the pairs left to the fallback.
int64_t GuardedUpdateTensors(Formula formula, const std::vector<const paddle::Tensor*>& averages,
                             const std::vector<const paddle::Tensor*>& values,
                             const std::vector<const paddle::Tensor*>& scan, const Factors& factors, int threads,
                             std::vector<int64_t>* unchecked, std::vector<int64_t>* skipped) {
  static const char* const kNames[] = {"guarded_lerp_", "guarded_scale_add_", "guarded_sub_scale_sub_"};
  std::vector<Segment> scan_segments;
  std::vector<int64_t> index_of;
  scan_segments.reserve(scan.size());
  index_of.reserve(scan.size());
  ScanSegments(scan, &scan_segments, &index_of, unchecked);
  if (!unchecked->empty()) return -1;
  // Before the scan: a shape mismatch is an error either way.
  Pairs pairs = SortPairs(formula, averages, values, kNames[static_cast<int>(formula)]);
  const int64_t bad = FirstNonfiniteSegment(scan_segments, threads);
  if (bad >= 0) return index_of[bad];
  UpdatePairs(formula, pairs, averages, factors, threads, true);
  *skipped = std::move(pairs.skipped);
  return -1;
}

namespace {

// The one-pass update checks for a non-finite value between blocks of this many elements, so
// that a diverged step stops early.
constexpr int64_t kGuardBlock = 1 << 14;
// From this many bytes of averages on, the one-pass update writes with non-temporal stores: about
// a quarter of a server's last-level cache (docs/performance.md, "Small sets stay in place").
constexpr int64_t kStreamingLerpBytes = 8 << 20;

// The pairs of a one-pass update: each average's segment, the spare its new values go to, and
// every value's data (to recognise the weights of `scan` that are values).
struct SwapPlan {
  std::vector<Segment> segments;
  std::vector<void*> outs;
  std::vector<const void*> value_data;
  bool ok = true;  // false: some pair is not one this path takes
};

SwapPlan PlanSwap(const std::vector<const paddle::Tensor*>& averages, const std::vector<const paddle::Tensor*>& values,
                  const std::vector<const paddle::Tensor*>& spares) {
  SwapPlan plan;
  plan.segments.reserve(averages.size());
  plan.outs.reserve(averages.size());
  plan.value_data.reserve(values.size());
  for (size_t i = 0; i < averages.size(); ++i) {
    PrefetchFacts(averages, i);
    PrefetchFacts(spares, i);
    PrefetchFacts(values, i);
    const TensorFacts average = FactsOf(*averages[i]);
    const TensorFacts spare = FactsOf(*spares[i]);
    const TensorFacts value = FactsOf(*values[i]);
    if (!SameDims(average, value)) ThrowShapeMismatch("guarded_lerp_", i, "an average", average, "a value", value);
    const Kind kind = KindOf(average, value);
    if (kind == Kind::kUnsupported || kind == Kind::kHalf || kind == Kind::kBfloat16 || !average.is_cpu() ||
        !spare.is_cpu() || !spare.contiguous || spare.dtype != average.dtype || spare.numel != average.numel ||
        (average.numel > 0 && spare.data == average.data)) {
      plan.ok = false;
      return plan;
    }
    plan.value_data.push_back(value.data);
    if (average.numel == 0) continue;
    plan.segments.push_back(Segment{average.data, value.data, average.numel, kind});
    plan.outs.push_back(spare.data);
  }
  return plan;
}

// The weights of `scan` that decide but are not values here (other ranks' shards), read on their
// own: the index in `scan` of the first non-finite one, -1, or -2 when one cannot be read here.
int64_t ScanOtherWeights(const std::vector<const paddle::Tensor*>& scan, const std::vector<const paddle::Tensor*>& values,
                         std::vector<const void*> value_data, int threads) {
  bool scan_is_values = scan.size() == values.size();  // the common case: the same list
  for (size_t i = 0; scan_is_values && i < scan.size(); ++i) {
    // The same Python object is the same Tensor here (the bindings take references).
    scan_is_values = scan[i] == values[i] || FactsOf(*scan[i]).data == value_data[i];
  }
  if (scan_is_values) return -1;
  std::vector<const paddle::Tensor*> others;
  std::sort(value_data.begin(), value_data.end());
  for (size_t i = 0; i < scan.size(); ++i) {
    if (!std::binary_search(value_data.begin(), value_data.end(), FactsOf(*scan[i]).data)) others.push_back(scan[i]);
  }
  std::vector<Segment> segments;
  std::vector<int64_t> index_of, unchecked;
  ScanSegments(others, &segments, &index_of, &unchecked);
  if (!unchecked.empty()) return -2;
  return FirstNonfiniteSegment(segments, threads) >= 0 ? 0 : -1;  // which one: FirstBadInScan
}

// Once some weight is known to be bad: the lowest index in `scan` that is (scan's order, which
// need not be the pairs'), read again in full; only on this rare path.
int64_t FirstBadInScan(const std::vector<const paddle::Tensor*>& scan, int threads) {
  std::vector<int64_t> none;
  const int64_t first = ScanNonfinite(scan, threads, &none);
  PD_CHECK(first >= 0, "paddle_ema guarded_lerp_: a value changed while it was read");
  return first;
}

bool AnyValueBad(const std::vector<Segment>& segments, int threads) {
  std::vector<Segment> values;
  values.reserve(segments.size());
  for (const Segment& s : segments) values.push_back(Segment{nullptr, s.value, s.numel, s.kind});
  return FirstNonfiniteSegment(values, threads) >= 0;
}

// The one pass: spare <- lerp(average, value) block by block, each block's values checked as they
// are read; true when a non-finite value stopped it (the spares then hold garbage).
bool LerpIntoSpares(const SwapPlan& plan, double weight, int threads, bool streaming) {
  std::atomic<bool> bad{false};
  const Segment* base = plan.segments.data();
  ParallelOverElements(plan.segments, threads, [&](const Segment& s, int64_t b, int64_t e) {
    const size_t width = s.kind == Kind::kDouble ? 8 : 4;
    const size_t value_width = s.kind == Kind::kFloatHalf || s.kind == Kind::kFloatBfloat16 ? 2 : width;
    char* out = static_cast<char*>(plan.outs[&s - base]);
    const char* a = static_cast<const char*>(s.average);
    const char* x = static_cast<const char*>(s.value);
    for (int64_t i = b; i < e; i += kGuardBlock) {
      if (bad.load(std::memory_order_relaxed)) return;
      const int64_t n = std::min<int64_t>(kGuardBlock, e - i);
      if (LerpIntoChecking(s.kind, out + i * width, a + i * width, x + i * value_width, n, weight, streaming)) {
        bad.store(true, std::memory_order_relaxed);
        return;
      }
    }
  });
  StoreFence();  // the streaming stores are visible before the buffers change hands
  return bad.load();
}

void TradeBuffers(const std::vector<const paddle::Tensor*>& averages, const std::vector<const paddle::Tensor*>& spares) {
  for (size_t i = 0; i < averages.size(); ++i) {
    PrefetchFacts(averages, i);  // the pass has pushed them out of the cache since they were read
    PrefetchFacts(spares, i);
    paddle_ema_compat::SwapBuffers(*averages[i], *spares[i]);
  }
}

}  // namespace

// The guarded lerp with the new averages written to `spares` (one per average: same dtype and
// size) instead of in place; when every weight was finite each average then takes its spare's
// buffer and the spare the old one (the Tensor objects stay, their buffers trade places).
//
// Why: in place, no average may be written before every weight has been read, so the weights are
// read twice, 16 bytes a parameter. Written elsewhere, the averages are only replaced at the end,
// so the scan of each block of weights and its update run together while the block is in the
// cache: 12 bytes a parameter, the traffic of the unguarded update, at the cost of a second buffer
// of the averages. Sets smaller than kStreamingLerpBytes are updated in place instead (scan, then
// update), which is faster while they are in the cache; the spares are then left as they are.
//
// Returns the index in `scan` of the first non-finite tensor (no average changed), -1 when the
// averages were updated, or -2 when some tensor is not a CPU tensor this path handles (nothing
// was read or written: the caller takes GuardedUpdateTensors). `scan` holds every weight whose
// finiteness decides; those that are not among `values` are read first, on their own.
int64_t GuardedLerpSwapTensors(const std::vector<const paddle::Tensor*>& averages,
                               const std::vector<const paddle::Tensor*>& values,
                               const std::vector<const paddle::Tensor*>& scan,
                               const std::vector<const paddle::Tensor*>& spares, double weight, int threads) {
  PD_CHECK(averages.size() == values.size() && averages.size() == spares.size(), "paddle_ema guarded_lerp_: ",
           averages.size(), " averages, ", values.size(), " values and ", spares.size(), " spares");
  const SwapPlan plan = PlanSwap(averages, values, spares);
  if (!plan.ok) return -2;
  const int64_t other = ScanOtherWeights(scan, values, plan.value_data, threads);
  if (other == -2) return -2;
  if (other >= 0) return FirstBadInScan(scan, threads);
  int64_t total_bytes = 0;
  for (const Segment& s : plan.segments) total_bytes += s.numel * (s.kind == Kind::kDouble ? 8 : 4);
  if (total_bytes < kStreamingLerpBytes) {
    // A set that fits in the cache reads its values a second time from there: in place is faster
    // than writing a second buffer (docs/performance.md, "Small sets stay in place").
    if (AnyValueBad(plan.segments, threads)) return FirstBadInScan(scan, threads);
    UpdateSegmentsCPU(Formula::kLerp, plan.segments, Factors{0.0, weight}, threads, true);
    return -1;
  }
  if (LerpIntoSpares(plan, weight, threads, true)) return FirstBadInScan(scan, threads);  // stopped at a bad block
  TradeBuffers(averages, spares);
  return -1;
}
