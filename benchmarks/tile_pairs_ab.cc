// The units of two tiles of repack.cc against single tiles, in one process:
// whether the 512-bit GEMM of the 8-row tiles should take units at each
// activation row count M.
//
//   g++ -O3 -march=native -std=c++17 -pthread -Ikernels/cpu/src \
//       benchmarks/tile_pairs_ab.cc kernels/cpu/src/common.cc -o /tmp/tile_pairs_ab
//   /tmp/tile_pairs_ab [rounds]
//
// The products of 30 SmolLM2-135M layers (q|k|v 960 x 576, o 576 x 576,
// gate|up 3072 x 576, down 576 x 1536, random blocks) on 2 threads, shared out
// in blocks of tiles by counter.h's Counter, as matmul.cc does (each thread walks its own
// half, then takes blocks from the back of the other's), with a barrier after
// each matrix. Two policies through the same kernels: "units" (repack.cc's
// gemm: each unit of two tiles, stored group by group, through gemm_pair),
// "single" (gemm_rows only, on tiles stored one after another, as before
// 2026-12-07). Printed: ms per pass over the 120 matrices, best of `rounds`
// interleaved rounds (each the best of 2 passes after one unmeasured). An
// AVX-512 VNNI build only. (The two-stream pairs of before, tiles one after
// another taken two at once, are gone from repack.cc: their figures are in
// its comments.)
#include "../kernels/cpu/src/repack.cc"
#include "counter.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#if !CAKE_R512
int main() {
  printf("this build has no 512-bit VNNI tile pairs: nothing to compare\n");
  return 0;
}
#else

template <class F>
void gemm_single(int64_t k, const void* w, int64_t ntiles, const void* x, size_t xs, int nrows, float* y, size_t ys) {
  const size_t tile_bytes = (size_t)(k / 32) * F::kGroup;
  for (int64_t t = 0; t < ntiles; t++)
    cake_tiles::gemm<kMaxRows>(nrows, x, xs, y + kR * t, ys, [&](auto nr, const void* xt, float* yt) {
      gemm_rows<F, decltype(nr)::value>(k / 32, (const uint8_t*)w + t * tile_bytes, xt, xs, yt, ys);
    });
}

using G = void (*)(int64_t, const void*, int64_t, const void*, size_t, int, float*, size_t);

struct Mat {
  int64_t n, k;
  uint8_t* w;
  size_t tile_bytes;
};

struct Barrier {
  std::atomic<int> count{0}, gen{0};
  int n;
  void wait() {
    int g = gen.load();
    if (count.fetch_add(1) == n - 1) {
      count.store(0);
      gen.fetch_add(1);
    } else
      while (gen.load() == g) _mm_pause();
  }
};

template <class F>
void run(const char* name, int rounds, std::vector<int> ms) {
  const int64_t shapes[4][2] = {{960, 576}, {576, 576}, {3072, 576}, {576, 1536}};
  std::vector<Mat> mats;
  size_t total = 0;
  for (int l = 0; l < 30; l++)
    for (auto& s : shapes) {
      Mat m{s[0], s[1], nullptr, (size_t)(s[1] / 32) * F::kGroup};
      size_t bytes = m.tile_bytes * (m.n / 8);
      m.w = (uint8_t*)aligned_alloc(64, (bytes + 4095) / 4096 * 4096);
      for (size_t i = 0; i < bytes; i++) m.w[i] = rand() & 0x3b;
      total += bytes;
      mats.push_back(m);
    }
  const int64_t MX = 64;
  std::vector<cake_q8_32> x(MX * 48);
  for (auto& b : x) {
    b.d = 0.01f;
    b.s = 0.1f;
    for (int j = 0; j < 32; j++) b.qs[j] = (int8_t)(rand() % 255 - 127);
  }
  const size_t xs = 48 * sizeof(cake_q8_32);
  std::vector<float> y(MX * 3072);
  constexpr int NG = 2;
  G gs[NG] = {gemm<F>, gemm_single<F>};
  const char* gn[NG] = {"units", "single"};
  double best[NG][8];
  for (auto& r : best)
    for (double& v : r) v = 1e9;
  const int T = 2;
  for (int round = 0; round < rounds; round++)
    for (size_t mi = 0; mi < ms.size(); mi++)
      for (int gi0 = 0; gi0 < NG; gi0++) {
        int gi = (gi0 + round) % NG;
        int M = ms[mi];
        Barrier bar;
        bar.n = T;
        std::vector<Counter> parts(mats.size());  // matmul.cc's, on even tiles
        for (size_t j = 0; j < mats.size(); j++) parts[j].split(mats[j].n / 8, T, 2);
        double dt = 0;
        auto work = [&](int tid) {
          for (int pass = 0; pass < 3; pass++) {
            auto t0 = std::chrono::steady_clock::now();
            for (size_t j = 0; j < mats.size(); j++) {
              Mat& m = mats[j];
              int64_t b, e;
              while (parts[j].take(tid, &b, &e))
                gs[gi](m.k, m.w + b * m.tile_bytes, e - b, x.data(), xs, M, y.data() + b * 8, m.n);
              bar.wait();
              if (tid == 0) parts[j].split(m.n / 8, T, 2);
              bar.wait();
            }
            double d = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            if (tid == 0 && pass > 0 && (dt == 0 || d < dt)) dt = d;
          }
        };
        std::thread th(work, 1);
        work(0);
        th.join();
        if (dt < best[gi][mi]) best[gi][mi] = dt;
      }
  printf("%s (%.1f MB), ms per pass, best of %d rounds\n", name, total / 1e6, rounds);
  for (int gi = 0; gi < NG; gi++) {
    printf("  %-8s", gn[gi]);
    for (size_t mi = 0; mi < ms.size(); mi++) printf("  M=%d %6.2f", ms[mi], best[gi][mi] * 1e3);
    printf("\n");
  }
}

int main(int argc, char** argv) {
  int rounds = argc > 1 ? atoi(argv[1]) : 5;
  std::vector<int> ms = {1, 2, 4, 8, 16, 64};
  run<Q8_0>("Q8_0", rounds, ms);
  run<Q4_1>("Q4_1", rounds, ms);
  run<Q5_0>("Q5_0", rounds, ms);
  run<Q4_0>("Q4_0", rounds, ms);
}
#endif
