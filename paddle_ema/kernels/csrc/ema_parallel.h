// Work split for the CPU passes over many tensors (ema_update.cc, ema_guard.cc, ema_ops.cc).
#pragma once

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "ema_segments.h"

// Below this many elements a single thread finishes before a team of threads would start.
constexpr int64_t kMinParallelElements = 1 << 16;
// Chunk sizes are multiples of 16 elements (one 64-byte line of float32), so that few chunk
// boundaries split a cache line between two threads.
constexpr int64_t kGrain = 16;
// Work is handed out in about this many chunks per thread, each at least kMinChunk elements
// (large enough that taking a chunk costs nothing next to streaming it).
constexpr int64_t kChunksPerThread = 8;
constexpr int64_t kMinChunk = 1 << 15;

// libiomp5's own calls (Paddle's OpenMP runtime); weak, so null where the extension links libgomp.
extern "C" {
int kmp_get_blocktime(void) __attribute__((weak));
void kmp_set_blocktime(int) __attribute__((weak));
}

// After a parallel region libiomp5's team threads spin for KMP_BLOCKTIME (200 ms by default)
// before they sleep. An EMA update is followed by the training step's own ops on the same cores,
// so a spinning worker takes a core from them for the whole step (docs/performance.md, "OpenMP's
// idle workers sleep after 1 ms"). Our regions fork their team with a blocktime of kBlocktimeMs,
// long enough for back-to-back updates to find the team awake. Where the thread had no explicit
// blocktime (kmp_get_blocktime() then reads 0 although the workers spin for the default), the
// 1 ms stays for the regions that follow on that thread: setting 0 back made Paddle's own regions
// there put their workers to sleep after every region, which slowed its kernels. An explicit
// value, from the user or Paddle, is set back after the join.
constexpr int kBlocktimeMs = 1;

class ShortBlocktime {
 public:
  ShortBlocktime() {
    if (kmp_get_blocktime == nullptr || kmp_set_blocktime == nullptr) return;
    saved_ = kmp_get_blocktime();
    kmp_set_blocktime(kBlocktimeMs);
  }
  ~ShortBlocktime() {
    if (saved_ > 0) kmp_set_blocktime(saved_);
  }
  ShortBlocktime(const ShortBlocktime&) = delete;
  ShortBlocktime& operator=(const ShortBlocktime&) = delete;

 private:
  int saved_ = -1;
};

// Runs body(segment, begin, end) over [start, stop) of the concatenation of all segments;
// `offsets` is the exclusive prefix sum of the segment sizes.
template <typename Body>
void ForRange(const std::vector<Segment>& segments, const std::vector<int64_t>& offsets,
              int64_t start, int64_t stop, Body body) {
  size_t s = std::upper_bound(offsets.begin(), offsets.end(), start) - offsets.begin() - 1;
  for (; s < segments.size() && offsets[s] < stop; ++s) {
    int64_t begin = std::max<int64_t>(start - offsets[s], 0);
    int64_t end = std::min<int64_t>(stop - offsets[s], segments[s].numel);
    if (begin < end) body(segments[s], begin, end);
  }
}

// Splits the total element count over the threads, by elements rather than by tensors: the
// concatenation of all tensors is cut into equal chunks, several per thread, which the threads
// take in turn from a shared counter, so that a thread the OS preempts (a busy machine) does not
// hold the others up. The counter instead of `omp for schedule(dynamic)` keeps the extension to
// the two OpenMP entry points that GNU and Intel runtimes share (it links Paddle's libiomp5).
//
// `backwards` hands the chunks out from the last one down: the guarded update reads the values a
// second time right after the scan read them front to back, and the scan's last chunks are the
// ones still in the cache.
template <typename Body>
void ParallelOverElements(const std::vector<Segment>& segments, int threads, Body body, bool backwards = false) {
  std::vector<int64_t> offsets(segments.size() + 1, 0);
  for (size_t s = 0; s < segments.size(); ++s) offsets[s + 1] = offsets[s] + segments[s].numel;
  const int64_t total = offsets.back();
  if (total == 0) return;
  if (threads <= 0) threads = omp_get_max_threads();
  const bool serial = total < kMinParallelElements || threads <= 1;
  int64_t chunk = serial ? std::max<int64_t>(total, 1)
                         : std::max<int64_t>(total / (int64_t{threads} * kChunksPerThread), kMinChunk);
  chunk = (chunk + kGrain - 1) / kGrain * kGrain;
  const int64_t chunks = (total + chunk - 1) / chunk;
  auto run = [&](int64_t taken) {
    const int64_t c = backwards ? chunks - 1 - taken : taken;
    ForRange(segments, offsets, c * chunk, std::min(total, (c + 1) * chunk), body);
  };
  if (serial) {
    run(0);
    return;
  }
  std::atomic<int64_t> next{0};
  ShortBlocktime blocktime;
#pragma omp parallel num_threads(static_cast<int>(std::min<int64_t>(threads, chunks)))
  {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed)) {
      run(c);
    }
  }
}
