// Helpers every kernel file uses: float16 widening and the activation
// quantization of qdot.h (d = max|x| / 127, q = rint(x / d), half to even).
//
// The division is a real float32 division (not a multiply by 1/d) so that
// kernels/cpu/reference.py reproduces every q bit for bit.
#include <math.h>
#include <string.h>

// exported (the rest of the library is built -fvisibility=hidden): tests call them
#pragma GCC visibility push(default)
#include "qdot.h"
#pragma GCC visibility pop

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

void cake_round_bf16(const float* x, uint16_t* y, int64_t k) {
  int64_t i = 0;
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
  for (; i + 16 <= k; i += 16) {
    const __m256bh b = _mm512_cvtneps_pbh(_mm512_loadu_ps(x + i));  // nearest even
    _mm256_storeu_si256((__m256i*)(y + i), (__m256i)b);
  }
#endif
  for (; i < k; i++) {
    uint32_t u;
    memcpy(&u, x + i, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
      y[i] = (uint16_t)((u >> 16) | 0x40u);
    else
      y[i] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
}

float cake_f16_to_f32(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    // zero or subnormal: man * 2^-24, exact in float32
    float f = (float)man * 5.9604644775390625e-08f;
    memcpy(&bits, &f, 4);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
#endif
}

namespace {

// One run of n (a multiple of 16) floats -> n int8; returns d, writes sum(q).
inline float quantize_run_scalar(const float* x, int8_t* q, int n, int* sum) {
  float amax = 0.0f;
  for (int i = 0; i < n; i++) amax = fmaxf(amax, fabsf(x[i]));
  const float d = amax / 127.0f;
  int s = 0;
  for (int i = 0; i < n; i++) {
    const int v = d == 0.0f ? 0 : (int)rintf(x[i] / d);
    q[i] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
    s += q[i];
  }
  *sum = s;
  return d;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// 16 floats -> 16 int8 at q; returns their int32 lanes for sums.
inline __m512i quantize16(const float* x, __m512 vd, int8_t* q) {
  const __m512 v = _mm512_div_ps(_mm512_loadu_ps(x), vd);
  const __m512i i = _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm_storeu_si128((__m128i*)q, _mm512_cvtsepi32_epi8(i));
  return i;
}

inline float absmax(const float* x, int n) {
  __m512 m = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
  return _mm512_reduce_max_ps(m);
}
#elif defined(__AVX2__)
// 8 floats -> 8 int8 at q; returns their int32 lanes for sums.
inline __m256i quantize8(const float* x, __m256 vd, int8_t* q) {
  const __m256 v = _mm256_div_ps(_mm256_loadu_ps(x), vd);
  const __m256i i = _mm256_cvtps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
  _mm_storel_epi64((__m128i*)q, _mm_packs_epi16(w16, w16));
  return i;
}

inline float absmax(const float* x, int n) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps();
  for (int i = 0; i < n; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

inline int hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}
#endif

}  // namespace

void cake_quantize_q8_32(const float* x, cake_q8_32* y, int64_t k) {
  for (int64_t b = 0; b < k / 32; b++, x += 32, y++) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const float d = absmax(x, 32) / 127.0f;
    y->d = d;
    if (d == 0.0f) {
      memset(y->qs, 0, 32);
      y->s = 0.0f;
      continue;
    }
    const __m512 vd = _mm512_set1_ps(d);
    const __m512i s = _mm512_add_epi32(quantize16(x, vd, y->qs), quantize16(x + 16, vd, y->qs + 16));
    y->s = d * (float)_mm512_reduce_add_epi32(s);
#elif defined(__AVX2__)
    const float d = absmax(x, 32) / 127.0f;
    y->d = d;
    if (d == 0.0f) {
      memset(y->qs, 0, 32);
      y->s = 0.0f;
      continue;
    }
    const __m256 vd = _mm256_set1_ps(d);
    __m256i s = quantize8(x, vd, y->qs);
    for (int i = 8; i < 32; i += 8) s = _mm256_add_epi32(s, quantize8(x + i, vd, y->qs + i));
    y->s = d * (float)hsum_epi32(s);
#else
    int sum;
    y->d = quantize_run_scalar(x, y->qs, 32, &sum);
    y->s = y->d * (float)sum;
#endif
  }
}

void cake_quantize_q8_256(const float* x, cake_q8_256* y, int64_t k) {
  for (int64_t b = 0; b < k / 256; b++, x += 256, y++) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const float d = absmax(x, 256) / 127.0f;
    y->d = d;
    if (d == 0.0f) {
      memset(y->qs, 0, 256);
      memset(y->bsums, 0, sizeof y->bsums);
      continue;
    }
    const __m512 vd = _mm512_set1_ps(d);
    for (int j = 0; j < 16; j++)
      y->bsums[j] = (int16_t)_mm512_reduce_add_epi32(quantize16(x + 16 * j, vd, y->qs + 16 * j));
#elif defined(__AVX2__)
    const float d = absmax(x, 256) / 127.0f;
    y->d = d;
    if (d == 0.0f) {
      memset(y->qs, 0, 256);
      memset(y->bsums, 0, sizeof y->bsums);
      continue;
    }
    const __m256 vd = _mm256_set1_ps(d);
    for (int j = 0; j < 16; j++) {
      const __m256i s = _mm256_add_epi32(quantize8(x + 16 * j, vd, y->qs + 16 * j),
                                         quantize8(x + 16 * j + 8, vd, y->qs + 16 * j + 8));
      y->bsums[j] = (int16_t)hsum_epi32(s);
    }
#else
    float amax = 0.0f;
    for (int i = 0; i < 256; i++) amax = fmaxf(amax, fabsf(x[i]));
    const float d = amax / 127.0f;
    y->d = d;
    for (int j = 0; j < 16; j++) {
      int s = 0;
      for (int i = 16 * j; i < 16 * j + 16; i++) {
        const int v = d == 0.0f ? 0 : (int)rintf(x[i] / d);
        y->qs[i] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
        s += y->qs[i];
      }
      y->bsums[j] = (int16_t)s;
    }
#endif
  }
}
