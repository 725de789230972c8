// The 1,000-tensor set's layout, in plain C++ with no Paddle: the unguarded update over one
// buffer, over views of one buffer, over separate page-aligned allocations (what Paddle's CPU
// allocator gives: every tensor starts on its own 4 KB page), with the starts of the next 4 tensors
// prefetched (what ema_parallel.h's ForRange does), and with the averages in one buffer and only
// the values page-aligned apart. Cited in ema_parallel.h and docs/performance.md.
//
//   python -c "import sys; sys.path.insert(0, 'benchmarks'); from bench_update import transformer_shapes; \
//              import math; print(*[math.prod(s) for s in transformer_shapes()])" > /tmp/t1000.txt
//   g++ -O3 -fopenmp -ffp-contract=off -o /tmp/tensor_starts benchmarks/cpu/tensor_starts.cc
//   /tmp/tensor_starts 1 /tmp/t1000.txt; /tmp/tensor_starts 2 /tmp/t1000.txt   # threads, sizes
//
// 41 alternating rounds; medians and the ratio to the first row.
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <string>
#include <fstream>
using namespace std; typedef long long i64;
struct Seg { float* a; const float* x; i64 n; };
__attribute__((target("avx2"))) void lerp_f(float* __restrict a, const float* __restrict x, i64 n, float w) {
  for (i64 i = 0; i < n; ++i) a[i] = a[i] + w * (x[i] - a[i]);
}
template <int PF>
void run(const vector<Seg>& S, const vector<i64>& off, int threads) {
  i64 total = off.back();
  i64 chunk = max<i64>(total / (threads * 8), 1 << 15); chunk = (chunk + 15) / 16 * 16;
  i64 chunks = (total + chunk - 1) / chunk;
  atomic<i64> next{0};
#pragma omp parallel num_threads(threads)
  for (i64 c = next++; c < chunks; c = next++) {
    i64 start = c * chunk, stop = min(total, start + chunk);
    size_t s = upper_bound(off.begin(), off.end(), start) - off.begin() - 1;
    for (; s < S.size() && off[s] < stop; ++s) {
      if (PF) for (int k = 1; k <= PF && s + k < S.size(); ++k) {
        const Seg& q = S[s + k];
        for (int l = 0; l < 4 && l * 16 < q.n; ++l) { _mm_prefetch((const char*)(q.a + 16 * l), _MM_HINT_T0); _mm_prefetch((const char*)(q.x + 16 * l), _MM_HINT_T0); }
      }
      i64 b = max<i64>(start - off[s], 0), e = min<i64>(stop - off[s], S[s].n);
      if (b < e) lerp_f(S[s].a + b, S[s].x + b, e - b, 0.001f);
    }
  }
}
int main(int argc, char** argv) {
  int threads = atoi(argv[1]); int reps = 41;
  ifstream f(argv[2]); vector<i64> sizes; i64 v; while (f >> v) sizes.push_back(v);
  i64 total = 0; for (auto s : sizes) total += s;
  float *fa, *fx; posix_memalign((void**)&fa, 64, total * 4); posix_memalign((void**)&fx, 64, total * 4);
  vector<Seg> flat, sep, half; vector<i64> off{0};
  i64 o = 0;
  for (auto s : sizes) {
    flat.push_back({fa + o, fx + o, s}); o += s; off.push_back(o);
    float *a, *x; i64 bytes = (s * 4 + 4095) / 4096 * 4096; posix_memalign((void**)&a, 4096, bytes); posix_memalign((void**)&x, 4096, bytes);
    for (i64 i = 0; i < s; ++i) { a[i] = 1; x[i] = 2; }
    sep.push_back({a, x, s}); half.push_back({fa + o - s, x, s});
  }
  for (i64 i = 0; i < total; ++i) { fa[i] = 1; fx[i] = 2; }
  vector<Seg> one{{fa, fx, total}}; vector<i64> off1{0, total};
  struct V { string n; vector<Seg>* s; vector<i64>* o; int pf; };
  vector<V> vs = {{"one flat", &one, &off1, 0}, {"views", &flat, &off, 0}, {"pages", &sep, &off, 0}, {"pages pf4", &sep, &off, 4}, {"flat-a x-pages", &half, &off, 0}, {"flat-a pf4", &half, &off, 4}};
  vector<vector<double>> t(vs.size());
  for (int r = 0; r < reps; ++r) for (size_t k = 0; k < vs.size(); ++k) {
    auto t0 = chrono::steady_clock::now();
    switch (vs[k].pf) { case 0: run<0>(*vs[k].s, *vs[k].o, threads); break; case 1: run<1>(*vs[k].s, *vs[k].o, threads); break; case 2: run<2>(*vs[k].s, *vs[k].o, threads); break; case 4: run<4>(*vs[k].s, *vs[k].o, threads); break; }
    t[k].push_back(chrono::duration<double, milli>(chrono::steady_clock::now() - t0).count());
  }
  double base = 0;
  for (size_t k = 0; k < vs.size(); ++k) { sort(t[k].begin(), t[k].end()); double m = t[k][t[k].size()/2]; if (!k) base = m; printf("%-12s %7.3f ms %.3f\n", vs[k].n.c_str(), m, m / base); }
}
