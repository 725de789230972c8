// Multi-tensor EMA update: one call for a whole list of tensors, for dygraph (as Python functions,
// ema_python.cc) and for static programs (as Paddle custom operators, below).
//
//   LerpTensors(averages, values, weight) -> skipped    (dygraph: ema_python.cc's lerp_)
//       averages[i] <- averages[i] + weight * (values[i] - averages[i]), in place
//
// with exactly Paddle's lerp formula a + w * (x - a) in the average's dtype (a float32 weight for
// float32 averages, as paddle.lerp_ rounds a Python float), so a constant stays constant and
// the result equals paddle.lerp_'s bit for bit. Each pair may have its own dtypes: float32
// averages with float32/float16/bfloat16 values, or float64 with float64. Pairs this kernel does
// not handle (another dtype, average and value on different devices, a strided view) are left
// untouched and their indices returned for the caller's fallback.
//
// CPU pairs are updated in one OpenMP pass of `threads` threads (<= 0: OpenMP's default) that
// splits the total element count evenly, whatever the tensor sizes, so one big tensor and a
// thousand small ones both use every core. The thread count is explicit because Paddle sets
// OMP_NUM_THREADS=1 at import when it is unset, which makes OpenMP's default a single thread.
// GPU pairs go to the CUDA kernel in ema_ops.cu (one launch per device) when it was compiled in.
//
//   ScanNonfinite(values) -> first: the index of the first tensor that holds a NaN or Inf (-1 if
//   none), in one multi-threaded read of every value; the EMA's guard against diverged weights.
//
//   GuardedLerpTensors(averages, values, scan): the update only if no tensor of scan holds NaN
//   or Inf: the scan, then the update in place (16 bytes a float32 parameter).
//   GuardedLerpSwapTensors(averages, values, scan, spares): the same result written into spares
//   in one pass that also checks the values (12 bytes a parameter); the averages and spares
//   trade buffers only when every weight was finite.
//
//   StreamAdd(a, x): a += x over one flat float32 buffer: the same 12 bytes per element as the
//   EMA update with the same threading, the memory floor for the benchmarks.
//
// Operators, for static programs (CPU only; a pair or value they cannot handle is an error, since
// a program has no fallback to hand it to):
//
//   paddle_ema_lerp_by_tensor(averages, values, weight): the update with the weight a
//       one-element float32/float64 CPU tensor read at run time, so that a program can compute
//       it (bias correction, a skipped step). Like kernels.lerp_: weight 0 leaves the averages
//       untouched (also where values hold NaN) and weight 1 copies the values exactly.
//   paddle_ema_all_finite(values) -> finite: ScanNonfinite's read as one bool [1].
//   paddle_ema_cast_to_float16(x), paddle_ema_cast_to_bfloat16(x) -> out: float32 -> half
//       rounded to nearest, ties to even, on every Paddle version (Paddle's own CPU cast rounds
//       toward zero before 3.2, bfloat16 on 2.6 too), the bits of kernels.reference.cast: for
//       float16 numpy's astype (NaN payloads kept, overflow to inf, subnormal halves), for
//       bfloat16 the top 16 bits rounded, every NaN 0x7fff (what Paddle 3.x writes).

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <map>
#include <vector>

#include "paddle/extension.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "ema_compat.h"
#include "ema_half.h"
#include "ema_parallel.h"
#include "ema_ops.h"

// Which kernel a pair takes, or kUnsupported.
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
  return Kind::kUnsupported;
}

Kind KindOf(const paddle::Tensor& average, const paddle::Tensor& value) {
  return KindOf(FactsOf(average), FactsOf(value));
}

namespace {

// Copies of at least this many bytes bypass the cache (CopyStreaming): a block this large would
// push everything else out of a core's L2 anyway.
constexpr int64_t kStreamingCopyBytes = 1 << 20;

PADDLE_EMA_VECTOR_CLONES void LerpFloat(float* __restrict a, const float* __restrict x, int64_t n, float w) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) a[i] = a[i] + w * (x[i] - a[i]);
}

PADDLE_EMA_VECTOR_CLONES void LerpDouble(double* __restrict a, const double* __restrict x, int64_t n, double w) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) a[i] = a[i] + w * (x[i] - a[i]);
}

PADDLE_EMA_VECTOR_CLONES void AddFloat(float* __restrict a, const float* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) a[i] = a[i] + x[i];
}

void LerpHalfPortable(float* __restrict a, const uint16_t* __restrict x, int64_t n, float w) {
  for (int64_t i = 0; i < n; ++i) a[i] = a[i] + w * (HalfToFloat(x[i]) - a[i]);
}

#if defined(__x86_64__) || defined(__i386__)
// The portable conversion does not vectorise; x86 CPUs since 2012 convert 8 halves at once
// (F16C). Chosen at run time, so the extension still loads on older CPUs. The same formula,
// not fused into an FMA.
__attribute__((target("avx,f16c"))) void LerpHalfF16C(float* __restrict a, const uint16_t* __restrict x,
                                                      int64_t n, float w) {
  const __m256 vw = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 vx = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
    const __m256 va = _mm256_loadu_ps(a + i);
    _mm256_storeu_ps(a + i, _mm256_add_ps(va, _mm256_mul_ps(vw, _mm256_sub_ps(vx, va))));
  }
  LerpHalfPortable(a + i, x + i, n - i, w);
}

bool HasF16C() {
  static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return has;
}
#endif

void LerpHalf(float* a, const uint16_t* x, int64_t n, float w) {
#if defined(__x86_64__) || defined(__i386__)
  if (HasF16C()) return LerpHalfF16C(a, x, n, w);
#endif
  LerpHalfPortable(a, x, n, w);
}

PADDLE_EMA_VECTOR_CLONES void LerpBfloat16(float* __restrict a, const uint16_t* __restrict x, int64_t n, float w) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) a[i] = a[i] + w * (Bfloat16ToFloat(x[i]) - a[i]);
}

// Non-finite means an all-ones exponent: a test on the bits, OR-reduced so that it vectorises.
template <typename Bits>
inline bool AnyAllOnesExponent(const Bits* __restrict x, int64_t n, Bits mask) {
  Bits any = 0;
#pragma omp simd reduction(| : any)
  for (int64_t i = 0; i < n; ++i) any |= static_cast<Bits>((x[i] & mask) == mask);
  return any != 0;
}

PADDLE_EMA_VECTOR_CLONES bool AnyNonfinite32Portable(const uint32_t* x, int64_t n) {
  return AnyAllOnesExponent<uint32_t>(x, n, 0x7f800000u);
}

#if defined(__x86_64__) || defined(__i386__)
// The guard's scan is a third of the guarded update's memory traffic but, written as one OR
// reduction over one stream, took twice as long as its bytes need: a single sequential read
// stream does not keep enough cache misses in flight on one core. This reads four streams (the
// quarters of the range) at once, each into its own accumulator, and runs at about the read
// bandwidth (on the 2-core EPYC: 0.43x the time of a += x, against 0.6x for one stream). Same
// test: an all-ones exponent.
__attribute__((target("avx2"))) inline __m256i AllOnesExponent8(const uint32_t* x, __m256i mask) {
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)), mask), mask);
}

__attribute__((target("avx2"))) bool AnyNonfinite32AVX2(const uint32_t* x, int64_t n) {
  const __m256i mask = _mm256_set1_epi32(0x7f800000);
  __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  const int64_t quarter = n / 32 * 8;
  const uint32_t* x1 = x + quarter;
  const uint32_t* x2 = x1 + quarter;
  const uint32_t* x3 = x2 + quarter;
  for (int64_t i = 0; i < quarter; i += 8) {
    acc0 = _mm256_or_si256(acc0, AllOnesExponent8(x + i, mask));
    acc1 = _mm256_or_si256(acc1, AllOnesExponent8(x1 + i, mask));
    acc2 = _mm256_or_si256(acc2, AllOnesExponent8(x2 + i, mask));
    acc3 = _mm256_or_si256(acc3, AllOnesExponent8(x3 + i, mask));
  }
  const __m256i any = _mm256_or_si256(_mm256_or_si256(acc0, acc1), _mm256_or_si256(acc2, acc3));
  if (!_mm256_testz_si256(any, any)) return true;
  return AnyNonfinite32Portable(x + 4 * quarter, n - 4 * quarter);
}

// memcpy of a large block with non-temporal stores: the copy's destination is not read first
// (no read-for-ownership), so it moves 8 bytes a float32 instead of 12. glibc's memcpy switches
// to such stores only above ~3/4 of the last-level cache, larger than one thread's chunk.
__attribute__((target("avx"))) void CopyStreaming(char* __restrict dst, const char* __restrict src, int64_t n) {
  const int64_t head = std::min<int64_t>(n, (32 - reinterpret_cast<uintptr_t>(dst) % 32) % 32);
  std::memcpy(dst, src, head);
  int64_t i = head;
  for (; i + 128 <= n; i += 128) {
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 32));
    const __m256i v2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 64));
    const __m256i v3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 96));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), v0);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 32), v1);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 64), v2);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 96), v3);
  }
  _mm_sfence();
  std::memcpy(dst + i, src + i, n - i);
}

bool HasAVX() {
  static const bool has = __builtin_cpu_supports("avx");
  return has;
}

bool HasAVX2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

bool AnyNonfinite32(const uint32_t* x, int64_t n) {
#if defined(__x86_64__) || defined(__i386__)
  if (HasAVX2()) return AnyNonfinite32AVX2(x, n);
#endif
  return AnyNonfinite32Portable(x, n);
}
PADDLE_EMA_VECTOR_CLONES bool AnyNonfinite64(const uint64_t* x, int64_t n) {
  return AnyAllOnesExponent<uint64_t>(x, n, 0x7ff0000000000000ull);
}
PADDLE_EMA_VECTOR_CLONES bool AnyNonfiniteHalf(const uint16_t* x, int64_t n) {
  return AnyAllOnesExponent<uint16_t>(x, n, 0x7c00u);
}
PADDLE_EMA_VECTOR_CLONES bool AnyNonfiniteBfloat16(const uint16_t* x, int64_t n) {
  return AnyAllOnesExponent<uint16_t>(x, n, 0x7f80u);
}

// out <- a + w * (x - a): the in-place kernels' formula and rounding, written to a separate buffer
// (the double-buffered guarded update below).
PADDLE_EMA_VECTOR_CLONES void LerpFloatInto(float* __restrict out, const float* __restrict a,
                                            const float* __restrict x, int64_t n, float w) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + w * (x[i] - a[i]);
}

#if defined(__x86_64__) || defined(__i386__)
// The same, and the finiteness test of x, in one pass over the three streams: returns whether any
// x has an all-ones exponent. Separate multiply and add, as LerpFloat (no FMA). With kStreaming
// the stores are non-temporal: `out` is not read first (no read-for-ownership), so the pass moves
// 12 bytes a parameter, as the in-place update, instead of 16; for sets that fit in the cache
// plain stores are faster (non-temporal ones would send every line to memory).
template <bool kStreaming>
__attribute__((target("avx2"))) bool LerpFloatIntoCheckingAVX2(float* __restrict out, const float* __restrict a,
                                                               const float* __restrict x, int64_t n, float w) {
  // Aligned to a 64-byte line, so that each line is written whole by one iteration.
  const int64_t head = std::min<int64_t>(n, ((64 - reinterpret_cast<uintptr_t>(out) % 64) % 64) / sizeof(float));
  bool bad = AnyNonfinite32Portable(reinterpret_cast<const uint32_t*>(x), head);
  LerpFloatInto(out, a, x, head, w);
  const __m256 vw = _mm256_set1_ps(w);
  const __m256i mask = _mm256_set1_epi32(0x7f800000);
  __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0;
  int64_t i = head;
  for (; i + 32 <= n; i += 32) {
    for (int64_t j = i; j < i + 32; j += 16) {
      const __m256 a0 = _mm256_loadu_ps(a + j), a1 = _mm256_loadu_ps(a + j + 8);
      const __m256 x0 = _mm256_loadu_ps(x + j), x1 = _mm256_loadu_ps(x + j + 8);
      acc0 = _mm256_or_si256(acc0, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(x0), mask), mask));
      acc1 = _mm256_or_si256(acc1, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(x1), mask), mask));
      const __m256 r0 = _mm256_add_ps(a0, _mm256_mul_ps(vw, _mm256_sub_ps(x0, a0)));
      const __m256 r1 = _mm256_add_ps(a1, _mm256_mul_ps(vw, _mm256_sub_ps(x1, a1)));
      if (kStreaming) {
        _mm256_stream_ps(out + j, r0);
        _mm256_stream_ps(out + j + 8, r1);
      } else {
        _mm256_store_ps(out + j, r0);
        _mm256_store_ps(out + j + 8, r1);
      }
    }
  }
  const __m256i any = _mm256_or_si256(acc0, acc1);
  bad = bad || !_mm256_testz_si256(any, any);
  bad = AnyNonfinite32Portable(reinterpret_cast<const uint32_t*>(x + i), n - i) || bad;
  LerpFloatInto(out + i, a + i, x + i, n - i, w);
  return bad;
}
#endif

PADDLE_EMA_VECTOR_CLONES void LerpDoubleInto(double* __restrict out, const double* __restrict a,
                                             const double* __restrict x, int64_t n, double w) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + w * (x[i] - a[i]);
}

void LerpSegmentsCPU(const std::vector<Segment>& segments, double weight, int threads, bool backwards = false) {
  // paddle.lerp_ turns a Python float weight into a float32 tensor: round the same way.
  const float w = static_cast<float>(weight);
  ParallelOverElements(segments, threads, [w, weight](const Segment& s, int64_t b, int64_t e) {
    float* a = static_cast<float*>(s.average) + b;
    switch (s.kind) {
      case Kind::kFloat:
        LerpFloat(a, static_cast<const float*>(s.value) + b, e - b, w);
        break;
      case Kind::kFloatHalf:
        LerpHalf(a, static_cast<const uint16_t*>(s.value) + b, e - b, w);
        break;
      case Kind::kFloatBfloat16:
        LerpBfloat16(a, static_cast<const uint16_t*>(s.value) + b, e - b, w);
        break;
      case Kind::kDouble:
        LerpDouble(static_cast<double*>(s.average) + b, static_cast<const double*>(s.value) + b, e - b, weight);
        break;
      case Kind::kUnsupported:
        break;
    }
  }, backwards);
}

// averages[i] <- values[i] exactly, widened to the average's dtype (half -> float is exact).
void CopySegmentsCPU(const std::vector<Segment>& segments, int threads) {
  ParallelOverElements(segments, threads, [](const Segment& s, int64_t b, int64_t e) {
    float* a = static_cast<float*>(s.average) + b;
    const uint16_t* h = static_cast<const uint16_t*>(s.value) + b;
    switch (s.kind) {
      case Kind::kFloat:
        std::memcpy(a, static_cast<const float*>(s.value) + b, (e - b) * sizeof(float));
        break;
      case Kind::kFloatHalf:
        for (int64_t i = 0; i < e - b; ++i) a[i] = HalfToFloat(h[i]);
        break;
      case Kind::kFloatBfloat16:
        for (int64_t i = 0; i < e - b; ++i) a[i] = Bfloat16ToFloat(h[i]);
        break;
      case Kind::kDouble:
        std::memcpy(static_cast<double*>(s.average) + b, static_cast<const double*>(s.value) + b,
                    (e - b) * sizeof(double));
        break;
      case Kind::kUnsupported:
        break;
    }
  });
}

// The pairs of one update sorted by where they run: CPU segments, GPU segments by device, and
// the indices of the pairs this kernel does not handle.
struct Pairs {
  std::vector<Segment> cpu;
  std::map<int, std::vector<Segment>> gpu;  // by device id
  std::map<int, size_t> gpu_example;        // a tensor on that device, for its stream
  std::vector<int64_t> skipped;
};

Pairs SortPairs(const std::vector<const paddle::Tensor*>& averages, const std::vector<const paddle::Tensor*>& values,
                const char* op) {
  PD_CHECK(averages.size() == values.size(), "paddle_ema lerp_: ", averages.size(), " averages but ",
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
    if (kind == Kind::kUnsupported) {
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

void LerpPairs(const Pairs& pairs, const std::vector<const paddle::Tensor*>& averages, double weight, int threads,
               bool backwards) {
  LerpSegmentsCPU(pairs.cpu, weight, threads, backwards);
#ifdef PADDLE_EMA_WITH_CUDA
  for (const auto& [device, segments] : pairs.gpu) {
    LerpSegmentsCUDA(segments, weight, *averages[pairs.gpu_example.at(device)]);
  }
#else
  (void)averages;
#endif
}

// The values the scan reads (dense contiguous CPU tensors of a floating dtype) as segments, with
// the index of each in `values`; the others go to `unchecked`.
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

// The position in `segments` of the first one holding a NaN or Inf, or -1: one multi-threaded read.
int64_t FirstNonfiniteSegment(const std::vector<Segment>& segments, int threads) {
  // The lowest segment found bad so far; segments after it need no more reading.
  std::atomic<int64_t> first{INT64_MAX};
  const Segment* base = segments.data();
  ParallelOverElements(segments, threads, [&first, base](const Segment& s, int64_t b, int64_t e) {
    const int64_t index = &s - base;
    if (index >= first.load(std::memory_order_relaxed)) return;
    bool bad = false;
    switch (s.kind) {
      case Kind::kFloat:
        bad = AnyNonfinite32(static_cast<const uint32_t*>(s.value) + b, e - b);
        break;
      case Kind::kFloatHalf:
        bad = AnyNonfiniteHalf(static_cast<const uint16_t*>(s.value) + b, e - b);
        break;
      case Kind::kFloatBfloat16:
        bad = AnyNonfiniteBfloat16(static_cast<const uint16_t*>(s.value) + b, e - b);
        break;
      case Kind::kDouble:
        bad = AnyNonfinite64(static_cast<const uint64_t*>(s.value) + b, e - b);
        break;
      case Kind::kUnsupported:
        break;
    }
    if (bad) {
      int64_t seen = first.load(std::memory_order_relaxed);
      while (index < seen && !first.compare_exchange_weak(seen, index, std::memory_order_relaxed)) {
      }
    }
  });
  const int64_t found = first.load();
  return found == INT64_MAX ? -1 : found;
}

// float32 -> IEEE half, round to nearest, ties to even, in integer arithmetic (the result
// does not depend on the FPU's rounding mode or flush-to-zero). Bit for bit numpy's
// npy_floatbits_to_halfbits, NaN payloads included, as Paddle 3.2+'s CPU cast.
inline uint16_t FloatToHalf(uint32_t f) {
  const uint16_t sign = static_cast<uint16_t>((f >> 16) & 0x8000u);
  const uint32_t a = f & 0x7fffffffu;
  if (a >= 0x7f800000u) {  // inf, or NaN with the top of its payload (still a NaN)
    if (a == 0x7f800000u) return sign | 0x7c00u;
    const uint16_t nan = static_cast<uint16_t>(0x7c00u | ((a >> 13) & 0x3ffu));
    return sign | (nan == 0x7c00u ? 0x7c01u : nan);
  }
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520: ties to even past 65504 = inf
  if (a >= 0x38800000u) {                       // a normal half: drop 13 bits, rounded
    const uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
    return sign | static_cast<uint16_t>((rounded - (static_cast<uint32_t>(127 - 15) << 23)) >> 13);
  }
  if (a < 0x33000000u) return sign;  // below half the smallest subnormal (2^-25): zero
  // A subnormal half, counted in units of 2^-24: the 24-bit significand shifted down, rounded
  // (a carry into 0x400 is the smallest normal half, encoded the same).
  const uint32_t shift = 126u - (a >> 23);  // 14 .. 24
  const uint32_t significand = (a & 0x7fffffu) | 0x800000u;
  const uint32_t kept = significand >> shift;
  const uint32_t rest = significand & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  return sign | static_cast<uint16_t>(kept + (rest > half || (rest == half && (kept & 1u))));
}

// float32 -> bfloat16: the top 16 bits rounded to nearest, ties to even (an overflow carries into
// inf, subnormals round like the rest); every NaN becomes 0x7fff.
inline uint16_t FloatToBfloat16(uint32_t f) {
  if ((f & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  return static_cast<uint16_t>((f + 0x7fffu + ((f >> 16) & 1u)) >> 16);
}

template <bool kBfloat16>
std::vector<paddle::Tensor> CastToHalf(const paddle::Tensor& x, int threads) {
  PD_CHECK(x.is_dense_tensor() && x.is_cpu() && x.dtype() == paddle::DataType::FLOAT32 && EmaIsContiguous(x),
           kBfloat16 ? "paddle_ema_cast_to_bfloat16" : "paddle_ema_cast_to_float16",
           ": the input must be a dense, contiguous float32 CPU tensor; the static EMA emits Paddle's "
           "cast for programs that run elsewhere");
  paddle::Tensor out = paddle::empty(x.shape(), kBfloat16 ? paddle::DataType::BFLOAT16 : paddle::DataType::FLOAT16,
                                     paddle::CPUPlace());
  if (x.numel() == 0) return {out};
  std::vector<Segment> segments{{out.data(), x.data(), x.numel(), Kind::kFloat}};
  ParallelOverElements(segments, threads, [](const Segment& s, int64_t b, int64_t e) {
    uint16_t* narrow = static_cast<uint16_t*>(s.average) + b;
    const uint32_t* wide = static_cast<const uint32_t*>(s.value) + b;
    for (int64_t i = 0; i < e - b; ++i) narrow[i] = kBfloat16 ? FloatToBfloat16(wide[i]) : FloatToHalf(wide[i]);
  });
  return {out};
}

}  // namespace

// The dygraph update (bound to Python in ema_python.cc): writes the averages through their data
// pointers and returns the indices of the pairs it does not handle, for the caller's fallback.
std::vector<int64_t> LerpTensors(const std::vector<const paddle::Tensor*>& averages,
                                 const std::vector<const paddle::Tensor*>& values, double weight, int threads) {
  Pairs pairs = SortPairs(averages, values, "lerp_");
  LerpPairs(pairs, averages, weight, threads, false);
  return pairs.skipped;
}

// The guarded update in one call: scan `scan` (the weights whose finiteness decides, which
// include `values`), and only if none holds a NaN or Inf, update. The update must not touch an
// average when any weight is non-finite and a+w(x-a) cannot be undone exactly, so the whole scan
// comes first (4 bytes a parameter); the update then takes the chunks backwards, so that the values
// the scan read last come from the cache rather than from memory.
//
// Returns the index in `scan` of the first non-finite tensor (nothing updated), or -1. When some
// tensor of `scan` cannot be read here (`unchecked` not empty), nothing is read or updated at all
// and the caller takes its separate path; otherwise `skipped` lists the pairs left to the fallback.
int64_t GuardedLerpTensors(const std::vector<const paddle::Tensor*>& averages,
                           const std::vector<const paddle::Tensor*>& values,
                           const std::vector<const paddle::Tensor*>& scan, double weight, int threads,
                           std::vector<int64_t>* unchecked, std::vector<int64_t>* skipped) {
  std::vector<Segment> scan_segments;
  std::vector<int64_t> index_of;
  scan_segments.reserve(scan.size());
  index_of.reserve(scan.size());
  ScanSegments(scan, &scan_segments, &index_of, unchecked);
  if (!unchecked->empty()) return -1;
  // Before the scan: a shape mismatch is an error either way.
  Pairs pairs = SortPairs(averages, values, "guarded_lerp_");
  const int64_t bad = FirstNonfiniteSegment(scan_segments, threads);
  if (bad >= 0) return index_of[bad];
  LerpPairs(pairs, averages, weight, threads, true);
  *skipped = std::move(pairs.skipped);
  return -1;
}

namespace {

// The double-buffered update checks for a non-finite value between blocks of this many elements,
// so that a diverged step stops early.
constexpr int64_t kGuardBlock = 1 << 14;
// From this many bytes of averages on, the double-buffered update writes with non-temporal stores
// (LerpFloatIntoCheckingAVX2): a quarter of a 32 MB last-level cache.
constexpr int64_t kStreamingLerpBytes = 8 << 20;

bool AnyNonfiniteOf(Kind kind, const void* x, int64_t n) {
  switch (kind) {
    case Kind::kFloat:
      return AnyNonfinite32(static_cast<const uint32_t*>(x), n);
    case Kind::kFloatHalf:
      return AnyNonfiniteHalf(static_cast<const uint16_t*>(x), n);
    case Kind::kFloatBfloat16:
      return AnyNonfiniteBfloat16(static_cast<const uint16_t*>(x), n);
    case Kind::kDouble:
      return AnyNonfinite64(static_cast<const uint64_t*>(x), n);
    case Kind::kUnsupported:
      break;
  }
  return false;
}

// out[0, n) <- a + w (x - a) for n elements of one pair of `kind`, bit for bit LerpSegmentsCPU's
// result; returns whether any of the n values is NaN or Inf (then `out` holds garbage).
bool LerpIntoChecking(Kind kind, void* out, const void* a, const void* x, int64_t n, float w, double weight,
                      bool streaming) {
  switch (kind) {
    case Kind::kFloat:
#if defined(__x86_64__) || defined(__i386__)
      if (HasAVX2()) {
        auto* lerp = streaming ? LerpFloatIntoCheckingAVX2<true> : LerpFloatIntoCheckingAVX2<false>;
        return lerp(static_cast<float*>(out), static_cast<const float*>(a), static_cast<const float*>(x), n, w);
      }
#endif
      LerpFloatInto(static_cast<float*>(out), static_cast<const float*>(a), static_cast<const float*>(x), n, w);
      break;
    case Kind::kDouble:
      LerpDoubleInto(static_cast<double*>(out), static_cast<const double*>(a), static_cast<const double*>(x), n,
                     weight);
      break;
    case Kind::kFloatHalf:  // rare pairs: the in-place kernel on a copy, so the rounding is its own
      std::memcpy(out, a, n * sizeof(float));
      LerpHalf(static_cast<float*>(out), static_cast<const uint16_t*>(x), n, w);
      break;
    case Kind::kFloatBfloat16:
      std::memcpy(out, a, n * sizeof(float));
      LerpBfloat16(static_cast<float*>(out), static_cast<const uint16_t*>(x), n, w);
      break;
    case Kind::kUnsupported:
      break;
  }
  return AnyNonfiniteOf(kind, x, n);  // these values were just read: from the cache
}

}  // namespace

// The guarded update with the new averages written to `spares` (one per average: same dtype and
// size) instead of in place; when every weight was finite each average then takes its spare's
// buffer and the spare the old one (the Tensor objects stay, their buffers trade places).
//
// Why: in place, no average may be written before every weight has been read (a + w (x - a)
// cannot be undone exactly), so the weights are read twice, 16 bytes a parameter. Written
// elsewhere, the averages are only replaced at the end, so the scan of each block of weights
// and its update run together while the block is in the cache: 12 bytes a parameter, the traffic
// of the unguarded update, at the cost of a second buffer of the averages.
//
// Sets smaller than kStreamingLerpBytes are updated in place instead (scan, then update), which is
// faster while they are in the cache; the spares are then left as they are.
//
// Returns the index in `scan` of the first non-finite tensor (no average changed), -1 when the
// averages were updated, or -2 when some tensor is not a CPU tensor this path handles (nothing
// was read or written: the caller takes GuardedLerpTensors). `scan` holds every weight whose
// finiteness decides; those that are not among `values` are read first, on their own.
int64_t GuardedLerpSwapTensors(const std::vector<const paddle::Tensor*>& averages,
                               const std::vector<const paddle::Tensor*>& values,
                               const std::vector<const paddle::Tensor*>& scan,
                               const std::vector<const paddle::Tensor*>& spares, double weight, int threads) {
  PD_CHECK(averages.size() == values.size() && averages.size() == spares.size(), "paddle_ema guarded_lerp_: ",
           averages.size(), " averages, ", values.size(), " values and ", spares.size(), " spares");
  std::vector<Segment> segments;
  std::vector<void*> outs;
  std::vector<int64_t> pair_of;  // segment -> pair index
  segments.reserve(averages.size());
  outs.reserve(averages.size());
  std::vector<const void*> value_data;
  value_data.reserve(values.size());
  for (size_t i = 0; i < averages.size(); ++i) {
    PrefetchFacts(averages, i);
    PrefetchFacts(spares, i);
    PrefetchFacts(values, i);
    const TensorFacts average = FactsOf(*averages[i]);
    const TensorFacts spare = FactsOf(*spares[i]);
    const TensorFacts value_facts = FactsOf(*values[i]);
    if (!SameDims(average, value_facts)) {
      ThrowShapeMismatch("guarded_lerp_", i, "an average", average, "a value", value_facts);
    }
    const Kind kind = KindOf(average, value_facts);
    if (kind == Kind::kUnsupported || !average.is_cpu() || !spare.is_cpu() || !spare.contiguous ||
        spare.dtype != average.dtype) {
      return -2;
    }
    const int64_t numel = average.numel;
    void* average_data = average.data;
    void* spare_data = spare.data;
    const void* value = value_facts.data;
    if (spare.numel != numel || (numel > 0 && spare_data == average_data)) return -2;
    value_data.push_back(value);
    if (numel == 0) continue;
    segments.push_back(Segment{average_data, value, numel, kind});
    outs.push_back(spare_data);
    pair_of.push_back(static_cast<int64_t>(i));
  }
  // The weights that decide but are not averaged here (other ranks' shards): read first.
  std::vector<const paddle::Tensor*> others;
  bool scan_is_values = scan.size() == values.size();  // the common case: the same list
  for (size_t i = 0; scan_is_values && i < scan.size(); ++i) {
    // The same Python object is the same Tensor here (the bindings take references).
    scan_is_values = scan[i] == values[i] || FactsOf(*scan[i]).data == value_data[i];
  }
  if (!scan_is_values) {
    std::sort(value_data.begin(), value_data.end());
    for (size_t i = 0; i < scan.size(); ++i) {
      if (!std::binary_search(value_data.begin(), value_data.end(), FactsOf(*scan[i]).data)) {
        others.push_back(scan[i]);
      }
    }
  }
  std::vector<Segment> other_segments;
  std::vector<int64_t> other_of, unchecked;
  ScanSegments(others, &other_segments, &other_of, &unchecked);
  if (!unchecked.empty()) return -2;
  // Once some weight is known to be bad: the lowest index in `scan` that is (scan's order, which
  // need not be the pairs'), read again in full; only on this rare path.
  auto lowest_bad_in_scan = [&]() -> int64_t {
    std::vector<int64_t> none;
    const int64_t first = ScanNonfinite(scan, threads, &none);
    PD_CHECK(first >= 0, "paddle_ema guarded_lerp_: a value changed while it was read");
    return first;
  };
  if (FirstNonfiniteSegment(other_segments, threads) >= 0) return lowest_bad_in_scan();

  const float w = static_cast<float>(weight);
  int64_t total_bytes = 0;
  for (const Segment& s : segments) total_bytes += s.numel * (s.kind == Kind::kDouble ? 8 : 4);
  const bool streaming = total_bytes >= kStreamingLerpBytes;
  auto any_value_bad = [&]() -> bool {
    std::vector<Segment> pair_values;
    pair_values.reserve(segments.size());
    for (const Segment& s : segments) pair_values.push_back(Segment{nullptr, s.value, s.numel, s.kind});
    return FirstNonfiniteSegment(pair_values, threads) >= 0;
  };
  if (!streaming) {
    // A set that fits in the cache reads its values a second time from there: in place is faster
    // than writing a second buffer (LeNet: 9.5 against 11.9 us).
    if (any_value_bad()) return lowest_bad_in_scan();
    LerpSegmentsCPU(segments, weight, threads, true);
    return -1;
  }
  std::atomic<bool> bad{false};
  const Segment* base = segments.data();
  ParallelOverElements(segments, threads, [&](const Segment& s, int64_t b, int64_t e) {
    const size_t width = s.kind == Kind::kDouble ? 8 : 4;
    const size_t value_width = s.kind == Kind::kFloatHalf || s.kind == Kind::kFloatBfloat16 ? 2 : width;
    char* out = static_cast<char*>(outs[&s - base]);
    const char* a = static_cast<const char*>(s.average);
    const char* x = static_cast<const char*>(s.value);
    for (int64_t i = b; i < e; i += kGuardBlock) {
      if (bad.load(std::memory_order_relaxed)) return;
      const int64_t n = std::min<int64_t>(kGuardBlock, e - i);
      if (LerpIntoChecking(s.kind, out + i * width, a + i * width, x + i * value_width, n, w, weight, streaming)) {
        bad.store(true, std::memory_order_relaxed);
        return;
      }
    }
  });
#if defined(__x86_64__) || defined(__i386__)
  _mm_sfence();  // the streaming stores are visible before the buffers change hands
#endif
  if (bad.load()) {
    return lowest_bad_in_scan();  // the pass stopped at the first bad block any thread met
  }
  for (size_t i = 0; i < averages.size(); ++i) {
    PrefetchFacts(averages, i);  // the pass has pushed them out of the cache since the loop above
    PrefetchFacts(spares, i);
    paddle_ema_compat::SwapBuffers(*averages[i], *spares[i]);
  }
  return -1;
}

// targets[i] <- sources[i] byte for byte where both are dense, contiguous CPU tensors of one dtype
// and size, in one multi-threaded pass (the swap of apply()/restore()); the indices of the other
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
    char* dst = static_cast<char*>(s.average) + b;
    const char* src = static_cast<const char*>(s.value) + b;
#if defined(__x86_64__) || defined(__i386__)
    if (e - b >= kStreamingCopyBytes && HasAVX()) return CopyStreaming(dst, src, e - b);
#endif
    std::memcpy(dst, src, e - b);
  });
  return skipped;
}

void StreamAdd(const paddle::Tensor& a, const paddle::Tensor& x, int threads) {
  PD_CHECK(a.is_cpu() && x.is_cpu() && a.dtype() == paddle::DataType::FLOAT32 &&
               x.dtype() == paddle::DataType::FLOAT32 && a.numel() == x.numel() && EmaIsContiguous(a) &&
               EmaIsContiguous(x),
           "stream_add_: two contiguous float32 CPU tensors of one size");
  std::vector<Segment> segments{{const_cast<void*>(a.data()), x.data(), a.numel(), Kind::kFloat}};
  ParallelOverElements(segments, threads, [](const Segment& s, int64_t b, int64_t e) {
    AddFloat(static_cast<float*>(s.average) + b, static_cast<const float*>(s.value) + b, e - b);
  });
}

void LerpByTensor(std::vector<paddle::Tensor>& averages,  // NOLINT
                  const std::vector<paddle::Tensor>& values, const paddle::Tensor& weight, int threads) {
  using paddle::DataType;
  PD_CHECK(averages.size() == values.size(), "paddle_ema_lerp_by_tensor: ", averages.size(),
           " averages but ", values.size(), " values");
  PD_CHECK(weight.is_cpu() && weight.numel() == 1 &&
               (weight.dtype() == DataType::FLOAT32 || weight.dtype() == DataType::FLOAT64),
           "paddle_ema_lerp_by_tensor: the weight must be a one-element float32 or float64 CPU tensor");
  const double w = weight.dtype() == DataType::FLOAT32 ? static_cast<double>(weight.data<float>()[0])
                                                       : weight.data<double>()[0];
  if (w == 0.0) return;
  std::vector<Segment> segments;
  segments.reserve(averages.size());
  for (size_t i = 0; i < averages.size(); ++i) {
    const TensorFacts average = FactsOf(averages[i]), value = FactsOf(values[i]);
    PD_CHECK(SameDims(average, value), "paddle_ema_lerp_by_tensor: pair ", i, " has an average of shape ",
             DimsText(*average.dims), " and a value of shape ", DimsText(*value.dims), "; the shapes must be equal");
    const Kind kind = KindOf(average, value);
    PD_CHECK(kind != Kind::kUnsupported && averages[i].is_cpu(), "paddle_ema_lerp_by_tensor: pair ", i,
             " is not a CPU pair it updates (float32 average with float32/float16/bfloat16 value, or "
             "float64 with float64, same size, contiguous); the static EMA emits Paddle's own ops "
             "for programs that run elsewhere");
    if (averages[i].numel() == 0) continue;
    segments.push_back(Segment{averages[i].data(), values[i].data(), averages[i].numel(), kind});
  }
  if (w == 1.0) {
    CopySegmentsCPU(segments, threads);
  } else {
    LerpSegmentsCPU(segments, w, threads);
  }
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

// The static EMA's guard: a program has no fallback for tensors the scan cannot read, so they
// are an error rather than a list handed back.
std::vector<paddle::Tensor> AllFinite(const std::vector<paddle::Tensor>& values, int threads) {
  std::vector<const paddle::Tensor*> pointers;
  pointers.reserve(values.size());
  for (const paddle::Tensor& v : values) pointers.push_back(&v);
  std::vector<int64_t> unchecked;
  const int64_t first = ScanNonfinite(pointers, threads, &unchecked);
  PD_CHECK(unchecked.empty(), "paddle_ema_all_finite: value ", unchecked.empty() ? 0 : unchecked[0],
           " is not a dense CPU tensor of float32, float16, bfloat16 or float64; the static EMA emits "
           "Paddle's own ops for programs that run elsewhere");
  paddle::Tensor finite = paddle::empty({1}, paddle::DataType::BOOL, paddle::CPUPlace());
  finite.data<bool>()[0] = first < 0;
  return {finite};
}

std::vector<std::vector<int64_t>> AllFiniteInferShape(const std::vector<std::vector<int64_t>>& /*values*/) {
  return {{1}};
}

std::vector<paddle::DataType> AllFiniteInferDtype(const std::vector<paddle::DataType>& /*values*/) {
  return {paddle::DataType::BOOL};
}

// The same scan for static programs: one bool [1] (true: no NaN or Inf anywhere), with the
// shape and dtype functions a program needs to declare its output.
PD_BUILD_OP(paddle_ema_all_finite)
    .Inputs({paddle::Vec("Values")})
    .Outputs({"Finite"})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(AllFinite))
    .SetInferShapeFn(PD_INFER_SHAPE(AllFiniteInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(AllFiniteInferDtype));

// The static EMA's update: the weight is computed by the program, so it is an input.
PD_BUILD_OP(paddle_ema_lerp_by_tensor)
    .Inputs({paddle::Vec("Averages"), paddle::Vec("Values"), "Weight"})
    .Outputs({paddle::Vec("AveragesOut")})
    .Attrs({"threads: int"})
    .SetInplaceMap({{paddle::Vec("Averages"), paddle::Vec("AveragesOut")}})
    .SetKernelFn(PD_KERNEL(LerpByTensor));

std::vector<paddle::Tensor> CastToFloat16(const paddle::Tensor& x, int threads) { return CastToHalf<false>(x, threads); }
std::vector<paddle::Tensor> CastToBfloat16(const paddle::Tensor& x, int threads) { return CastToHalf<true>(x, threads); }

std::vector<std::vector<int64_t>> CastInferShape(const std::vector<int64_t>& x) { return {x}; }
std::vector<paddle::DataType> Float16InferDtype(const paddle::DataType& /*x*/) { return {paddle::DataType::FLOAT16}; }
std::vector<paddle::DataType> Bfloat16InferDtype(const paddle::DataType& /*x*/) {
  return {paddle::DataType::BFLOAT16};
}

// The static EMA's apply(): the float32 average narrowed to a half-precision parameter with the
// same rounding on every Paddle version (program_ops.fused_cast).
PD_BUILD_OP(paddle_ema_cast_to_float16)
    .Inputs({"X"})
    .Outputs({"Out"})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(CastToFloat16))
    .SetInferShapeFn(PD_INFER_SHAPE(CastInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(Float16InferDtype));

PD_BUILD_OP(paddle_ema_cast_to_bfloat16)
    .Inputs({"X"})
    .Outputs({"Out"})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(CastToBfloat16))
    .SetInferShapeFn(PD_INFER_SHAPE(CastInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(Bfloat16InferDtype));
