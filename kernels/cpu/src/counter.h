// Work items [0, count) shared out among a call's threads (matmul.cc's pool):
// the row blocks of the products, attention's units.
#pragma once

#include <stdint.h>

#include <atomic>

// Rows [0, count) handed out in blocks of `step`, so that a thread slowed down
// by another process does not hold up the others. Each of the pool's threads
// owns a contiguous part, [t count / T, (t + 1) count / T) on multiples of
// `align`, and takes its blocks from the part's front, one after another; a
// thread whose part is done takes blocks from the back of the others'. One
// counter for all (every thread's next block wherever the counter was) gave a
// thread 8 scattered blocks a matrix: at each block's start its weights were
// not prefetched (the kernels prefetch ahead along the stream they read, and
// that ran into a block another thread took), and the hardware prefetchers
// had to find the new stream. Zen 5, 2 threads, the products of 30 SmolLM2
// layers (benchmarks/tile_pairs_ab.cc's shapes, the shared counter and these
// parts in one process, best of 11-15 rounds), ms per pass, shared / parts:
//   Q4_1 pairs  M = 1 1.63 / 1.48  M = 4 1.93 / 1.62  M = 8 2.38 / 1.96
//   Q4_1 single tiles, M = 1: 1.87 / 1.45; Q4_0 pairs M = 8 2.19 / 1.79
// (a part per thread and no stealing: the same as the parts on a quiet
// machine, much slower once one core is shared with another process).
//
// Each part sits on a cache line of its own: attention's decode units are
// taken one at a time, and parts side by side had the two threads' takes
// invalidate each other's line.
struct Counter {
  static constexpr int kMaxParts = 64;
  int64_t count = 0, step = 1, align = 1;
  int parts = 1;
  struct alignas(64) Part {
    std::atomic<uint64_t> v;  // front in the low 32 bits, back in the high ones
  };
  Part part[kMaxParts];

  void split(int64_t n, int threads, int64_t a) {
    count = n;
    align = a;
    int64_t s = n / ((int64_t)threads * 8);
    s = (s + a - 1) / a * a;
    step = s < a ? a : s;
    parts = threads < 1 ? 1 : threads > kMaxParts ? kMaxParts : threads;
    for (int t = 0; t < parts; t++) {
      const uint64_t front = (uint64_t)(n * t / parts / a * a);
      const uint64_t back = t + 1 == parts ? (uint64_t)n : (uint64_t)(n * (t + 1) / parts / a * a);
      part[t].v.store(front | back << 32, std::memory_order_relaxed);
    }
  }

  bool take(int thread, int64_t* begin, int64_t* end) {
    for (int i = 0; i < parts; i++) {
      std::atomic<uint64_t>& p = part[(thread + i) % parts].v;
      uint64_t v = p.load();
      for (;;) {
        const int64_t front = (int64_t)(v & 0xffffffffu), back = (int64_t)(v >> 32);
        if (front >= back) break;
        int64_t b = front, e = front + step < back ? front + step : back;
        uint64_t next = (uint64_t)e | (uint64_t)back << 32;
        if (i > 0) {  // another's part: its last block (begins on a multiple of align)
          const int64_t from = (back - 1) / align * align + align - step;
          b = from > front ? from : front, e = back;
          next = (uint64_t)front | (uint64_t)b << 32;
        }
        if (p.compare_exchange_weak(v, next)) {
          *begin = b;
          *end = e;
          return true;
        }
      }
    }
    return false;
  }
};
