// The CUDA multi-tensor EMA update, free of Paddle: every (average, value) pair of one device in
// a single launch, for each formula of ema_segments.h. ema_ops.cu wraps it for the extension;
// benchmarks/cuda/lerp_check.cu builds it on its own to check its numbers and time it where no
// CUDA build of Paddle exists.
//
// The pairs are cut into chunks of kChunk elements, one thread block per chunk, so a thousand
// small tensors cost one launch, not a thousand, and a big tensor spreads over many blocks. The
// chunk table (MakeChunkTable) travels to the device in one copy before the launch.
//
// Float32 and float64 averages compute each formula with explicitly rounded operations
// (__fmul_rn/__fadd_rn/__fsub_rn, built with --fmad=false as well): no FMA contraction, the same
// rounding as Paddle's ops and as the CPU loops. Float16 and bfloat16 averages (scale_add and
// sub_scale_sub only: the model-dtype averages of some suites) follow Paddle's GPU kernels: each
// op computes in float32 with the factor as a float32 (scale's MPType) and rounds its result to
// the half type once (nearest, ties to even), as `scale` then `add`/`subtract` do there.
//
// The lerp's weight comes from the host or, for a weight computed on the device (a static
// program's schedule), from a device pointer; a device weight of 0 leaves the averages as they
// are (even where x is NaN) and one of 1 copies x exactly, the rule kernels.lerp_ applies on the
// host before it calls an operator with any other weight.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "ema_segments.h"

namespace paddle_ema_cuda {

constexpr int kThreads = 256;
constexpr int64_t kChunk = int64_t{1} << 16;

struct DeviceSegment {
  void* average;
  const void* value;
  int64_t numel;
  int32_t kind;
  int32_t unused;
};

// The launch's metadata in one host buffer: [segments | chunk -> segment | chunk -> first element].
struct ChunkTable {
  std::vector<uint8_t> bytes;
  size_t segment_index_offset = 0;
  size_t chunk_start_offset = 0;
  unsigned int chunks = 0;
};

inline size_t AlignUp16(size_t n) { return (n + 15) / 16 * 16; }

inline ChunkTable MakeChunkTable(const Segment* segments, size_t count) {
  std::vector<DeviceSegment> table;
  std::vector<int32_t> chunk_segment;
  std::vector<int64_t> chunk_start;
  table.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    const Segment& s = segments[i];
    const int32_t index = static_cast<int32_t>(table.size());
    table.push_back({s.average, s.value, s.numel, static_cast<int32_t>(s.kind), 0});
    for (int64_t start = 0; start < s.numel; start += kChunk) {
      chunk_segment.push_back(index);
      chunk_start.push_back(start);
    }
  }
  ChunkTable out;
  out.chunks = static_cast<unsigned int>(chunk_start.size());
  out.segment_index_offset = AlignUp16(table.size() * sizeof(DeviceSegment));
  out.chunk_start_offset = out.segment_index_offset + AlignUp16(chunk_segment.size() * sizeof(int32_t));
  out.bytes.assign(out.chunk_start_offset + chunk_start.size() * sizeof(int64_t), 0);
  std::memcpy(out.bytes.data(), table.data(), table.size() * sizeof(DeviceSegment));
  std::memcpy(out.bytes.data() + out.segment_index_offset, chunk_segment.data(),
              chunk_segment.size() * sizeof(int32_t));
  std::memcpy(out.bytes.data() + out.chunk_start_offset, chunk_start.data(), chunk_start.size() * sizeof(int64_t));
  return out;
}

__device__ __forceinline__ float ToFloat(float v) { return v; }

// float16 and bfloat16 values arrive as their bits.
struct HalfBits {
  uint16_t bits;
};
struct Bfloat16Bits {
  uint16_t bits;
};

__device__ __forceinline__ float ToFloat(HalfBits h) {
  float out;
  asm("{ cvt.f32.f16 %0, %1; }" : "=f"(out) : "h"(h.bits));
  return out;
}

__device__ __forceinline__ float ToFloat(Bfloat16Bits b) { return __uint_as_float(static_cast<uint32_t>(b.bits) << 16); }

__device__ __forceinline__ float LerpFloat(float a, float x, float w) {
  return __fadd_rn(a, __fmul_rn(w, __fsub_rn(x, a)));
}

// One element of formula F in float32 (the average's dtype), each operation rounded on its own.
template <Formula F>
__device__ __forceinline__ float ApplyFloat(float a, float x, float d, float w) {
  if constexpr (F == Formula::kLerp) {
    return LerpFloat(a, x, w);
  } else if constexpr (F == Formula::kScaleAdd) {
    return __fadd_rn(__fadd_rn(__fmul_rn(d, a), 0.0f), __fadd_rn(__fmul_rn(w, x), 0.0f));
  } else {
    return __fsub_rn(a, __fadd_rn(__fmul_rn(w, __fsub_rn(a, x)), 0.0f));
  }
}

template <Formula F>
__device__ __forceinline__ double ApplyDouble(double a, double x, double d, double w) {
  if constexpr (F == Formula::kLerp) {
    return __dadd_rn(a, __dmul_rn(w, __dsub_rn(x, a)));
  } else if constexpr (F == Formula::kScaleAdd) {
    return __dadd_rn(__dadd_rn(__dmul_rn(d, a), 0.0), __dadd_rn(__dmul_rn(w, x), 0.0));
  } else {
    return __dsub_rn(a, __dadd_rn(__dmul_rn(w, __dsub_rn(a, x)), 0.0));
  }
}

// float32 -> the half type, rounded to nearest, ties to even, and back (exact): one op's result.
__device__ __forceinline__ uint16_t Narrow(float v, HalfBits) {
  uint16_t bits;
  asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(bits) : "f"(v));
  return bits;
}

__device__ __forceinline__ uint16_t Narrow(float v, Bfloat16Bits) {
  const uint32_t f = __float_as_uint(v);
  if ((f & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // every NaN, as Paddle writes it
  return static_cast<uint16_t>((f + 0x7fffu + ((f >> 16) & 1u)) >> 16);
}

template <typename H>
__device__ __forceinline__ float Rounded(float v) {
  return ToFloat(H{Narrow(v, H{})});
}

// One element of formula F for a half-precision average: Paddle's GPU ops, each computed in
// float32 and rounded to the half type (scale: float32(d) * a + 0; add, subtract).
template <Formula F, typename H>
__device__ __forceinline__ uint16_t ApplyNarrow(H a, H x, float d, float w) {
  const float af = ToFloat(a), xf = ToFloat(x);
  if constexpr (F == Formula::kScaleAdd) {
    const float left = Rounded<H>(__fadd_rn(__fmul_rn(d, af), 0.0f));
    const float right = Rounded<H>(__fadd_rn(__fmul_rn(w, xf), 0.0f));
    return Narrow(__fadd_rn(left, right), H{});
  } else {  // kSubScaleSub (no half-precision lerp: the package keeps float32 averages)
    const float difference = Rounded<H>(__fsub_rn(af, xf));
    const float scaled = Rounded<H>(__fadd_rn(__fmul_rn(w, difference), 0.0f));
    return Narrow(__fsub_rn(af, scaled), H{});
  }
}

// Four values in one load: 16 bytes of float32, 8 of the 16-bit types.
template <typename X>
struct alignas(4 * sizeof(X)) Pack4 {
  X v[4];
};

// a[0:n] <- F(a, x) by the block's threads; 16-byte loads and stores where both are aligned.
template <Formula F, typename X>
__device__ void UpdateRange(float* __restrict__ a, const X* __restrict__ x, int64_t n, float d, float w, bool copy) {
  int64_t i = threadIdx.x;
  if (reinterpret_cast<uintptr_t>(a) % 16 == 0 && reinterpret_cast<uintptr_t>(x) % sizeof(Pack4<X>) == 0) {
    const int64_t packs = n / 4;
    float4* a4 = reinterpret_cast<float4*>(a);
    const Pack4<X>* x4 = reinterpret_cast<const Pack4<X>*>(x);
    for (int64_t j = threadIdx.x; j < packs; j += blockDim.x) {
      float4 av = a4[j];
      const Pack4<X> xv = x4[j];
      if (copy) {
        av = make_float4(ToFloat(xv.v[0]), ToFloat(xv.v[1]), ToFloat(xv.v[2]), ToFloat(xv.v[3]));
      } else {
        av.x = ApplyFloat<F>(av.x, ToFloat(xv.v[0]), d, w);
        av.y = ApplyFloat<F>(av.y, ToFloat(xv.v[1]), d, w);
        av.z = ApplyFloat<F>(av.z, ToFloat(xv.v[2]), d, w);
        av.w = ApplyFloat<F>(av.w, ToFloat(xv.v[3]), d, w);
      }
      a4[j] = av;
    }
    i = packs * 4 + threadIdx.x;
  }
  for (; i < n; i += blockDim.x) a[i] = copy ? ToFloat(x[i]) : ApplyFloat<F>(a[i], ToFloat(x[i]), d, w);
}

template <Formula F>
__device__ void UpdateRangeDouble(double* __restrict__ a, const double* __restrict__ x, int64_t n, double d, double w,
                                  bool copy) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) a[i] = copy ? x[i] : ApplyDouble<F>(a[i], x[i], d, w);
}

template <Formula F, typename H>
__device__ void UpdateRangeNarrow(H* __restrict__ a, const H* __restrict__ x, int64_t n, float d, float w) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) a[i] = H{ApplyNarrow<F>(a[i], x[i], d, w)};
}

// One block per chunk. `device_weight`, when set, replaces the host weight of a lerp (as float32
// for float32 averages, widened for float64 ones).
template <Formula F>
__global__ void UpdateChunks(const DeviceSegment* __restrict__ segments, const int32_t* __restrict__ chunk_segment,
                             const int64_t* __restrict__ chunk_start, float df, float wf, double dd, double wd,
                             const float* __restrict__ device_weight) {
  bool copy = false;
  if (F == Formula::kLerp && device_weight != nullptr) {
    wf = *device_weight;
    wd = static_cast<double>(wf);
    if (wf == 0.0f) return;
    copy = wf == 1.0f;
  }
  const DeviceSegment s = segments[chunk_segment[blockIdx.x]];
  const int64_t begin = chunk_start[blockIdx.x];
  const int64_t n = (begin + kChunk < s.numel ? begin + kChunk : s.numel) - begin;
  switch (static_cast<Kind>(s.kind)) {
    case Kind::kFloat:
      UpdateRange<F>(static_cast<float*>(s.average) + begin, static_cast<const float*>(s.value) + begin, n, df, wf,
                     copy);
      break;
    case Kind::kFloatHalf:
      UpdateRange<F>(static_cast<float*>(s.average) + begin, static_cast<const HalfBits*>(s.value) + begin, n, df, wf,
                     copy);
      break;
    case Kind::kFloatBfloat16:
      UpdateRange<F>(static_cast<float*>(s.average) + begin, static_cast<const Bfloat16Bits*>(s.value) + begin, n, df,
                     wf, copy);
      break;
    case Kind::kDouble:
      UpdateRangeDouble<F>(static_cast<double*>(s.average) + begin, static_cast<const double*>(s.value) + begin, n,
                           dd, wd, copy);
      break;
    case Kind::kHalf:
      if constexpr (F != Formula::kLerp) {
        UpdateRangeNarrow<F>(static_cast<HalfBits*>(s.average) + begin, static_cast<const HalfBits*>(s.value) + begin,
                             n, df, wf);
      }
      break;
    case Kind::kBfloat16:
      if constexpr (F != Formula::kLerp) {
        UpdateRangeNarrow<F>(static_cast<Bfloat16Bits*>(s.average) + begin,
                             static_cast<const Bfloat16Bits*>(s.value) + begin, n, df, wf);
      }
      break;
    default:
      break;
  }
}

// Launches the update described by `table`, whose bytes the caller has copied to `device_meta`
// (on `stream`, before this). A null `device_weight` means: use `weight`.
inline cudaError_t LaunchUpdate(Formula formula, const ChunkTable& table, const uint8_t* device_meta, double decay,
                                double weight, const float* device_weight, cudaStream_t stream) {
  if (table.chunks == 0) return cudaSuccess;
  const auto* segments = reinterpret_cast<const DeviceSegment*>(device_meta);
  const auto* chunk_segment = reinterpret_cast<const int32_t*>(device_meta + table.segment_index_offset);
  const auto* chunk_start = reinterpret_cast<const int64_t*>(device_meta + table.chunk_start_offset);
  const float df = static_cast<float>(decay), wf = static_cast<float>(weight);
  switch (formula) {
    case Formula::kLerp:
      UpdateChunks<Formula::kLerp><<<table.chunks, kThreads, 0, stream>>>(segments, chunk_segment, chunk_start, df, wf,
                                                                         decay, weight, device_weight);
      break;
    case Formula::kScaleAdd:
      UpdateChunks<Formula::kScaleAdd><<<table.chunks, kThreads, 0, stream>>>(segments, chunk_segment, chunk_start, df,
                                                                             wf, decay, weight, nullptr);
      break;
    case Formula::kSubScaleSub:
      UpdateChunks<Formula::kSubScaleSub><<<table.chunks, kThreads, 0, stream>>>(segments, chunk_segment, chunk_start,
                                                                                df, wf, decay, weight, nullptr);
      break;
  }
  return cudaGetLastError();
}

// The lerp (the static programs' update and the benchmarks'), with a host or a device weight.
inline cudaError_t LaunchLerp(const ChunkTable& table, const uint8_t* device_meta, double weight,
                              const float* device_weight, cudaStream_t stream) {
  return LaunchUpdate(Formula::kLerp, table, device_meta, 0.0, weight, device_weight, stream);
}

}  // namespace paddle_ema_cuda
