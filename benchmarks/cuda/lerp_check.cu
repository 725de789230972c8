// Checks and times paddle_ema's CUDA multi-tensor kernel (paddle_ema/kernels/csrc/ema_cuda_kernel.cuh)
// on its own, without Paddle: where no CUDA build of Paddle can be installed, this is how the
// kernel's numbers and speed are verified on a GPU. Driven by benchmarks/bench_update_cuda.py.
//
//   lerp_check check
//       every dtype pair, sizes around the chunk and vector boundaries, misaligned tensors, host
//       and device weights (0: untouched even under NaN, 1: exact copy), all in one launch, each
//       element compared bit for bit with a host model of the same rounding: a + w * (x - a)
//       rounded step by step. Prints one line per case; exit status 1 on any mismatch.
//   lerp_check formulas
//       scale_add and sub_scale_sub for every kind (float32 averages with each value dtype, float64,
//       float16 and bfloat16 averages by Paddle's GPU rule), the same check against the host model
//       FormulaModel. Prints one line per case; exit status 1 on any mismatch.
//   lerp_check model FORMULA KIND DECAY WEIGHT < pairs
//       the host model alone (no GPU needed): reads "average value" bit patterns (hex) per line and
//       prints the model's average bits, so that a test can check the model against numpy.
//   lerp_check bench RUNS WARMUP < numels
//       reads one tensor size per line and prints one JSON line of median ms per update for:
//       the fused kernel (chunk table built, copied and launched per update, as the Paddle
//       operator does), one launch per tensor, and the memory floor (a += x over one flat buffer).
//       Each update is timed from an event recorded before its host work to one after its launch.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <random>
#include <vector>

#include "../../paddle_ema/kernels/csrc/ema_cuda_kernel.cuh"
#include "../../paddle_ema/kernels/csrc/ema_half.h"

namespace {

void Check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    std::fprintf(stderr, "CUDA error in %s: %s\n", what, cudaGetErrorString(status));
    std::exit(3);
  }
}

size_t ValueBytes(Kind kind) {
  switch (kind) {
    case Kind::kFloat:
      return 4;
    case Kind::kDouble:
      return 8;
    default:
      return 2;
  }
}
size_t AverageBytes(Kind kind) {
  return kind == Kind::kDouble ? 8 : (kind == Kind::kHalf || kind == Kind::kBfloat16) ? 2 : 4;
}

// ---- host model of the kernel's rounding ------------------------------------------------------

float HostValue(Kind kind, const uint8_t* x, int64_t i) {
  if (kind == Kind::kFloat) return reinterpret_cast<const float*>(x)[i];
  uint16_t bits;
  std::memcpy(&bits, x + 2 * i, 2);
  if (kind == Kind::kFloatHalf) {
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
  }
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, 4);
  return out;
}

// The expected average after one update; `device_rule`: weight 0 skips and 1 copies.
void HostLerp(Kind kind, uint8_t* a, const uint8_t* x, int64_t n, double weight, bool device_rule) {
  const float wf = static_cast<float>(weight);
  if (device_rule && wf == 0.0f) return;
  const bool copy = device_rule && wf == 1.0f;
  for (int64_t i = 0; i < n; ++i) {
    if (kind == Kind::kDouble) {
      double* ad = reinterpret_cast<double*>(a);
      const double xd = reinterpret_cast<const double*>(x)[i];
      const double wd = device_rule ? static_cast<double>(wf) : weight;
      volatile double diff = xd - ad[i];
      volatile double step = wd * diff;
      ad[i] = copy ? xd : ad[i] + step;
    } else {
      float* af = reinterpret_cast<float*>(a);
      const float xf = HostValue(kind, x, i);
      volatile float diff = xf - af[i];  // volatile: each operation rounded on its own
      volatile float step = wf * diff;
      af[i] = copy ? xf : af[i] + step;
    }
  }
}

// ---- check ------------------------------------------------------------------------------------

struct Pair {
  Kind kind;
  int64_t numel;
  int64_t misalign;  // elements the device pointers are shifted by (breaks 16-byte alignment)
  std::vector<uint8_t> average, value;
  uint8_t* device_average_base = nullptr;
  uint8_t* device_value_base = nullptr;
  uint8_t* DeviceAverage() const { return device_average_base + misalign * AverageBytes(kind); }
  uint8_t* DeviceValue() const { return device_value_base + misalign * ValueBytes(kind); }
};

void FillValue(Kind kind, uint8_t* out, int64_t n, std::mt19937& rng, bool with_nan) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int64_t i = 0; i < n; ++i) {
    float v = normal(rng) * 3.0f;
    if (with_nan && i % 7 == 3) v = std::nanf("");
    switch (kind) {
      case Kind::kFloat:
        reinterpret_cast<float*>(out)[i] = v;
        break;
      case Kind::kDouble:
        reinterpret_cast<double*>(out)[i] = static_cast<double>(v) + 1e-9 * i;
        break;
      case Kind::kFloatHalf: {
        __half_raw raw = __half_raw(__float2half(v));
        std::memcpy(out + 2 * i, &raw.x, 2);
        break;
      }
      default: {  // bfloat16: a float's top half (random low bits make every pattern possible)
        uint32_t bits;
        std::memcpy(&bits, &v, 4);
        uint16_t top = static_cast<uint16_t>(bits >> 16);
        std::memcpy(out + 2 * i, &top, 2);
        break;
      }
    }
  }
}

void FillAverage(Kind kind, uint8_t* out, int64_t n, std::mt19937& rng) {
  std::normal_distribution<double> normal(0.0, 1.0);
  for (int64_t i = 0; i < n; ++i) {
    if (kind == Kind::kDouble) {
      reinterpret_cast<double*>(out)[i] = normal(rng);
    } else {
      reinterpret_cast<float*>(out)[i] = static_cast<float>(normal(rng));
    }
  }
}

// One launch over all pairs; returns the number of elements that differ from the host model.
int64_t RunCase(const char* name, std::vector<Pair>& pairs, double weight, bool device_weight, bool nan_values,
                uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<Segment> segments;
  for (Pair& p : pairs) {
    p.average.assign(p.numel * AverageBytes(p.kind), 0);
    p.value.assign(p.numel * ValueBytes(p.kind), 0);
    FillAverage(p.kind, p.average.data(), p.numel, rng);
    FillValue(p.kind, p.value.data(), p.numel, rng, nan_values);
    Check(cudaMalloc(&p.device_average_base, (p.numel + p.misalign) * AverageBytes(p.kind)), "cudaMalloc");
    Check(cudaMalloc(&p.device_value_base, (p.numel + p.misalign) * ValueBytes(p.kind)), "cudaMalloc");
    Check(cudaMemcpy(p.DeviceAverage(), p.average.data(), p.average.size(), cudaMemcpyHostToDevice), "upload");
    Check(cudaMemcpy(p.DeviceValue(), p.value.data(), p.value.size(), cudaMemcpyHostToDevice), "upload");
    segments.push_back({p.DeviceAverage(), p.DeviceValue(), p.numel, p.kind});
  }
  const paddle_ema_cuda::ChunkTable table = paddle_ema_cuda::MakeChunkTable(segments.data(), segments.size());
  uint8_t* meta = nullptr;
  float* weight_on_device = nullptr;
  Check(cudaMalloc(&meta, std::max<size_t>(table.bytes.size(), 1)), "cudaMalloc");
  Check(cudaMemcpy(meta, table.bytes.data(), table.bytes.size(), cudaMemcpyHostToDevice), "table");
  if (device_weight) {
    const float wf = static_cast<float>(weight);
    Check(cudaMalloc(&weight_on_device, sizeof(float)), "cudaMalloc");
    Check(cudaMemcpy(weight_on_device, &wf, sizeof(float), cudaMemcpyHostToDevice), "weight");
  }
  Check(paddle_ema_cuda::LaunchLerp(table, meta, weight, weight_on_device, nullptr), "launch");
  Check(cudaDeviceSynchronize(), "kernel");

  int64_t bad = 0, total = 0;
  for (Pair& p : pairs) {
    std::vector<uint8_t> got(p.average.size());
    Check(cudaMemcpy(got.data(), p.DeviceAverage(), got.size(), cudaMemcpyDeviceToHost), "download");
    HostLerp(p.kind, p.average.data(), p.value.data(), p.numel, weight, device_weight);
    const size_t width = AverageBytes(p.kind);
    for (int64_t i = 0; i < p.numel; ++i) {
      bad += std::memcmp(got.data() + i * width, p.average.data() + i * width, width) != 0;
    }
    total += p.numel;
    cudaFree(p.device_average_base);
    cudaFree(p.device_value_base);
  }
  cudaFree(meta);
  cudaFree(weight_on_device);
  std::printf("%-52s %10lld elements %8lld differ\n", name, static_cast<long long>(total),
              static_cast<long long>(bad));
  return bad;
}

std::vector<Pair> MixedPairs() {
  const Kind kinds[] = {Kind::kFloat, Kind::kFloatHalf, Kind::kFloatBfloat16, Kind::kDouble};
  const int64_t sizes[] = {1,     3,     4,     5,     255,   256,    1000,   4097,
                           65535, 65536, 65537, 131075, 200003, 1 << 20, 3 * (1 << 16) + 7};
  std::vector<Pair> pairs;
  int index = 0;
  for (int64_t n : sizes) {
    for (Kind kind : kinds) {
      Pair p;
      p.kind = kind;
      p.numel = n;
      p.misalign = (index++ % 3 == 1) ? 1 : 0;  // every third pair off 16-byte alignment
      pairs.push_back(std::move(p));
    }
  }
  return pairs;
}

int Checks() {
  int64_t bad = 0;
  {
    auto pairs = MixedPairs();
    bad += RunCase("all kinds, host weight 1.23e-2", pairs, 0.0123, false, false, 1);
  }
  {
    auto pairs = MixedPairs();
    bad += RunCase("all kinds, host weight 1 - 0.9998", pairs, 1.0 - 0.9998, false, false, 2);
  }
  {
    auto pairs = MixedPairs();
    bad += RunCase("all kinds, device weight 0.25", pairs, 0.25, true, false, 3);
  }
  {
    auto pairs = MixedPairs();
    bad += RunCase("all kinds, device weight 0, NaN values (untouched)", pairs, 0.0, true, true, 4);
  }
  {
    auto pairs = MixedPairs();
    bad += RunCase("all kinds, device weight 1 (exact copy)", pairs, 1.0, true, false, 5);
  }
  {
    std::vector<Pair> many;  // a thousand small tensors in one launch
    for (int i = 0; i < 1000; ++i) {
      Pair p;
      p.kind = Kind::kFloat;
      p.numel = 1 + (i * 37) % 3000;
      p.misalign = 0;
      many.push_back(std::move(p));
    }
    bad += RunCase("1000 float32 tensors, host weight 2e-4", many, 2e-4, false, false, 6);
  }
  std::printf("%s\n", bad == 0 ? "ALL EQUAL" : "MISMATCH");
  return bad == 0 ? 0 : 1;
}

// ---- the suites' formulas ---------------------------------------------------------------------

uint32_t BitsOf(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return bits;
}

// A float32 result rounded to the half type (nearest, ties to even) and widened again.
float RoundTo(Kind kind, float v) {
  return kind == Kind::kHalf ? HalfToFloat(FloatToHalf(BitsOf(v))) : Bfloat16ToFloat(FloatToBfloat16(BitsOf(v)));
}

// The expected average bits of one element: float32/float64 averages step by step in their dtype;
// float16/bfloat16 averages by Paddle's GPU rule, each op computed in float32 (the factor a float32)
// and its result rounded to the half type.
void FormulaModel(Formula formula, Kind kind, uint8_t* a, const uint8_t* x, int64_t i, double decay, double weight) {
  const float d = static_cast<float>(decay), w = static_cast<float>(weight);
  if (kind == Kind::kDouble) {
    double* ad = reinterpret_cast<double*>(a);
    const double xd = reinterpret_cast<const double*>(x)[i];
    volatile double out;
    if (formula == Formula::kScaleAdd) {
      volatile double left = decay * ad[i];
      left = left + 0.0;
      volatile double right = weight * xd;
      right = right + 0.0;
      out = left + right;
    } else {
      volatile double t = ad[i] - xd;
      t = weight * t;
      t = t + 0.0;
      out = ad[i] - t;
    }
    ad[i] = out;
    return;
  }
  if (kind == Kind::kHalf || kind == Kind::kBfloat16) {
    uint16_t ab, xb;
    std::memcpy(&ab, a + 2 * i, 2);
    std::memcpy(&xb, x + 2 * i, 2);
    const float af = kind == Kind::kHalf ? HalfToFloat(ab) : Bfloat16ToFloat(ab);
    const float xf = kind == Kind::kHalf ? HalfToFloat(xb) : Bfloat16ToFloat(xb);
    volatile float out;
    if (formula == Formula::kScaleAdd) {
      volatile float left = d * af;
      left = left + 0.0f;
      volatile float right = w * xf;
      right = right + 0.0f;
      out = RoundTo(kind, left) + RoundTo(kind, right);
    } else {
      volatile float difference = af - xf;
      volatile float scaled = w * RoundTo(kind, difference);
      scaled = scaled + 0.0f;
      out = af - RoundTo(kind, scaled);
    }
    const uint16_t bits = kind == Kind::kHalf ? FloatToHalf(BitsOf(out)) : FloatToBfloat16(BitsOf(out));
    std::memcpy(a + 2 * i, &bits, 2);
    return;
  }
  float* af = reinterpret_cast<float*>(a);
  const float xf = HostValue(kind, x, i);
  volatile float out;
  if (formula == Formula::kScaleAdd) {
    volatile float left = d * af[i];
    left = left + 0.0f;
    volatile float right = w * xf;
    right = right + 0.0f;
    out = left + right;
  } else {
    volatile float t = af[i] - xf;
    t = w * t;
    t = t + 0.0f;
    out = af[i] - t;
  }
  af[i] = out;
}

void FillHalfAverage(Kind kind, uint8_t* out, int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int64_t i = 0; i < n; ++i) {
    const float v = normal(rng) * 2.0f;
    const uint16_t bits = kind == Kind::kHalf ? FloatToHalf(BitsOf(v)) : FloatToBfloat16(BitsOf(v));
    std::memcpy(out + 2 * i, &bits, 2);
  }
}

int64_t RunFormulaCase(const char* name, Formula formula, std::vector<Pair>& pairs, double decay, double weight,
                       uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<Segment> segments;
  for (Pair& p : pairs) {
    p.average.assign(p.numel * AverageBytes(p.kind), 0);
    p.value.assign(p.numel * ValueBytes(p.kind), 0);
    if (p.kind == Kind::kHalf || p.kind == Kind::kBfloat16) {
      FillHalfAverage(p.kind, p.average.data(), p.numel, rng);
      FillHalfAverage(p.kind, p.value.data(), p.numel, rng);
    } else {
      FillAverage(p.kind, p.average.data(), p.numel, rng);
      FillValue(p.kind, p.value.data(), p.numel, rng, false);
    }
    Check(cudaMalloc(&p.device_average_base, (p.numel + p.misalign) * AverageBytes(p.kind)), "cudaMalloc");
    Check(cudaMalloc(&p.device_value_base, (p.numel + p.misalign) * ValueBytes(p.kind)), "cudaMalloc");
    Check(cudaMemcpy(p.DeviceAverage(), p.average.data(), p.average.size(), cudaMemcpyHostToDevice), "upload");
    Check(cudaMemcpy(p.DeviceValue(), p.value.data(), p.value.size(), cudaMemcpyHostToDevice), "upload");
    segments.push_back({p.DeviceAverage(), p.DeviceValue(), p.numel, p.kind});
  }
  const paddle_ema_cuda::ChunkTable table = paddle_ema_cuda::MakeChunkTable(segments.data(), segments.size());
  uint8_t* meta = nullptr;
  Check(cudaMalloc(&meta, std::max<size_t>(table.bytes.size(), 1)), "cudaMalloc");
  Check(cudaMemcpy(meta, table.bytes.data(), table.bytes.size(), cudaMemcpyHostToDevice), "table");
  Check(paddle_ema_cuda::LaunchUpdate(formula, table, meta, decay, weight, nullptr, nullptr), "launch");
  Check(cudaDeviceSynchronize(), "kernel");
  int64_t bad = 0, total = 0;
  for (Pair& p : pairs) {
    std::vector<uint8_t> got(p.average.size());
    Check(cudaMemcpy(got.data(), p.DeviceAverage(), got.size(), cudaMemcpyDeviceToHost), "download");
    for (int64_t i = 0; i < p.numel; ++i) FormulaModel(formula, p.kind, p.average.data(), p.value.data(), i, decay, weight);
    const size_t width = AverageBytes(p.kind);
    for (int64_t i = 0; i < p.numel; ++i) {
      bad += std::memcmp(got.data() + i * width, p.average.data() + i * width, width) != 0;
    }
    total += p.numel;
    cudaFree(p.device_average_base);
    cudaFree(p.device_value_base);
  }
  cudaFree(meta);
  std::printf("%-52s %10lld elements %8lld differ\n", name, static_cast<long long>(total),
              static_cast<long long>(bad));
  return bad;
}

int FormulaChecks() {
  const Kind kinds[] = {Kind::kFloat, Kind::kFloatHalf, Kind::kFloatBfloat16, Kind::kDouble, Kind::kHalf,
                        Kind::kBfloat16};
  const int64_t sizes[] = {1, 5, 256, 4097, 65537, 200003};
  int64_t bad = 0;
  uint32_t seed = 10;
  for (Formula formula : {Formula::kScaleAdd, Formula::kSubScaleSub}) {
    std::vector<Pair> pairs;
    int index = 0;
    for (int64_t n : sizes) {
      for (Kind kind : kinds) {
        Pair p;
        p.kind = kind;
        p.numel = n;
        p.misalign = (index++ % 3 == 1) ? 1 : 0;
        pairs.push_back(std::move(p));
      }
    }
    bad += RunFormulaCase(formula == Formula::kScaleAdd ? "scale_add, all kinds, d 0.9998, w 1 - d"
                                                        : "sub_scale_sub, all kinds, w 1 - 0.9998",
                          formula, pairs, 0.9998, 1.0 - 0.9998, seed++);
  }
  std::printf("%s\n", bad == 0 ? "ALL EQUAL" : "MISMATCH");
  return bad == 0 ? 0 : 1;
}

Kind KindNamed(const char* name) {
  const char* names[] = {"float", "float_half", "float_bfloat16", "double", "unsupported", "half", "bfloat16"};
  for (int k = 0; k < 7; ++k) {
    if (std::strcmp(name, names[k]) == 0) return static_cast<Kind>(k);
  }
  return Kind::kUnsupported;
}

// The host model on given bits, one "average value" pair (hex) per line.
int Model(const char* formula_name, const char* kind_name, double decay, double weight) {
  const Formula formula = std::strcmp(formula_name, "scale_add") == 0 ? Formula::kScaleAdd : Formula::kSubScaleSub;
  const Kind kind = KindNamed(kind_name);
  if (kind == Kind::kUnsupported) return 2;
  unsigned long long a_bits, x_bits;
  while (std::scanf("%llx %llx", &a_bits, &x_bits) == 2) {
    uint8_t a[8] = {}, x[8] = {};
    std::memcpy(a, &a_bits, AverageBytes(kind));  // little-endian: the low bytes
    std::memcpy(x, &x_bits, ValueBytes(kind));
    FormulaModel(formula, kind, a, x, 0, decay, weight);
    unsigned long long out = 0;
    std::memcpy(&out, a, AverageBytes(kind));
    std::printf("%llx\n", out);
  }
  return 0;
}

// ---- bench ------------------------------------------------------------------------------------

__global__ void LerpOne(float* __restrict__ a, const float* __restrict__ x, int64_t n, float w) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    a[i] = paddle_ema_cuda::LerpFloat(a[i], x[i], w);
  }
}

__global__ void AddFlat(float4* __restrict__ a, const float4* __restrict__ x, int64_t packs) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < packs; i += int64_t{gridDim.x} * blockDim.x) {
    float4 av = a[i];
    const float4 xv = x[i];
    av.x += xv.x;
    av.y += xv.y;
    av.z += xv.z;
    av.w += xv.w;
    a[i] = av;
  }
}

template <typename Update>
double MedianMs(int runs, int warmup, Update update) {
  cudaEvent_t start, stop;
  Check(cudaEventCreate(&start), "event");
  Check(cudaEventCreate(&stop), "event");
  for (int i = 0; i < warmup; ++i) update();
  Check(cudaDeviceSynchronize(), "warmup");
  std::vector<double> times;
  for (int i = 0; i < runs; ++i) {
    Check(cudaEventRecord(start), "record");
    update();
    Check(cudaEventRecord(stop), "record");
    Check(cudaEventSynchronize(stop), "sync");
    float ms = 0;
    Check(cudaEventElapsedTime(&ms, start, stop), "elapsed");
    times.push_back(ms);
  }
  std::sort(times.begin(), times.end());
  const size_t n = times.size();
  return n % 2 ? times[n / 2] : 0.5 * (times[n / 2 - 1] + times[n / 2]);
}

int Bench(int runs, int warmup) {
  std::vector<int64_t> numels;
  for (long long n; std::cin >> n;) numels.push_back(n);
  int64_t total = 0;
  for (int64_t n : numels) total += n;
  const float w = static_cast<float>(1.0 - 0.9998);

  std::vector<float*> averages, values;
  std::vector<Segment> segments;
  for (int64_t n : numels) {  // separate allocations, as a model's parameters are
    float *a = nullptr, *x = nullptr;
    Check(cudaMalloc(&a, n * 4), "cudaMalloc");
    Check(cudaMalloc(&x, n * 4), "cudaMalloc");
    Check(cudaMemset(a, 0, n * 4), "memset");
    Check(cudaMemset(x, 0, n * 4), "memset");
    averages.push_back(a);
    values.push_back(x);
    segments.push_back({a, x, n, Kind::kFloat});
  }
  uint8_t* meta = nullptr;
  Check(cudaMalloc(&meta, paddle_ema_cuda::MakeChunkTable(segments.data(), segments.size()).bytes.size()), "meta");

  int sms = 0;
  Check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "attribute");
  const double fused = MedianMs(runs, warmup, [&] {
    const paddle_ema_cuda::ChunkTable table = paddle_ema_cuda::MakeChunkTable(segments.data(), segments.size());
    Check(cudaMemcpyAsync(meta, table.bytes.data(), table.bytes.size(), cudaMemcpyHostToDevice, nullptr), "table");
    Check(paddle_ema_cuda::LaunchLerp(table, meta, 1.0 - 0.9998, nullptr, nullptr), "launch");
  });
  const double per_tensor = MedianMs(runs, warmup, [&] {
    for (size_t i = 0; i < numels.size(); ++i) {
      const int64_t blocks = std::min<int64_t>((numels[i] + 255) / 256, int64_t{sms} * 8);
      LerpOne<<<static_cast<unsigned int>(blocks), 256>>>(averages[i], values[i], numels[i], w);
    }
  });
  float *flat_a = nullptr, *flat_x = nullptr;
  const int64_t packs = (total + 3) / 4;
  Check(cudaMalloc(&flat_a, packs * 16), "cudaMalloc");
  Check(cudaMalloc(&flat_x, packs * 16), "cudaMalloc");
  Check(cudaMemset(flat_a, 0, packs * 16), "memset");
  Check(cudaMemset(flat_x, 0, packs * 16), "memset");
  const double floor = MedianMs(runs, warmup, [&] {
    AddFlat<<<static_cast<unsigned int>(sms * 8), 256>>>(reinterpret_cast<float4*>(flat_a),
                                                        reinterpret_cast<const float4*>(flat_x), packs);
  });
  cudaDeviceProp prop;
  Check(cudaGetDeviceProperties(&prop, 0), "properties");
  std::printf("{\"device\": \"%s\", \"tensors\": %zu, \"parameters\": %lld, \"fused_ms\": %.6f, "
              "\"per_tensor_ms\": %.6f, \"floor_ms\": %.6f}\n",
              prop.name, numels.size(), static_cast<long long>(total), fused, per_tensor, floor);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && std::strcmp(argv[1], "check") == 0) return Checks();
  if (argc >= 2 && std::strcmp(argv[1], "formulas") == 0) return FormulaChecks();
  if (argc >= 6 && std::strcmp(argv[1], "model") == 0) {
    return Model(argv[2], argv[3], std::atof(argv[4]), std::atof(argv[5]));
  }
  if (argc >= 4 && std::strcmp(argv[1], "bench") == 0) return Bench(std::atoi(argv[2]), std::atoi(argv[3]));
  std::fprintf(stderr, "usage: %s check | formulas | model FORMULA KIND DECAY WEIGHT < pairs | bench RUNS WARMUP < numels\n",
               argv[0]);
  return 2;
}
