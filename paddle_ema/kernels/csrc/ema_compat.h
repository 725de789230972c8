// Differences between the Paddle versions paddle_ema builds against (2.6.2 through 3.3.x), in one
// place, so that ema_ops.cc and ema_python.cc read the same on all of them.
#pragma once

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

// paddle::Tensor::is_contiguous() exists since Paddle 3.0. Where it does not (2.6), a dense
// tensor's meta says it when it knows strides; a tensor without either is contiguous, as all
// tensors were before strided views.
template <typename T>
auto MetaIsContiguous(const T& dense, int) -> decltype(dense.meta().is_contiguous()) {
  return dense.meta().is_contiguous();
}
template <typename T>
bool MetaIsContiguous(const T&, long) {  // NOLINT(runtime/int): overload rank only
  return true;
}

template <typename T>
auto IsContiguous(const T& tensor, int) -> decltype(tensor.is_contiguous()) {
  return tensor.is_contiguous();
}
template <typename T>
bool IsContiguous(const T& tensor, long) {  // NOLINT(runtime/int): overload rank only
  if (!tensor.is_dense_tensor()) return false;
  const auto* dense = static_cast<const phi::DenseTensor*>(tensor.impl().get());
  return MetaIsContiguous(*dense, 0);
}

// a and b (dense tensors of one dtype and size) trade their contents: each Tensor object keeps
// its identity and autograd state and now holds the other's buffer (with its meta, which is the
// same but for the buffer). Moves swap pointers only; ShareBufferWith, which
// Tensor._share_buffer_to calls, is not in the headers extensions see.
inline void SwapBuffers(const paddle::Tensor& a, const paddle::Tensor& b) {
  auto* da = static_cast<phi::DenseTensor*>(a.impl().get());
  auto* db = static_cast<phi::DenseTensor*>(b.impl().get());
  phi::DenseTensor held(std::move(*da));
  *da = std::move(*db);
  *db = std::move(held);
}

}  // namespace paddle_ema_compat

// True when `tensor`'s elements are one dense block in row-major order, on every Paddle version.
inline bool EmaIsContiguous(const paddle::Tensor& tensor) { return paddle_ema_compat::IsContiguous(tensor, 0); }
