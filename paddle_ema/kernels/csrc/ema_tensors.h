// What the kernels know of a tensor, read once from its DenseTensor (TensorFacts), the shape check
// every kernel runs before it writes, and the prefetch of the next tensors' metadata.
#pragma once

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "ema_compat.h"
#include "paddle/extension.h"
#include "paddle/phi/core/dense_tensor.h"

// Paddle's accessors check the tensor on every call (data() its memory size, numel() multiplies
// the dims, place() and is_contiguous() build objects), a large share of an update of many small
// tensors (docs/performance.md, "Tensors are read once"): these are read once instead.
// `usable` only for a dense tensor whose buffer holds its elements (`data` may be null when it has
// none); `dims` for every dense tensor.
struct TensorFacts {
  bool usable = false;
  void* data = nullptr;
  const phi::DDim* dims = nullptr;
  int64_t numel = 0;
  paddle::DataType dtype = paddle::DataType::UNDEFINED;
  phi::AllocationType where = phi::AllocationType::UNDEFINED;
  int device = -1;
  bool contiguous = false;

  bool is_cpu() const { return usable && where == phi::AllocationType::CPU; }
  bool is_gpu() const { return usable && where == phi::AllocationType::GPU; }
};

inline TensorFacts FactsOf(const paddle::Tensor& tensor) {
  TensorFacts facts;
  const phi::TensorBase* base = tensor.impl().get();
  if (base == nullptr || !phi::DenseTensor::classof(base)) return facts;
  const auto* dense = static_cast<const phi::DenseTensor*>(base);
  const phi::DenseTensorMeta& meta = dense->meta();
  int64_t numel = 1;
  if (!meta.is_scalar) {
    for (int i = 0; i < meta.dims.size(); ++i) numel *= meta.dims[i];
  }
  facts.numel = numel;
  facts.dtype = meta.dtype;
  facts.dims = &meta.dims;
  const auto& holder = paddle_ema_compat::DenseInternals::Holder(*dense);
  if (numel < 0 || holder == nullptr ||
      (numel > 0 && (holder->ptr() == nullptr ||
                     holder->size() < meta.offset + static_cast<size_t>(numel) * phi::SizeOf(meta.dtype)))) {
    return facts;
  }
  facts.usable = true;
  if (holder->ptr() != nullptr) facts.data = static_cast<char*>(holder->ptr()) + meta.offset;
  facts.where = holder->place().GetType();
  facts.device = holder->place().GetDeviceId();
  facts.contiguous = paddle_ema_compat::StridesAreRowMajor(meta);
  return facts;
}

// Whether two dense tensors have the same shape (the kernels never broadcast or reshape); a tensor
// that is not dense has no dims here and is left to the caller's fallback, which compares shapes.
inline bool SameDims(const TensorFacts& a, const TensorFacts& b) {
  if (a.dims == nullptr || b.dims == nullptr) return true;
  const int rank = a.dims->size();
  if (b.dims->size() != rank) return false;
  for (int i = 0; i < rank; ++i) {
    if ((*a.dims)[i] != (*b.dims)[i]) return false;
  }
  return true;
}

inline std::string DimsText(const phi::DDim& dims) {
  std::string text = "[";
  for (int i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return text + "]";
}

// The one refusal of a pair whose shapes differ, before anything is written. std::invalid_argument
// is a ValueError in Python (pybind11's translation); the text is kernels/reference.py's.
[[noreturn]] inline void ThrowShapeMismatch(const char* op, size_t index, const char* first, const TensorFacts& a,
                                            const char* second, const TensorFacts& b) {
  throw std::invalid_argument(std::string("paddle_ema ") + op + ": pair " + std::to_string(index) + " has " + first +
                              " of shape " + DimsText(*a.dims) + " and " + second + " of shape " +
                              DimsText(*b.dims) + "; the shapes must be equal (nothing was changed)");
}

// FactsOf reads a tensor's paddle::Tensor (inside its Python object), then its DenseTensor, then
// its allocation. Right after an update has streamed its buffers through the cache all three are
// misses, and taken one tensor after another they are a share of an update of many tensors
// (docs/performance.md, "Evening runs ..., after the metadata prefetch"). Called at the top of a
// loop over `tensors` at index i, this prefetches the paddle::Tensor of tensor i + 2 kFactsAhead,
// the DenseTensor of tensor i + kFactsAhead and the allocation of tensor i + kFactsAhead / 2, each
// through pointers the previous stage brought into the cache, so that the misses overlap.
constexpr size_t kFactsAhead = 8;

inline void PrefetchFacts(const std::vector<const paddle::Tensor*>& tensors, size_t i) {
  auto dense = [&](size_t j) {
    const char* object = reinterpret_cast<const char*>(tensors[j]->impl().get());
    if (object == nullptr) return;
    for (size_t line = 0; line < sizeof(phi::DenseTensor); line += 64) __builtin_prefetch(object + line);
  };
  if (i == 0) {
    for (size_t j = 0; j < std::min(2 * kFactsAhead, tensors.size()); ++j) __builtin_prefetch(tensors[j]);
    for (size_t j = 0; j < std::min(kFactsAhead, tensors.size()); ++j) dense(j);
  }
  if (i + 2 * kFactsAhead < tensors.size()) __builtin_prefetch(tensors[i + 2 * kFactsAhead]);
  if (i + kFactsAhead < tensors.size()) dense(i + kFactsAhead);
  const size_t j = i + kFactsAhead / 2;
  if (j < tensors.size()) {
    const phi::TensorBase* base = tensors[j]->impl().get();
    if (base != nullptr && phi::DenseTensor::classof(base)) {
      __builtin_prefetch(paddle_ema_compat::DenseInternals::Holder(*static_cast<const phi::DenseTensor*>(base)).get());
    }
  }
}

// True when `tensor`'s elements are one dense block in row-major order, on every Paddle version.
inline bool EmaIsContiguous(const paddle::Tensor& tensor) { return FactsOf(tensor).contiguous; }
