// Differences between the Paddle versions paddle_ema builds against (2.6.2 through 3.3.x), in one
// place, so that the other sources read the same on all of them. DenseTensor's protected members
// are named here and nowhere else (tests/test_architecture.py).
#pragma once

#include <memory>
#include <utility>

#include "paddle/extension.h"
#include "paddle/phi/core/dense_tensor.h"

// Paddle's build helper passes -DPADDLE_EXTENSION_NAME=<module> only since 3.2; before, the
// module would export PyInit_PADDLE_EXTENSION_NAME, which Python cannot import under the
// library's name. kernels/build.py loads the module as paddle_ema_ops.
#ifndef PADDLE_EXTENSION_NAME
#define PADDLE_EXTENSION_NAME paddle_ema_ops
#endif

namespace paddle_ema_compat {

// A dense tensor's buffer and meta, as DenseTensor's own members: DenseTensor::Holder() is not
// in 2.6.2's or 3.0.0's headers, and there is no setter for either. They are protected, so a
// derived class may name them (a pointer to member, applied to the base object).
struct DenseInternals : phi::DenseTensor {
  static std::shared_ptr<phi::Allocation>& Holder(phi::DenseTensor& dense) {
    return dense.*(&DenseInternals::holder_);
  }
  static const std::shared_ptr<phi::Allocation>& Holder(const phi::DenseTensor& dense) {
    return dense.*(&DenseInternals::holder_);
  }
  static phi::DenseTensorMeta& Meta(phi::DenseTensor& dense) { return dense.*(&DenseInternals::meta_); }
};

// a and b (contiguous dense tensors of one dtype and size) trade their buffers: each Tensor object
// keeps its identity, its dims, its autograd state and its inplace-version counter, and now holds
// the other's allocation (with its offset into it). Two pointer swaps. Moving whole DenseTensors
// (the move constructor the headers define inline, then the library's move assignment) crashed on
// Paddle 2.6.2 at the second trade; ShareBufferWith, which Tensor._share_buffer_to calls, is not in
// the headers extensions see.
inline void SwapBuffers(const paddle::Tensor& a, const paddle::Tensor& b) {
  auto* da = static_cast<phi::DenseTensor*>(a.impl().get());
  auto* db = static_cast<phi::DenseTensor*>(b.impl().get());
  std::swap(DenseInternals::Holder(*da), DenseInternals::Holder(*db));
  std::swap(DenseInternals::Meta(*da).offset, DenseInternals::Meta(*db).offset);
}

// Whether a dense tensor's meta describes row-major order: DenseTensorMeta::is_contiguous() is
// `strides == calc_strides(dims)`, which builds a DDim on every call; the same test on the
// numbers (calc_strides gives the dims back for an empty tensor). paddle::Tensor::is_contiguous()
// is not in 2.6.2; the meta's strides are, in every version supported.
inline bool StridesAreRowMajor(const phi::DenseTensorMeta& meta) {
  const auto& dims = meta.dims;
  const auto& strides = meta.strides;
  const int rank = dims.size();
  if (strides.size() != rank) return false;
  int64_t numel = 1;
  for (int i = 0; i < rank; ++i) numel *= dims[i];
  if (numel <= 0) {
    for (int i = 0; i < rank; ++i) {
      if (strides[i] != dims[i]) return false;
    }
    return true;
  }
  int64_t expected = 1;
  for (int i = rank - 1; i >= 0; --i) {
    if (strides[i] != expected) return false;
    expected *= dims[i];
  }
  return true;
}

}  // namespace paddle_ema_compat
