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

namespace cake_vmath {

// exp(x) for x <= 0 (Cephes expf, ~1 ulp), for softmax weights and SiLU. The
// AVX-512 form gives 0 below -103; the AVX2 one clamps at -87.3 (~1e-38).
#if defined(__AVX512F__)
inline __m512 exp_nonpos(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-103.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif
#if defined(__AVX2__) && defined(__FMA__)
inline __m256 exp_nonpos(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

}  // namespace cake_vmath

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
