// CUDA side of paddle_ema_lerp (see ema_ops.cc): every (average, value) pair of one device in a
// single launch. The pairs are cut into chunks of kChunk elements, one thread block per chunk, so
// a thousand small tensors cost one launch, not a thousand, and a big tensor spreads over many
// blocks. The chunk table travels to the device in one copy on the tensors' stream.
//
// The arithmetic is a + w * (x - a) with explicitly rounded operations (__fmul_rn/__fadd_rn,
// built with --fmad=false as well): no FMA contraction, the same rounding as paddle.lerp_.

// The CUDA side needs no Python bindings; leaving them out also spares it pybind.h's ATen
// compatibility headers, which want the full toolkit (cuBLAS headers).
#define PADDLE_NO_PYTHON

#include <cuda_runtime.h>

#include <cstring>
#include <vector>

#include "ema_ops.h"

namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = int64_t{1} << 16;

struct DeviceSegment {
  void* average;
  const void* value;
  int64_t numel;
  int32_t kind;
  int32_t unused;
};

__device__ __forceinline__ float HalfBitsToFloat(uint16_t h) {
  float out;
  asm("{ cvt.f32.f16 %0, %1; }" : "=f"(out) : "h"(h));
  return out;
}

__device__ __forceinline__ float Bfloat16BitsToFloat(uint16_t b) {
  return __uint_as_float(static_cast<uint32_t>(b) << 16);
}

__device__ __forceinline__ float LerpFloat(float a, float x, float w) {
  return __fadd_rn(a, __fmul_rn(w, __fsub_rn(x, a)));
}

__global__ void LerpChunks(const DeviceSegment* __restrict__ segments, const int32_t* __restrict__ chunk_segment,
                           const int64_t* __restrict__ chunk_start, float wf, double wd) {
  const DeviceSegment s = segments[chunk_segment[blockIdx.x]];
  const int64_t begin = chunk_start[blockIdx.x];
  const int64_t end = begin + kChunk < s.numel ? begin + kChunk : s.numel;
  switch (static_cast<Kind>(s.kind)) {
    case Kind::kFloat: {
      float* a = static_cast<float*>(s.average);
      const float* x = static_cast<const float*>(s.value);
      for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) a[i] = LerpFloat(a[i], x[i], wf);
      break;
    }
    case Kind::kFloatHalf: {
      float* a = static_cast<float*>(s.average);
      const uint16_t* x = static_cast<const uint16_t*>(s.value);
      for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) a[i] = LerpFloat(a[i], HalfBitsToFloat(x[i]), wf);
      break;
    }
    case Kind::kFloatBfloat16: {
      float* a = static_cast<float*>(s.average);
      const uint16_t* x = static_cast<const uint16_t*>(s.value);
      for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
        a[i] = LerpFloat(a[i], Bfloat16BitsToFloat(x[i]), wf);
      }
      break;
    }
    case Kind::kDouble: {
      double* a = static_cast<double*>(s.average);
      const double* x = static_cast<const double*>(s.value);
      for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
        a[i] = __dadd_rn(a[i], __dmul_rn(wd, __dsub_rn(x[i], a[i])));
      }
      break;
    }
    default:
      break;
  }
}

void Check(cudaError_t status, const char* what) {
  PD_CHECK(status == cudaSuccess, "paddle_ema_lerp (CUDA): ", what, ": ", cudaGetErrorString(status));
}

size_t AlignUp(size_t n) { return (n + 15) / 16 * 16; }

}  // namespace

void LerpSegmentsCUDA(const std::vector<Segment>& segments, double weight, const paddle::Tensor& example) {
  std::vector<DeviceSegment> table;
  std::vector<int32_t> chunk_segment;
  std::vector<int64_t> chunk_start;
  table.reserve(segments.size());
  for (const Segment& s : segments) {
    const int32_t index = static_cast<int32_t>(table.size());
    table.push_back({s.average, s.value, s.numel, static_cast<int32_t>(s.kind), 0});
    for (int64_t start = 0; start < s.numel; start += kChunk) {
      chunk_segment.push_back(index);
      chunk_start.push_back(start);
    }
  }
  if (chunk_start.empty()) return;

  // One host buffer, one device buffer, one copy: [segments | chunk_segment | chunk_start].
  const size_t segments_bytes = AlignUp(table.size() * sizeof(DeviceSegment));
  const size_t index_bytes = AlignUp(chunk_segment.size() * sizeof(int32_t));
  const size_t start_bytes = chunk_start.size() * sizeof(int64_t);
  std::vector<uint8_t> host(segments_bytes + index_bytes + start_bytes);
  std::memcpy(host.data(), table.data(), table.size() * sizeof(DeviceSegment));
  std::memcpy(host.data() + segments_bytes, chunk_segment.data(), chunk_segment.size() * sizeof(int32_t));
  std::memcpy(host.data() + segments_bytes + index_bytes, chunk_start.data(), start_bytes);

  int previous_device = 0;
  Check(cudaGetDevice(&previous_device), "cudaGetDevice");
  const int device = example.place().GetDeviceId();
  if (device != previous_device) Check(cudaSetDevice(device), "cudaSetDevice");

  // Paddle's allocator orders the reuse of this buffer on the stream it was allocated for, so
  // dropping it when this function returns is safe although the kernel may still be running.
  paddle::Tensor meta = paddle::empty({static_cast<int64_t>(host.size())}, paddle::DataType::UINT8, example.place());
  cudaStream_t stream = example.stream();
  uint8_t* device_meta = meta.data<uint8_t>();
  // From pageable memory: returns once `host` has been staged, so `host` may go out of scope.
  Check(cudaMemcpyAsync(device_meta, host.data(), host.size(), cudaMemcpyHostToDevice, stream),
        "copying the chunk table");
  LerpChunks<<<static_cast<unsigned int>(chunk_start.size()), kThreads, 0, stream>>>(
      reinterpret_cast<const DeviceSegment*>(device_meta),
      reinterpret_cast<const int32_t*>(device_meta + segments_bytes),
      reinterpret_cast<const int64_t*>(device_meta + segments_bytes + index_bytes), static_cast<float>(weight),
      weight);
  Check(cudaGetLastError(), "launching the update");
  if (device != previous_device) Check(cudaSetDevice(previous_device), "cudaSetDevice");
}
