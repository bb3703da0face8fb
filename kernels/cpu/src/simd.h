// What the kernel files share beyond qdot.h's contract: the instruction sets
// this build may use, and the driver of the 8-row tile GEMMs.
//
// CAKE_AVX2: AVX2 with FMA and F16C; CAKE_AVX512: AVX-512 F/BW/VL on top;
// CAKE_VNNI: u8 x s8 dot products (AVX-512 VNNI with VL, or AVX-VNNI). Each file
// falls back to plain C++ where they are absent (ARM included).
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CAKE_AVX2 1
#endif
#if CAKE_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define CAKE_AVX512 1
#endif
#if CAKE_AVX2 && ((defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__))
#define CAKE_VNNI 1
#endif

namespace cake_tiles {

// rows(std::integral_constant<int, R>, x, y) for R = nrows (<= NR) as a
// compile-time count, so that a kernel's accumulators stay in registers.
template <int NR, class Rows>
inline void upto(int nrows, const Rows& rows, const void* x, float* y) {
  if constexpr (NR > 1)
    if (nrows < NR) return upto<NR - 1>(nrows, rows, x, y);
  rows(std::integral_constant<int, NR>{}, x, y);
}

// nrows activation rows (xs bytes apart; y rows ys floats apart) in runs of
// at most kMax, each run one call of rows (see upto).
template <int kMax, class Rows>
inline void gemm(int nrows, const void* x, size_t xs, float* y, size_t ys, const Rows& rows) {
  for (; nrows > 0; nrows -= kMax) {
    upto<kMax>(nrows < kMax ? nrows : kMax, rows, x, y);
    x = (const char*)x + (size_t)kMax * xs;
    y += (size_t)kMax * ys;
  }
}

}  // namespace cake_tiles
