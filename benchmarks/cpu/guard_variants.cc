// The guarded EMA update's alternatives on this CPU, in plain C++ with no Paddle: how close each
// comes to the unguarded in-place update (`a += x` is the 12 B/param floor). Used for
// docs/performance.md ("why guard on is not at the unguarded update with two threads").
//
//   g++ -O3 -fopenmp -ffp-contract=off -o /tmp/guard_variants benchmarks/cpu/guard_variants.cc
//   /tmp/guard_variants 25557032 1 31   # ResNet-50's parameter count, one thread, 31 rounds
//   /tmp/guard_variants 25557032 2 31   # two threads
//
// Rows: floor add (a += x); lerp inplace (the unguarded update, what timm does); scan+lerp (the
// guard in place: every weight read before any average is written, 16 B/param); nt2 blk (one pass
// into a second buffer, finiteness checked on the way, AVX2 non-temporal stores, 16K-element
// blocks: what the extension does); nt512 blk (the same with AVX-512 stores); nt2 noblk (one
// block per chunk); plain into (one pass with ordinary stores: the spare is read for ownership).
// Rounds alternate between the rows; medians, and the ratio to the first row.
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <functional>
#include <string>
using namespace std;
typedef long long i64;

__attribute__((target("avx2"))) void add_f(float* __restrict a, const float* __restrict x, i64 n) {
  for (i64 i = 0; i < n; ++i) a[i] += x[i];
}
__attribute__((target("avx2"))) void lerp_f(float* __restrict a, const float* __restrict x, i64 n, float w) {
  for (i64 i = 0; i < n; ++i) a[i] = a[i] + w * (x[i] - a[i]);
}
// current: AVX2 one pass, NT stores, 32 floats per iter
__attribute__((target("avx2"))) bool nt2(float* __restrict out, const float* __restrict a, const float* __restrict x, i64 n, float w) {
  const __m256 vw = _mm256_set1_ps(w);
  const __m256i mask = _mm256_set1_epi32(0x7f800000);
  __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0;
  for (i64 j = 0; j + 16 <= n; j += 16) {
      const __m256 a0 = _mm256_loadu_ps(a + j), a1 = _mm256_loadu_ps(a + j + 8);
      const __m256 x0 = _mm256_loadu_ps(x + j), x1 = _mm256_loadu_ps(x + j + 8);
      acc0 = _mm256_or_si256(acc0, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(x0), mask), mask));
      acc1 = _mm256_or_si256(acc1, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(x1), mask), mask));
      _mm256_stream_ps(out + j, _mm256_add_ps(a0, _mm256_mul_ps(vw, _mm256_sub_ps(x0, a0))));
      _mm256_stream_ps(out + j + 8, _mm256_add_ps(a1, _mm256_mul_ps(vw, _mm256_sub_ps(x1, a1))));
  }
  const __m256i any = _mm256_or_si256(acc0, acc1);
  return !_mm256_testz_si256(any, any);
}
// AVX-512 one pass NT, one 64B store per line
__attribute__((target("avx512f"))) bool nt512(float* __restrict out, const float* __restrict a, const float* __restrict x, i64 n, float w) {
  const __m512 vw = _mm512_set1_ps(w);
  const __m512i mask = _mm512_set1_epi32(0x7f800000);
  __mmask16 k = 0;
  for (i64 j = 0; j + 32 <= n; j += 32) {
    const __m512 a0 = _mm512_loadu_ps(a + j), x0 = _mm512_loadu_ps(x + j);
    const __m512 a1 = _mm512_loadu_ps(a + j + 16), x1 = _mm512_loadu_ps(x + j + 16);
    k |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(x0), mask), mask);
    k |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(x1), mask), mask);
    _mm512_stream_ps(out + j, _mm512_add_ps(a0, _mm512_mul_ps(vw, _mm512_sub_ps(x0, a0))));
    _mm512_stream_ps(out + j + 16, _mm512_add_ps(a1, _mm512_mul_ps(vw, _mm512_sub_ps(x1, a1))));
  }
  return k != 0;
}
// in-place guarded: scan then lerp (16B)
__attribute__((target("avx2"))) bool scan_f(const float* x, i64 n) {
  const __m256i mask = _mm256_set1_epi32(0x7f800000);
  __m256i acc = _mm256_setzero_si256();
  for (i64 j = 0; j + 8 <= n; j += 8) acc = _mm256_or_si256(acc, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_loadu_si256((const __m256i*)(x+j)), mask), mask));
  return !_mm256_testz_si256(acc, acc);
}
// plain one pass into out, plain stores
__attribute__((target("avx2"))) void into_plain(float* __restrict out, const float* __restrict a, const float* __restrict x, i64 n, float w) {
  for (i64 i = 0; i < n; ++i) out[i] = a[i] + w * (x[i] - a[i]);
}

volatile int sink = 0;
int main(int argc, char** argv) {
  i64 n = atoll(argv[1]);
  int threads = atoi(argv[2]);
  int reps = argc > 3 ? atoi(argv[3]) : 15;
  float *a, *x, *o;
  posix_memalign((void**)&a, 64, n * 4); posix_memalign((void**)&x, 64, n * 4); posix_memalign((void**)&o, 64, n * 4);
  for (i64 i = 0; i < n; ++i) { a[i] = 1.0f; x[i] = 2.0f; o[i] = 0; }
  const i64 block = 1 << 14;
  auto par = [&](function<void(i64, i64)> f) {
    i64 chunks = threads * 8; i64 ch = (n / chunks + 15) / 16 * 16;
#pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (i64 c = 0; c < chunks; ++c) { i64 b = c * ch, e = min(n, b + ch); if (b < e) f(b, e); }
  };
  vector<pair<string, function<void()>>> V = {
    {"floor add", [&] { par([&](i64 b, i64 e) { add_f(a + b, x + b, e - b); }); }},
    {"lerp inplace", [&] { par([&](i64 b, i64 e) { lerp_f(a + b, x + b, e - b, 0.001f); }); }},
    {"scan+lerp", [&] { par([&](i64 b, i64 e) { if (scan_f(x+b, e-b)) sink++; }); par([&](i64 b, i64 e) { lerp_f(a + b, x + b, e - b, 0.001f); }); }},
    {"nt2 blk", [&] { par([&](i64 b, i64 e) { for (i64 i=b;i<e;i+=block) sink+=nt2(o + i, a + i, x + i, min(block,e-i), 0.001f); }); }},
    {"nt512 blk", [&] { par([&](i64 b, i64 e) { for (i64 i=b;i<e;i+=block) sink+=nt512(o + i, a + i, x + i, min(block,e-i), 0.001f); }); }},
    {"nt2 noblk", [&] { par([&](i64 b, i64 e) { sink+=nt2(o + b, a + b, x + b, e-b, 0.001f); }); }},
    {"plain into", [&] { par([&](i64 b, i64 e) { into_plain(o + b, a + b, x + b, e-b, 0.001f); }); }},
  };
  if (!__builtin_cpu_supports("avx512f")) V.erase(V.begin() + 4);  // nt512 needs AVX-512
  vector<vector<double>> t(V.size());
  for (int r = 0; r < reps; ++r)
    for (size_t v = 0; v < V.size(); ++v) {
      auto t0 = chrono::steady_clock::now(); V[v].second(); auto t1 = chrono::steady_clock::now();
      t[v].push_back(chrono::duration<double, milli>(t1 - t0).count());
    }
  double base = 0;
  for (size_t v = 0; v < V.size(); ++v) {
    sort(t[v].begin(), t[v].end()); double m = t[v][t[v].size() / 2]; if (!v) base = m;
    printf("%-14s %8.3f ms  %.3f\n", V[v].first.c_str(), m, m / base);
  }
}
