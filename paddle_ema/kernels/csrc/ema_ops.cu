// Paddle glue of the CUDA side of the multi-tensor update (see ema_update.cc): the kernel itself,
// with its chunking and rounding rules, is ema_cuda_kernel.cuh. Here: the chunk table goes to the
// device in one copy on the tensors' stream, into a buffer from Paddle's allocator, then one launch.

// The CUDA side needs no Python bindings; leaving them out also spares it pybind.h's ATen
// compatibility headers, which want the full toolkit (cuBLAS headers).
#define PADDLE_NO_PYTHON

#include <cuda_runtime.h>

#include <vector>

#include "ema_cuda_kernel.cuh"
#include "ema_update.h"

namespace {

void Check(cudaError_t status, const char* what) {
  PD_CHECK(status == cudaSuccess, "paddle_ema update (CUDA): ", what, ": ", cudaGetErrorString(status));
}

}  // namespace

void UpdateSegmentsCUDA(Formula formula, const std::vector<Segment>& segments, const Factors& factors,
                        const paddle::Tensor& example) {
  const paddle_ema_cuda::ChunkTable table = paddle_ema_cuda::MakeChunkTable(segments.data(), segments.size());
  if (table.chunks == 0) return;

  int previous_device = 0;
  Check(cudaGetDevice(&previous_device), "cudaGetDevice");
  const int device = example.place().GetDeviceId();
  if (device != previous_device) Check(cudaSetDevice(device), "cudaSetDevice");

  // Paddle's allocator orders the reuse of this buffer on the stream it was allocated for, so
  // dropping it when this function returns is safe although the kernel may still be running.
  paddle::Tensor meta =
      paddle::empty({static_cast<int64_t>(table.bytes.size())}, paddle::DataType::UINT8, example.place());
  cudaStream_t stream = example.stream();
  uint8_t* device_meta = meta.data<uint8_t>();
  // From pageable memory: returns once the bytes have been staged, so `table` may go out of scope.
  Check(cudaMemcpyAsync(device_meta, table.bytes.data(), table.bytes.size(), cudaMemcpyHostToDevice, stream),
        "copying the chunk table");
  Check(paddle_ema_cuda::LaunchUpdate(formula, table, device_meta, factors.decay, factors.weight, nullptr, stream),
        "launching the update");
  if (device != previous_device) Check(cudaSetDevice(previous_device), "cudaSetDevice");
}
