// How close the K-quant 8-row GEMMs of repack_k.cc come to this core's
// integer multiply ports, against an anchor measured in the same run.
//
//   g++ -O3 -march=native -std=c++17 -DCAKE_HAVE_KQUANTS -Ikernels/cpu/src \
//       benchmarks/kquant_tile_cycles.cc kernels/cpu/src/common.cc -o /tmp/kquant_tile_cycles
//   /tmp/kquant_tile_cycles [rounds]
//
// Anchor: a loop of 24 independent 512-bit vpdpbusd (the 2 ports that take
// them, on Zen 4/5 and Intel cores alike), in ns per instruction. Then, per
// format and activation row count M, one thread, weights and activations in
// cache (8 tiles, K = 2048): ns per tile and block (8 rows x 256 elements),
// and that time over the time of the kernel's product instructions alone
// (vpdpbusd, vpdpwssd, vpmaddubsw: `kMul` per block and activation row, from
// the kernel's structure below) at the anchor's rate. 1.00 would be a kernel
// that does nothing but its products; the rest is the decoding of the
// weights (shared by the M rows), the float tail of each block, and ports
// left idle. Each figure is the best of `rounds` interleaved rounds. An
// AVX-512 VNNI build only.
#include "../kernels/cpu/src/repack_k.cc"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#if !CAKE_K512
int main() {
  fprintf(stderr, "kquant_tile_cycles: needs an AVX-512 VNNI build (-march=native on such a CPU)\n");
  return 1;
}
#else

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

#define CAKE_DP(i) "vpdpbusd %%zmm30, %%zmm31, %%zmm" #i "\n"
#define CAKE_DP12 \
  CAKE_DP(0) CAKE_DP(1) CAKE_DP(2) CAKE_DP(3) CAKE_DP(4) CAKE_DP(5) CAKE_DP(6) CAKE_DP(7) CAKE_DP(8) CAKE_DP(9) \
      CAKE_DP(10) CAKE_DP(11)

// ns per vpdpbusd, 24 per iteration on 12 accumulators (latency 4-5 cycles, 2 per cycle)
double anchor_ns() {
  long n = 5000000;
  const auto t0 = std::chrono::steady_clock::now();
  asm volatile("1:\n" CAKE_DP12 CAKE_DP12 "dec %0\njnz 1b\n"
               : "+r"(n)::"xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
                 "xmm11");
  return seconds_since(t0) / (5000000.0 * 24) * 1e9;
}

struct Case {
  const char* name;
  const cake_tile_kernels* k;
  int kMul;  // product instructions per block and activation row (see the kernels)
};

// Q4_K: 32 vpdpbusd, 8 vpdpwssd (scales), 4 (mins). Q5_K: a scale step every
// 2 chunks, 16 + 4. Q6_K: 32 vpmaddubsw, 16 vpdpwssd, 4 (offset). Q3_K, Q2_K
// (paired chunks): 32 vpdpbusd, 8 vpdpwssd, 4 (offset / mins).
const Case kCases[] = {{"Q2_K", &cake_r8_q2_k, 44},
                       {"Q3_K", &cake_r8_q3_k, 44},
                       {"Q4_K", &cake_r8_q4_k, 44},
                       {"Q5_K", &cake_r8_q5_k, 52},
                       {"Q6_K", &cake_r8_q6_k, 52}};
const int kMs[] = {1, 2, 4, 8};
constexpr int64_t kK = 2048, kTiles = 8;

struct Data {
  std::vector<uint8_t> w;
  std::vector<cake_q8_256> x;
  std::vector<float> y;
};

Data make(const Case& c) {
  Data d;
  d.w.resize((size_t)(kK / 256) * c.k->group_bytes * kTiles);
  for (auto& b : d.w) b = (uint8_t)(rand() % 0x3c);  // every float16 field finite
  d.x.resize(8 * (kK / 256));
  for (auto& a : d.x) {
    a.d = 0.01f;
    for (auto& q : a.qs) q = (int8_t)(rand() % 255 - 127);
    for (auto& s : a.bsums) s = (int16_t)(rand() % 2000 - 1000);
    if (c.k->arrange != nullptr) c.k->arrange(&a, 256);
  }
  d.y.resize(8 * 8 * kTiles);
  return d;
}

// ns per tile and block at m activation rows, best of a few passes
double tile_ns(const Case& c, Data& d, int m) {
  double best = 1e30;
  for (int pass = 0; pass < 5; pass++) {
    const int it = 200;
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < it; i++)
      c.k->gemm(kK, d.w.data(), kTiles, d.x.data(), (kK / 256) * sizeof(cake_q8_256), m, d.y.data(), 8 * kTiles);
    best = std::min(best, seconds_since(t0) / it);
  }
  return best / (kTiles * (kK / 256)) * 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::max(1, atoi(argv[1])) : 5;
  srand(1);
  std::vector<Data> data;
  for (const Case& c : kCases) data.push_back(make(c));
  const int nc = sizeof(kCases) / sizeof(kCases[0]), nm = sizeof(kMs) / sizeof(kMs[0]);
  std::vector<double> best((size_t)nc * nm, 1e30);
  double anchor = 1e30;
  for (int r = 0; r < rounds; r++) {
    anchor = std::min(anchor, anchor_ns());
    for (int i = 0; i < nc; i++)
      for (int j = 0; j < nm; j++) best[i * nm + j] = std::min(best[i * nm + j], tile_ns(kCases[i], data[i], kMs[j]));
    anchor = std::min(anchor, anchor_ns());
  }
  printf("anchor: %.4f ns per 512-bit vpdpbusd (%.2f per ns)\n", anchor, 1 / anchor);
  printf("%-6s %3s %10s %12s %10s\n", "format", "M", "ns/tile-blk", "ns/(blk,row)", "x products");
  for (int i = 0; i < nc; i++)
    for (int j = 0; j < nm; j++) {
      const double t = best[i * nm + j];
      printf("%-6s %3d %10.1f %12.1f %10.2f\n", kCases[i].name, kMs[j], t, t / kMs[j],
             t / (kCases[i].kMul * kMs[j] * anchor));
    }
  return 0;
}
#endif
