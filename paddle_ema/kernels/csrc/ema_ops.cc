// The static-program operators (Paddle custom operators, CPU only): a program has no fallback to
// hand a pair to, so a pair or value they cannot handle is an error.
//
//   paddle_ema_lerp_by_tensor(averages, values, weight): the lerp with the weight a one-element
//       float32/float64 CPU tensor read at run time, so that a program can compute it (bias
//       correction, a skipped step). Like kernels.lerp_: weight 0 leaves the averages untouched
//       (also where values hold NaN) and weight 1 copies the values exactly.
//   paddle_ema_all_finite(values) -> finite: ScanNonfinite's read as one bool [1].
//   paddle_ema_cast_to_float16(x), paddle_ema_cast_to_bfloat16(x) -> out: float32 -> half
//       rounded to nearest, ties to even, on every Paddle version (Paddle's own CPU cast rounds
//       toward zero before 3.2, bfloat16 on 2.6 too), the bits of kernels.reference.cast: for
//       float16 numpy's astype (NaN payloads kept, overflow to inf, subnormal halves), for
//       bfloat16 the top 16 bits rounded, every NaN 0x7fff (what Paddle 3.x writes).

#include <cstdint>
#include <vector>

#include "ema_parallel.h"
#include "ema_simd.h"
#include "ema_tensors.h"
#include "ema_update.h"
#include "paddle/extension.h"

namespace {

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
    NarrowRange(kBfloat16, static_cast<uint16_t*>(s.average) + b, static_cast<const uint32_t*>(s.value) + b, e - b);
  });
  return {out};
}

}  // namespace

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
    UpdateSegmentsCPU(Formula::kLerp, segments, Factors{0.0, w}, threads);
  }
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
