// Fused causal attention over the KV cache, read and written in place: the
// decode step's rope + cache write + gather of the batch's slots + softmax
// attention, in one call per layer (a C entry point for ctypes and an XLA FFI
// handler whose cache result aliases its cache operand).
//
// Layouts (all float32 but slots / positions / lengths, int32, and a cache of
// kv_type 1 (float16) or 2 (bfloat16); row-major):
//   qkv   (B, L, (nh + 2 nkv) hd)   q heads, then k heads, then v heads
//   cos, sin (B, L, hd / 2)         rotary tables at each token's position,
//                                   HF rotate_half: x1 = x[:hd/2], x2 = x[hd/2:],
//                                   rope(x) = concat(x1 c - x2 s, x2 c + x1 s)
//   cache (n_layers, 2, S, nkv, T, hd)  [layer, k | v, slot, kv head, position, dim]
//   out   (B, L, nh hd)
// Token l < lengths[b] of sequence b sits at t = positions[b] + l. Its rotated
// k and its v go to cache[layer, 0 | 1, slots[b], :, t]; all writes of a call
// come before any read, so a chunk attends to its own keys. Query head j
// (rope(q) * scale: 1 / sqrt(hd) for most models, Gemma's
// query_pre_attn_scalar^-0.5) attends with kv head j / (nh / nkv) to cache
// positions [lo, t], lo = max(0, t - window + 1) with a window, else 0: float32
// scores s, soft-capped to softcap * tanh(s / softcap) where softcap > 0 (Gemma
// 2), max-subtracted softmax, weighted sum of v. Rows l >= lengths[b] are
// padding: nothing is written to the cache for them and their output is zero.
//
// A 16-bit cache holds each k and v rounded to nearest even (as XLA converts
// them, so both attention paths write the same bits): half the bytes read from
// memory, which is what bounds attention at batch 8 and over long caches. With
// AVX-512 and hd a multiple of 16 a unit reads the rows as stored, widening
// them in registers (score_keys, weigh_values); elsewhere it widens them into
// float32 scratch first, then runs as over a float32 cache.
//
// Work: a unit is (sequence, kv head, block of up to 8 tokens, block of that kv
// head's query heads, chunk of keys: see kChunk). Its query rows score each block of 16 keys (AVX-512; 8
// AVX2) while the block is in L1, one accumulator per key and one transposing
// reduction per block; then softmax in place (a thread-local scratch of rows x
// keys floats, weights outside a row's own keys set to 0), and one pass over
// the value rows per 4 query rows, accumulating in registers. Units come from a
// shared counter; small calls (one decode token over a short cache) run on the
// caller alone.
#include <math.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "counter.h"
#include "qdot.h"
#include "simd.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define CAKE_ATT_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define CAKE_ATT_AVX2 1
#endif

#pragma GCC visibility push(default)
extern "C" {
// 0 on success, else (nothing written):
//   -1 a size is negative or zero (B and L may be 0), or a null pointer
//   -2 nh is not a multiple of nkv
//   -3 hd is odd
//   -4 layer is not in [0, n_layers)
//   -5 window < 0
//   -6 some lengths[b] is not in [0, L]
//   -7 some sequence with lengths[b] > 0 has slots[b] outside [0, S)
//   -8 some sequence with lengths[b] > 0 has positions[b] < 0 or
//      positions[b] + lengths[b] > T (a token past the cache's end)
//   -9 scale is not a positive finite number, or softcap is negative or not finite
// Sequences with lengths[b] == 0 are not read: their slot and position may be anything.
//  -10 kv_type is not 0 (float32), 1 (float16) or 2 (bfloat16)
int cake_attention(const float* qkv, const float* cos, const float* sin, void* cache, int kv_type,
                   const int32_t* slots, const int32_t* positions, const int32_t* lengths,
                   int64_t B, int64_t L, int64_t nh, int64_t nkv, int64_t hd, int64_t n_layers,
                   int64_t S, int64_t T, int64_t layer, int64_t window, float scale, float softcap,
                   float* out);
int cake_num_threads(void);  // matmul.cc
}
#pragma GCC visibility pop

namespace {

// Below this many multiply-adds (scores plus weighted sums) the caller works
// alone. Since a pool worker joins a call only while the caller is still at
// its share (matmul.cc), a busy second core no longer makes the caller wait,
// and the pool is worth it from small calls on. Measured on 2 cores (nh 9, nkv
// 3, hd 64, one decode token, cache cold as in a decode step, us alone / on
// both): B = 1, t = 20 (23k) 4.5 / 4.2; B = 8, t = 20 (184k) 20.7 / 12.1,
// i.e. ~0.26 ms of a SmolLM2 step for 8 sequences (30 layers), B = 1 unchanged.
constexpr int64_t kParallelMin = 1 << 14;
// At most this many tokens of one sequence per unit (they share key loads).
constexpr int64_t kMaxTokens = 8;
// Value rows of a 16-bit cache widened at a time (16 KB of float32 at hd 64).
constexpr int64_t kValueBlock = 64;
// Keys in chunks of this many cache positions, at multiples of it: a unit
// takes one chunk of its rows' keys, so that a long cache is shared out among
// the threads without two units reading the same rows (before, a decode call
// of one sequence split each kv head's query heads between 2 units, which read
// its keys and values twice). A row's chunks each give a max, a sum and an
// unscaled weighted sum of values; the unit that finishes a group's last chunk
// merges them in chunk order. The boundaries depend on positions only, so a
// token's output is the same bits whichever call it came in. A row whose keys
// fit one chunk is computed as before the chunks (the same bits).
// SmolLM2's shape (nh 9, nkv 3, hd 64), float16 cache, one decode token,
// 2 threads, us a call at 4000 / 1024 positions (both builds in one process):
// 233 / 60.5 before, 209 / 48 with the chunks; with the rows read as stored
// (score_keys) as well 137 / 35, and for 8 sequences 1809 / 503 -> 1359 / 378.
constexpr int64_t kChunk = 256;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// ---- vector helpers: dot, max, exp in place, weighted sum of rows ----

#if CAKE_ATT_AVX512

inline __mmask16 tail_mask(int64_t n) { return (__mmask16)((1u << n) - 1u); }

inline float dot(const float* a, const float* b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : tail_mask(n - i);
    s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

// Scores of one query against kKeyBlock consecutive key rows (hd apart):
// out[i] = dot(q, k + i hd). One accumulator per key, then a transposing
// reduction tree: ~3 shuffles and adds per score instead of a whole
// horizontal sum each. Only the first n keys are read (the last block of a
// span): each output lane sums one key's accumulator alone, so the others,
// left zero, change no bit of theirs, as the zero-padded copy of the last
// keys did before. That copy (a memset and a memcpy per unit) and its
// products went: B = 8 sequences at 20 positions (nh 9, nkv 3, hd 64), one
// thread, cache in L1/L2: 15.6-16.7 -> 13.2-13.8 us a call.
constexpr int64_t kKeyBlock = 16;

inline void dot_block(const float* q, const float* k, int64_t hd, float* out, int64_t n = 16) {
  __m512 a[16];
  for (int i = 0; i < 16; i++) a[i] = _mm512_setzero_ps();
  for (int64_t d = 0; d < hd; d += 16) {
    const __mmask16 m = hd - d >= 16 ? (__mmask16)0xffff : tail_mask(hd - d);
    const __m512 qd = _mm512_maskz_loadu_ps(m, q + d);
    for (int i = 0; i < 16; i++)
      if (i < n) a[i] = _mm512_fmadd_ps(qd, _mm512_maskz_loadu_ps(m, k + i * hd + d), a[i]);
  }
  __m512 b[8], c[4], e[2];
  for (int i = 0; i < 8; i++)  // lanes alternate keys 2i, 2i + 1 within each 128 bits
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; i++)  // each 128 bits: keys 4i .. 4i + 3
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 2; i++)  // 128-bit lanes: 8i (two halves), 8i + 4 (two halves)
    e[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_f32x4(e[0], e[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                      _mm512_shuffle_f32x4(e[0], e[1], _MM_SHUFFLE(3, 1, 3, 1))));
}

inline float max_of(const float* x, int64_t n) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + i));
  if (i < n) m = _mm512_mask_max_ps(m, tail_mask(n - i), m, _mm512_maskz_loadu_ps(tail_mask(n - i), x + i));
  return _mm512_reduce_max_ps(m);
}

// x[i] = exp(x[i] - m); returns the sum.
inline float exp_sum(float* x, int64_t n, float m) {
  const __m512 vm = _mm512_set1_ps(m);
  __m512 s = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 e = cake_vmath::exp_nonpos(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm));
    _mm512_storeu_ps(x + i, e);
    s = _mm512_add_ps(s, e);
  }
  if (i < n) {
    const __mmask16 k = tail_mask(n - i);
    const __m512 e = _mm512_maskz_mov_ps(k, cake_vmath::exp_nonpos(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), vm)));
    _mm512_mask_storeu_ps(x + i, k, e);
    s = _mm512_add_ps(s, e);
  }
  return _mm512_reduce_add_ps(s);
}

// out[:hd] = scale * sum_i p[i] v[i * hd : (i + 1) * hd]
// Up to kRowsAtOnce rows at once, each row's weights p + r * stride: one pass
// over the value rows serves all of them (out[r] = scale[r] * sum_i p_r[i] v[i]).
constexpr int kRowsAtOnce = 4;

// acc: out[r] already holds an unscaled partial sum over earlier rows of v
// (a 16-bit cache's values come in blocks): go on from it, in the same order.
template <int R>
inline void weighted_rows(const float* p, int64_t stride, int64_t n, const float* v, int64_t hd,
                          const float* scale, float* const* out, bool acc = false) {
  int64_t d = 0;
  for (; d + 64 <= hd; d += 64) {
    __m512 a[R][4];
    for (int r = 0; r < R; r++)
      for (int u = 0; u < 4; u++) a[r][u] = acc ? _mm512_loadu_ps(out[r] + d + 16 * u) : _mm512_setzero_ps();
    const float* vr = v + d;
    for (int64_t i = 0; i < n; i++, vr += hd) {
      __m512 x[4];
      for (int u = 0; u < 4; u++) x[u] = _mm512_loadu_ps(vr + 16 * u);
      for (int r = 0; r < R; r++) {
        const __m512 pr = _mm512_set1_ps(p[r * stride + i]);
        for (int u = 0; u < 4; u++) a[r][u] = _mm512_fmadd_ps(pr, x[u], a[r][u]);
      }
    }
    for (int r = 0; r < R; r++)
      for (int u = 0; u < 4; u++)
        _mm512_storeu_ps(out[r] + d + 16 * u, _mm512_mul_ps(a[r][u], _mm512_set1_ps(scale[r])));
  }
  for (; d < hd; d += 16) {
    const __mmask16 k = hd - d >= 16 ? (__mmask16)0xffff : tail_mask(hd - d);
    __m512 a[R];
    for (int r = 0; r < R; r++) a[r] = acc ? _mm512_maskz_loadu_ps(k, out[r] + d) : _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i++) {
      const __m512 x = _mm512_maskz_loadu_ps(k, v + i * hd + d);
      for (int r = 0; r < R; r++) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(p[r * stride + i]), x, a[r]);
    }
    for (int r = 0; r < R; r++) _mm512_mask_storeu_ps(out[r] + d, k, _mm512_mul_ps(a[r], _mm512_set1_ps(scale[r])));
  }
}

#elif CAKE_ATT_AVX2

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float s = hsum8(_mm256_add_ps(s0, s1));
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

// Scores of one query against kKeyBlock consecutive key rows (hd apart), one
// accumulator per key and a transposing reduction (see the AVX-512 version).
constexpr int64_t kKeyBlock = 8;

inline void dot_block(const float* q, const float* k, int64_t hd, float* out, int64_t n = 8) {
  if (hd % 8 != 0) {
    for (int i = 0; i < 8; i++) out[i] = i < n ? dot(q, k + i * hd, hd) : 0.0f;
    return;
  }
  __m256 a[8];
  for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
  for (int64_t d = 0; d < hd; d += 8) {
    const __m256 qd = _mm256_loadu_ps(q + d);
    for (int i = 0; i < 8; i++)
      if (i < n) a[i] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k + i * hd + d), a[i]);
  }
  __m256 b[4], c[2];
  for (int i = 0; i < 4; i++)
    b[i] = _mm256_add_ps(_mm256_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm256_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 2; i++)
    c[i] = _mm256_add_ps(_mm256_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(c[0], c[1], 0x20),
                                      _mm256_permute2f128_ps(c[0], c[1], 0x31)));
}

inline float max_of(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  float r = _mm_cvtss_f32(h);
  for (; i < n; i++) r = x[i] > r ? x[i] : r;
  return r;
}

inline float exp_sum(float* x, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 s = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = cake_vmath::exp_nonpos(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
    _mm256_storeu_ps(x + i, e);
    s = _mm256_add_ps(s, e);
  }
  float r = hsum8(s);
  for (; i < n; i++) {
    x[i] = expf(x[i] - m);
    r += x[i];
  }
  return r;
}

// Up to kRowsAtOnce rows at once (see the AVX-512 version).
constexpr int kRowsAtOnce = 3;

template <int R>
inline void weighted_rows(const float* p, int64_t stride, int64_t n, const float* v, int64_t hd,
                          const float* scale, float* const* out, bool acc = false) {
  int64_t d = 0;
  for (; d + 16 <= hd; d += 16) {
    __m256 a[R][2];
    for (int r = 0; r < R; r++) {
      a[r][0] = acc ? _mm256_loadu_ps(out[r] + d) : _mm256_setzero_ps();
      a[r][1] = acc ? _mm256_loadu_ps(out[r] + d + 8) : _mm256_setzero_ps();
    }
    const float* vr = v + d;
    for (int64_t i = 0; i < n; i++, vr += hd) {
      const __m256 x0 = _mm256_loadu_ps(vr), x1 = _mm256_loadu_ps(vr + 8);
      for (int r = 0; r < R; r++) {
        const __m256 pr = _mm256_set1_ps(p[r * stride + i]);
        a[r][0] = _mm256_fmadd_ps(pr, x0, a[r][0]);
        a[r][1] = _mm256_fmadd_ps(pr, x1, a[r][1]);
      }
    }
    for (int r = 0; r < R; r++) {
      const __m256 sc = _mm256_set1_ps(scale[r]);
      _mm256_storeu_ps(out[r] + d, _mm256_mul_ps(a[r][0], sc));
      _mm256_storeu_ps(out[r] + d + 8, _mm256_mul_ps(a[r][1], sc));
    }
  }
  for (; d < hd; d++)
    for (int r = 0; r < R; r++) {
      float a = acc ? out[r][d] : 0.0f;
      for (int64_t i = 0; i < n; i++) a += p[r * stride + i] * v[i * hd + d];
      out[r][d] = a * scale[r];
    }
}

#else  // plain C++: lane arrays the compiler vectorizes without reassociating

inline float dot(const float* a, const float* b, int64_t n) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; j++) s[j] += a[i + j] * b[i + j];
  float r = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
  for (; i < n; i++) r += a[i] * b[i];
  return r;
}

constexpr int64_t kKeyBlock = 4;

inline void dot_block(const float* q, const float* k, int64_t hd, float* out, int64_t n = 4) {
  for (int i = 0; i < 4; i++) out[i] = i < n ? dot(q, k + i * hd, hd) : 0.0f;
}

inline float max_of(const float* x, int64_t n) {
  float r = -INFINITY;
  for (int64_t i = 0; i < n; i++) r = x[i] > r ? x[i] : r;
  return r;
}

inline float exp_sum(float* x, int64_t n, float m) {
  float r = 0.0f;
  for (int64_t i = 0; i < n; i++) {
    x[i] = expf(x[i] - m);
    r += x[i];
  }
  return r;
}

inline void weighted_sum(const float* p, int64_t n, const float* v, int64_t hd, float scale, float* out,
                         bool acc) {
  int64_t d = 0;
  for (; d + 32 <= hd; d += 32) {
    float a[32];
    for (int j = 0; j < 32; j++) a[j] = acc ? out[d + j] : 0.0f;
    for (int64_t i = 0; i < n; i++) {
      const float pi = p[i];
      const float* vr = v + i * hd + d;
      for (int j = 0; j < 32; j++) a[j] += pi * vr[j];
    }
    for (int j = 0; j < 32; j++) out[d + j] = a[j] * scale;
  }
  for (; d < hd; d++) {
    float a = acc ? out[d] : 0.0f;
    for (int64_t i = 0; i < n; i++) a += p[i] * v[i * hd + d];
    out[d] = a * scale;
  }
}

constexpr int kRowsAtOnce = 1;

template <int R>
inline void weighted_rows(const float* p, int64_t stride, int64_t n, const float* v, int64_t hd,
                          const float* scale, float* const* out, bool acc = false) {
  for (int r = 0; r < R; r++) weighted_sum(p + r * stride, n, v, hd, scale[r], out[r], acc);
}

#endif

// ---- 16-bit cache rows: widened to float32, and rounded to nearest even ----

enum KvType { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t bits;
  if (e == 0) {  // zero or subnormal: m * 2^-24
    const float f = (float)m * (1.0f / 16777216.0f);
    memcpy(&bits, &f, 4);
    bits |= sign;
  } else if (e == 31) {
    bits = sign | 0x7f800000u | (m << 13);
  } else {
    bits = sign | ((e + 112) << 23) | (m << 13);
  }
  float r;
  memcpy(&r, &bits, 4);
  return r;
}

inline uint16_t f32_to_f16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);  // NaN
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // >= 65520: infinity
  if (ax < 0x38800000u) {  // below 2^-14: a subnormal, in units of 2^-24
    float a;
    memcpy(&a, &ax, 4);
    return (uint16_t)(sign | (uint32_t)nearbyintf(a * 16777216.0f));
  }
  uint32_t h = (((ax >> 23) - 112) << 10) | ((ax >> 13) & 0x3ffu);
  const uint32_t rest = ax & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
  return (uint16_t)(sign | h);
}

inline float bf16_to_f32(uint16_t b) {
  const uint32_t bits = (uint32_t)b << 16;
  float r;
  memcpy(&r, &bits, 4);
  return r;
}

// dst[i] = src[i] widened, i < n
inline void widen(const uint16_t* src, float* dst, int64_t n, int kv_type) {
  int64_t i = 0;
  if (kv_type == kBF16) {
#if CAKE_ATT_AVX512
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(
                                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(src + i))), 16)));
#elif CAKE_ATT_AVX2
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(
                                    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(src + i))), 16)));
#endif
    for (; i < n; i++) dst[i] = bf16_to_f32(src[i]);
    return;
  }
#if CAKE_ATT_AVX512
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(src + i))));
#elif CAKE_ATT_AVX2 && defined(__F16C__)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + i))));
#endif
  for (; i < n; i++) dst[i] = f16_to_f32(src[i]);
}

// dst[i] = src[i] rounded to the cache's type (float32: copied)
inline void store_row(const float* src, void* dst, int64_t n, int kv_type) {
  if (kv_type == kF32) {
    memcpy(dst, src, sizeof(float) * n);
    return;
  }
  uint16_t* d = (uint16_t*)dst;
  int64_t i = 0;
  if (kv_type == kF16) {
#if CAKE_ATT_AVX512
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256((__m256i*)(d + i), _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
    for (; i < n; i++) d[i] = f32_to_f16(src[i]);
    return;
  }
  cake_round_bf16(src, d, n);  // common.cc, as BF16's activations
}

// out[:half], out[half:] = x1 c - x2 s, x2 c + x1 s, each times mul
inline void rope(const float* x, const float* c, const float* s, int64_t half, float mul, float* out) {
  const float* x2 = x + half;
  for (int64_t i = 0; i < half; i++) {
    out[i] = (x[i] * c[i] - x2[i] * s[i]) * mul;
    out[half + i] = (x2[i] * c[i] + x[i] * s[i]) * mul;
  }
}

// Cache rows prefetched ahead of the products, past the end of the 4 KB page
// the hardware prefetchers stop at; non-temporal, as the weights (repack.cc):
// a row is read once a step. One decode token, 4000 float16 positions, 2
// threads: 168-186 us a call against 194 without (noisy; T0 and 16 or 64
// rows ahead within the noise). The widening path (AVX2 builds) prefetches
// the same way, within the noise too; there, with the chunks of keys, one
// sequence runs 13-30 % faster than before them and 8 sequences over long
// caches ~10 % slower (an x86-64-v3 build on the Zen 4 host, us a call at 2048
// positions: B = 1 136 -> 111-119, B = 8 845 -> 901-942). Not profiled further.
constexpr int64_t kAheadRows = 32;
inline void prefetch_bytes(const void* p, int64_t n) {
#if defined(__x86_64__) || defined(_M_X64)
  for (int64_t b = 0; b < n; b += 64) _mm_prefetch((const char*)p + b, _MM_HINT_NTA);
#else
  (void)p, (void)n;
#endif
}

#if CAKE_ATT_AVX512
// ---- AVX-512, hd a multiple of 16: the cache read as it is stored ----
// Scores and weighted sums load each key and value row once for all of a
// unit's query rows, converting 16-bit rows in registers: no widened copy.
// (That copy, a pass writing and reading back 4 bytes a value, took half a
// unit's time over a long float16 cache.)

// 16 values of a cache row from element i on, as float32
template <int KV>
inline __m512 load_kv(const void* base, int64_t i) {
  if constexpr (KV == kF32) {
    return _mm512_loadu_ps((const float*)base + i);
  } else if constexpr (KV == kF16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)base + i)));
  } else {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)((const uint16_t*)base + i))), 16));
  }
}

// The 8 sums of a[0..7]'s lanes, in order. Each sum's bits depend on its own
// accumulator alone (a fixed tree), whatever the others hold.
inline __m256 sums8(const __m512* a) {
  __m256 h[8];
  for (int i = 0; i < 8; i++)
    h[i] = _mm256_add_ps(_mm512_castps512_ps256(a[i]), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[i]), 1)));
  const __m256 s01 = _mm256_hadd_ps(h[0], h[1]), s23 = _mm256_hadd_ps(h[2], h[3]);
  const __m256 s45 = _mm256_hadd_ps(h[4], h[5]), s67 = _mm256_hadd_ps(h[6], h[7]);
  const __m256 s0 = _mm256_hadd_ps(s01, s23), s1 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

// scores[r * stride + i] = dot(q row r, key t0 + i), r < R, i < n <= 8 (keys
// past n are not read)
template <int KV, int R>
inline void score_keys(const float* q, int64_t hd, const void* keys, int64_t t0, int64_t n, float* scores,
                       int64_t stride) {
  __m512 a[R][8];
  for (int r = 0; r < R; r++)
    for (int i = 0; i < 8; i++) a[r][i] = _mm512_setzero_ps();
  for (int64_t d = 0; d < hd; d += 16) {
    __m512 qd[R];
    for (int r = 0; r < R; r++) qd[r] = _mm512_loadu_ps(q + r * hd + d);
    for (int i = 0; i < 8; i++) {
      if (i >= n) break;
      const __m512 k = load_kv<KV>(keys, (t0 + i) * hd + d);
      for (int r = 0; r < R; r++) a[r][i] = _mm512_fmadd_ps(qd[r], k, a[r][i]);
    }
  }
  const __mmask8 m = (__mmask8)((1u << n) - 1u);
  for (int r = 0; r < R; r++) _mm256_mask_storeu_ps(scores + r * stride, m, sums8(a[r]));
}

// scores (rows, span) of `rows` queries (hd apart) against keys [lo, lo + span)
// the cache row bytes of rows [t, t + n) ahead (kAheadRows)
template <int KV>
inline void prefetch_rows(const void* base, int64_t t, int64_t n, int64_t hd) {
  prefetch_bytes((const char*)base + t * hd * (KV == kF32 ? 4 : 2), n * hd * (KV == kF32 ? 4 : 2));
}

template <int KV>
void score_span(const float* q, int64_t rows, int64_t hd, const void* keys, int64_t lo, int64_t span,
                float* scores) {
  for (int64_t t = 0; t < span; t += 8) {
    const int64_t n = min64(8, span - t);
    if (t + kAheadRows < span) prefetch_rows<KV>(keys, lo + t + kAheadRows, min64(8, span - t - kAheadRows), hd);
    int64_t r = 0;
    for (; r + 3 <= rows; r += 3) score_keys<KV, 3>(q + r * hd, hd, keys, lo + t, n, scores + r * span + t, span);
    if (rows - r == 2) score_keys<KV, 2>(q + r * hd, hd, keys, lo + t, n, scores + r * span + t, span);
    if (rows - r == 1) score_keys<KV, 1>(q + r * hd, hd, keys, lo + t, n, scores + r * span + t, span);
  }
}

// out[r][:hd] = scale[r] * sum_i p[r * stride + i] * value row (lo + i), r < R
// (weighted_rows over the rows as stored: the same additions in the same order)
template <int KV, int R>
inline void weigh_values(const float* p, int64_t stride, int64_t n, const void* vals, int64_t lo, int64_t hd,
                         const float* scale, float* const* out) {
  for (int64_t d = 0; d < hd; d += 64) {
    const int w = (int)min64(4, (hd - d) / 16);
    __m512 a[R][4];
    for (int r = 0; r < R; r++)
      for (int u = 0; u < 4; u++) a[r][u] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i++) {
      if (d == 0 && i % 4 == 0 && i + kAheadRows < n)
        prefetch_rows<KV>(vals, lo + i + kAheadRows, min64(4, n - i - kAheadRows), hd);
      __m512 x[4];
      for (int u = 0; u < 4; u++)
        if (u < w) x[u] = load_kv<KV>(vals, (lo + i) * hd + d + 16 * u);
      for (int r = 0; r < R; r++) {
        const __m512 pr = _mm512_set1_ps(p[r * stride + i]);
        for (int u = 0; u < 4; u++)
          if (u < w) a[r][u] = _mm512_fmadd_ps(pr, x[u], a[r][u]);
      }
    }
    for (int r = 0; r < R; r++)
      for (int u = 0; u < 4; u++)
        if (u < w) _mm512_storeu_ps(out[r] + d + 16 * u, _mm512_mul_ps(a[r][u], _mm512_set1_ps(scale[r])));
  }
}

template <int KV>
void weigh_span(const float* p, int64_t stride, int64_t span, const void* vals, int64_t lo, int64_t hd,
                const float* scale, float* const* out, int r) {
  if (r == 1)
    weigh_values<KV, 1>(p, stride, span, vals, lo, hd, scale, out);
  else if (r == 2)
    weigh_values<KV, 2>(p, stride, span, vals, lo, hd, scale, out);
  else if (r == 3)
    weigh_values<KV, 3>(p, stride, span, vals, lo, hd, scale, out);
  else
    weigh_values<KV, 4>(p, stride, span, vals, lo, hd, scale, out);
}
#endif

struct Job {
  const float *qkv, *cos, *sin;
  void* cache;
  int kv_type;  // KvType
  const int32_t *slots, *positions, *lengths;
  int64_t L, nh, nkv, hd, S, T, layer, window;
  float scale, softcap;  // softcap 0: none
  float* out;
  int64_t rep;     // query heads per kv head
  int64_t tokens;  // tokens per unit
  int64_t heads;   // query heads per unit
  int64_t n_tok, n_head;  // blocks of tokens per sequence, of heads per kv head
  int64_t units;
  // units by group (sequence, kv head, token block, head block; the order of
  // the u decomposition below): group i has units first_unit[i] ..
  // first_unit[i + 1] - 1, one a chunk of its keys from the first on (an empty
  // group: one unit, which does nothing)
  std::vector<int64_t> first_unit;
  bool chunked = false;  // some group has more than one chunk
  float* part = nullptr;  // per unit: rows x (hd + 2) floats, a row's sums then its max and sum
  int64_t part_stride = 0;
  std::vector<std::atomic<int64_t>>* done = nullptr;  // per group: chunks finished
  Counter next;  // the attention units, a part per thread
  // the cache writes come first, one unit per (sequence, kv head): a thread
  // takes writes until none are left, waits until every write is done (a
  // taken one is being run), then takes attention units
  int64_t writes;
  std::atomic<int64_t> next_write{0}, written{0};
};

// The first cache position token t reads.
inline int64_t first_key(const Job& j, int64_t t) { return j.window > 0 ? max64(0, t - j.window + 1) : 0; }

// The chunks of keys [lo, hi] (whole chunks and the parts at either end).
inline int64_t chunks_of(int64_t lo, int64_t hi) { return hi / kChunk - lo / kChunk + 1; }

// Group i's rows merged from their chunks' parts (see kChunk): in chunk order,
// out = sum_c e^(m_c - M) acc_c * (1 / sum_c e^(m_c - M) l_c), M the largest m_c.
void merge_group(const Job& j, int64_t i, int64_t b, int64_t g, int64_t l0, int64_t l1, int64_t r0, int64_t nr) {
  const int64_t hd = j.hd, n = j.first_unit[i + 1] - j.first_unit[i];
  const float* base = j.part + j.first_unit[i] * j.part_stride;
  for (int64_t row = 0; row < (l1 - l0) * nr; row++) {
    const int64_t l = l0 + row / nr, h = g * j.rep + r0 + row % nr;
    float* out = j.out + ((b * j.L + l) * j.nh + h) * hd;
    float m = -INFINITY;
    for (int64_t c = 0; c < n; c++) {
      const float* pr = base + c * j.part_stride + row * (hd + 2);
      if (pr[hd + 1] > 0.0f && pr[hd] > m) m = pr[hd];
    }
    float sum = 0.0f;
    for (int64_t d = 0; d < hd; d++) out[d] = 0.0f;
    for (int64_t c = 0; c < n; c++) {
      const float* pr = base + c * j.part_stride + row * (hd + 2);
      if (!(pr[hd + 1] > 0.0f)) continue;  // none of the row's keys in this chunk
      const float w = expf(pr[hd] - m);
      sum += w * pr[hd + 1];
      for (int64_t d = 0; d < hd; d++) out[d] += w * pr[d];
    }
    const float inv = 1.0f / sum;
    for (int64_t d = 0; d < hd; d++) out[d] *= inv;
  }
}

// Where unit u is: its group, that group's sequence, kv head, tokens and
// query heads, and the cache positions [lo, hi] it reads (empty: no tokens).
struct UnitAt {
  int64_t gi, n_chunks, b, g, l0, l1, r0, nr, lo, hi, row0;
  bool empty;
};

UnitAt unit_at(const Job& j, int64_t u) {
  UnitAt a;
  a.gi = std::upper_bound(j.first_unit.begin(), j.first_unit.end(), u) - j.first_unit.begin() - 1;
  a.n_chunks = j.first_unit[a.gi + 1] - j.first_unit[a.gi];
  const int64_t per_seq = j.nkv * j.n_tok * j.n_head;
  a.b = a.gi / per_seq;
  a.g = a.gi / (j.n_tok * j.n_head) % j.nkv;
  const int64_t tb = a.gi / j.n_head % j.n_tok, hb = a.gi % j.n_head;
  const int64_t len = j.lengths[a.b];
  a.l0 = tb * j.tokens;
  a.empty = a.l0 >= len;
  if (a.empty) return a;
  a.l1 = min64(a.l0 + j.tokens, len);
  a.r0 = hb * j.heads, a.nr = min64(a.r0 + j.heads, j.rep) - a.r0;
  const int64_t pos = j.positions[a.b];
  a.row0 = ((j.layer * 2 * j.S + j.slots[a.b]) * j.nkv + a.g) * j.T * j.hd;  // element of (k, position 0)
  // this unit's keys: the group's [first_key(first token), last token], cut to its chunk
  const int64_t glo = first_key(j, pos + a.l0), ghi = pos + a.l1 - 1;
  const int64_t chunk = glo / kChunk + (u - j.first_unit[a.gi]);
  a.lo = a.n_chunks == 1 ? glo : max64(glo, chunk * kChunk);
  a.hi = a.n_chunks == 1 ? ghi : min64(ghi, chunk * kChunk + kChunk - 1);
  return a;
}

// The first kAheadRows key and value rows of a unit, which the prefetches in
// its loops (kAheadRows ahead) never ask for: a decode unit over a short
// cache (SmolLM2, 8 sequences at 36 positions: 36 rows) starts on rows the
// weights streamed through since the last step had evicted, and every one of
// its first loads waited on memory.
void prefetch_unit(const Job& j, const UnitAt& a) {
  if (a.empty) return;
  const int64_t esize = j.kv_type == kF32 ? 4 : 2, row_bytes = j.hd * esize;
  const int64_t n = min64(a.hi - a.lo + 1, kAheadRows) * row_bytes;
  const char* k = (const char*)j.cache + (a.row0 + a.lo * j.hd) * esize;
  prefetch_bytes(k, n);
  prefetch_bytes(k + j.S * j.nkv * j.T * j.hd * esize, n);
}

void run_unit(const Job& j, int64_t u, const UnitAt& a, std::vector<float>& scratch, std::vector<float>& wide) {
  if (a.empty) return;
  const int64_t gi = a.gi, n_chunks = a.n_chunks, b = a.b, g = a.g;
  const int64_t l0 = a.l0, l1 = a.l1, r0 = a.r0, nr = a.nr, row0 = a.row0, lo = a.lo, hi = a.hi;
  const int64_t hd = j.hd, half = hd / 2, width = (j.nh + 2 * j.nkv) * hd;
  const int64_t pos = j.positions[b];
  const int64_t kv_stride = j.S * j.nkv * j.T * hd;  // cache[.., 0] -> cache[.., 1]
  const bool whole = n_chunks == 1;
  const int64_t span = hi - lo + 1;
  // A float32 cache is read in place: keys[t * hd], vals[t * hd] are position
  // t's rows. A 16-bit one is widened a block of rows at a time into `wide`
  // (kKeyBlock keys, kValueBlock values: in L1 when the products read them).
  const bool f32 = j.kv_type == kF32;
  const float* keys = f32 ? (const float*)j.cache + row0 : nullptr;
  const float* vals = f32 ? keys + kv_stride : nullptr;
  const uint16_t* k16 = f32 ? nullptr : (const uint16_t*)j.cache + row0;
  const uint16_t* v16 = f32 ? nullptr : k16 + kv_stride;
  if (!f32 && wide.size() < (size_t)(kValueBlock * hd)) wide.resize((size_t)(kValueBlock * hd));
  const int64_t rows = (l1 - l0) * nr;
  const size_t need = (size_t)(rows * (hd + span + 1) + kKeyBlock * (hd + 1));
  if (scratch.size() < need) scratch.resize(need);
  float* q = scratch.data();           // (rows, hd): rotated, scaled queries
  float* scores = q + rows * hd;       // (rows, span), row r's key t' at t' - lo
  float* tail = scores + rows * span + rows;  // (kKeyBlock, hd) + kKeyBlock scores
  const float mul = j.scale;
  for (int64_t l = l0; l < l1; l++) {
    const int64_t tok = b * j.L + l;
    for (int64_t r = 0; r < nr; r++)
      rope(j.qkv + tok * width + (g * j.rep + r0 + r) * hd, j.cos + tok * half, j.sin + tok * half, half, mul,
           q + ((l - l0) * nr + r) * hd);
  }
  // Every row scores every key in [lo, hi]: a row of an earlier token (or,
  // with a window, a later one) scores up to tokens - 1 keys it then ignores.
#if CAKE_ATT_AVX512
  const bool fused = hd % 16 == 0;  // see score_keys
#else
  const bool fused = false;
#endif
  const void* kraw = f32 ? (const void*)keys : (const void*)k16;  // position t's row at element t * hd
  const void* vraw = f32 ? (const void*)vals : (const void*)v16;
  if (fused) {
#if CAKE_ATT_AVX512
    if (j.kv_type == kF32)
      score_span<kF32>(q, rows, hd, kraw, lo, span, scores);
    else if (j.kv_type == kF16)
      score_span<kF16>(q, rows, hd, kraw, lo, span, scores);
    else
      score_span<kBF16>(q, rows, hd, kraw, lo, span, scores);
#endif
  } else {
    const int64_t row_bytes = hd * (f32 ? 4 : 2);
    int64_t t = lo;
    for (; t + kKeyBlock <= hi + 1; t += kKeyBlock) {
      const float* kb = keys + t * hd;
      if (t + kAheadRows <= hi)
        prefetch_bytes((const char*)kraw + (t + kAheadRows) * row_bytes, min64(kKeyBlock, hi + 1 - t - kAheadRows) * row_bytes);
      if (!f32) {
        widen(k16 + t * hd, wide.data(), kKeyBlock * hd, j.kv_type);
        kb = wide.data();
      }
      for (int64_t row = 0; row < rows; row++) dot_block(q + row * hd, kb, hd, scores + row * span + t - lo);
    }
    // The last keys go through dot_block too, reading only them: a key's score
    // is then the same bits whichever chunk reads it (a prompt fed in other
    // chunks, or a decode step, gives the tokens of a prompt fed at once).
    if (t <= hi) {
      const int64_t left = hi - t + 1;
      const float* kb = keys + t * hd;
      if (!f32) {
        widen(k16 + t * hd, tail, left * hd, j.kv_type);
        kb = tail;
      }
      float* got = tail + kKeyBlock * hd;
      for (int64_t row = 0; row < rows; row++) {
        dot_block(q + row * hd, kb, hd, got, left);
        memcpy(scores + row * span + t - lo, got, sizeof(float) * left);
      }
    }
  }
  // softmax weights, zero outside each row's own keys, then the value rows
  // once per kRowsAtOnce rows. Of a chunk: weights e^(s - the chunk's max),
  // with that max and their sum kept for the merge.
  float* part = whole ? nullptr : j.part + u * j.part_stride;  // (rows, hd + 2)
  float* scale = scores + rows * span;  // (rows,)
  for (int64_t row = 0; row < rows; row++) {
    const int64_t e0 = pos + l0 + row / nr, a0 = first_key(j, e0);
    const int64_t a = max64(a0, lo), e = min64(e0, hi);
    float* s = scores + row * span;
    if (a > e) {  // none of its keys in this chunk (only where the keys are in chunks)
      memset(s, 0, sizeof(float) * span);
      part[row * (hd + 2) + hd] = -INFINITY;
      part[row * (hd + 2) + hd + 1] = 0.0f;
      scale[row] = 1.0f;
      continue;
    }
    float* sr = s + (a - lo);
    const int64_t n = e - a + 1;
    // Gemma 2's soft-cap, as transformers computes it: (s / cap), tanh, * cap.
    // Scalar tanhf, n calls per row beside its n * hd multiply-adds: a decode
    // call at Gemma 2's shape (8 heads, 4 kv heads, hd 256) took 277 us against
    // 239 uncapped over 512 keys, 2199 against 1923 over 4000 (2 shared cores).
    if (j.softcap > 0.0f)
      for (int64_t i = 0; i < n; i++) sr[i] = tanhf(sr[i] / j.softcap) * j.softcap;
    const float m = max_of(sr, n);
    const float sum = exp_sum(sr, n, m);
    if (whole) {
      scale[row] = 1.0f / sum;
    } else {
      scale[row] = 1.0f;
      part[row * (hd + 2) + hd] = m;
      part[row * (hd + 2) + hd + 1] = sum;
    }
    if (a > lo) memset(s, 0, sizeof(float) * (a - lo));
    if (e < hi) memset(sr + n, 0, sizeof(float) * (hi - e));
  }
  const float* v = f32 ? vals + lo * hd : nullptr;
  for (int64_t row = 0; row < rows; row += kRowsAtOnce) {
    const int r = (int)min64(kRowsAtOnce, rows - row);
    float* outs[kRowsAtOnce];
    for (int i = 0; i < r; i++) {
      const int64_t l = l0 + (row + i) / nr, h = g * j.rep + r0 + (row + i) % nr;
      outs[i] = whole ? j.out + ((b * j.L + l) * j.nh + h) * hd : part + (row + i) * (hd + 2);
    }
    const float* p = scores + row * span;
    // Every row sums its values in the same order whatever the rows beside it
    // (the chunk-invariance above): no separate single-row sum. A 16-bit
    // cache's values come a block at a time, each block going on from the
    // sums so far (the same additions in the same order), unscaled but the last.
    if (fused) {
#if CAKE_ATT_AVX512
      if (j.kv_type == kF32)
        weigh_span<kF32>(p, span, span, vraw, lo, hd, scale + row, outs, r);
      else if (j.kv_type == kF16)
        weigh_span<kF16>(p, span, span, vraw, lo, hd, scale + row, outs, r);
      else
        weigh_span<kBF16>(p, span, span, vraw, lo, hd, scale + row, outs, r);
#endif
      continue;
    }
    float unit[kRowsAtOnce];
    for (int i = 0; i < kRowsAtOnce; i++) unit[i] = 1.0f;
    for (int64_t i0 = 0; i0 < span; i0 += f32 ? span : kValueBlock) {
      const int64_t nb = f32 ? span : min64(kValueBlock, span - i0);
      const float* vb = v;
      if (row == 0 && i0 + nb < span) {  // the next block (later rows find it cached)
        const int64_t row_bytes = hd * (f32 ? 4 : 2);
        prefetch_bytes((const char*)vraw + (lo + i0 + nb) * row_bytes, min64(kValueBlock, span - i0 - nb) * row_bytes);
      }
      if (!f32) {
        widen(v16 + (lo + i0) * hd, wide.data(), nb * hd, j.kv_type);
        vb = wide.data();
      }
      const float* sc = i0 + nb >= span ? scale + row : unit;
      const bool acc = i0 > 0;
      if (r == 1)
        weighted_rows<1>(p + i0, span, nb, vb, hd, sc, outs, acc);
      else if (r == 2)
        weighted_rows<2>(p + i0, span, nb, vb, hd, sc, outs, acc);
      else if (r == 3)
        weighted_rows<3>(p + i0, span, nb, vb, hd, sc, outs, acc);
      else
        weighted_rows<kRowsAtOnce>(p + i0, span, nb, vb, hd, sc, outs, acc);
    }
  }
  // the last of the group's chunks to finish merges them
  if (!whole && (*j.done)[gi].fetch_add(1, std::memory_order_acq_rel) == n_chunks - 1)
    merge_group(j, gi, b, g, l0, l1, r0, nr);
}

// Waits for the other threads' cache writes: a pause per check, and past a
// few thousand checks (a writer was preempted) the core goes to others.
inline void wait_for_writes(const Job& j) {
  for (int spins = 0; j.written.load(std::memory_order_acquire) < j.writes; spins++) {
    if (spins < 4096) {
#if defined(__x86_64__) || defined(_M_X64)
      _mm_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

// The new tokens' keys (rotated) and values of sequence b, kv head h, into the cache.
void write_unit(const Job& j, int64_t u, std::vector<float>& rotated) {
  const int64_t b = u / j.nkv, h = u % j.nkv;
  const int64_t hd = j.hd, half = hd / 2, width = (j.nh + 2 * j.nkv) * hd;
  const int64_t plane = j.S * j.nkv * j.T * hd, esize = j.kv_type == kF32 ? 4 : 2;
  if (rotated.size() < (size_t)hd) rotated.resize((size_t)hd);
  for (int64_t l = 0; l < j.lengths[b]; l++) {
    const int64_t tok = b * j.L + l, t = j.positions[b] + l;
    const int64_t at = ((j.layer * 2 * j.S + j.slots[b]) * j.nkv + h) * j.T * hd + t * hd;  // element
    rope(j.qkv + tok * width + (j.nh + h) * hd, j.cos + tok * half, j.sin + tok * half, half, 1.0f, rotated.data());
    store_row(rotated.data(), (char*)j.cache + at * esize, hd, j.kv_type);
    store_row(j.qkv + tok * width + (j.nh + j.nkv + h) * hd, (char*)j.cache + (at + plane) * esize, hd, j.kv_type);
  }
}

void work(void* p, int thread, int) {
  Job& j = *(Job*)p;
  thread_local std::vector<float> scratch, wide;
  int64_t b, e;
  if (j.n_tok == 1 && j.n_head == 1 && !j.chunked) {
    // Each unit is a whole (sequence, kv head), the only one that writes its
    // rows or reads them (unit u = write unit u), so it writes them and then
    // attends, with no wait for the other threads' writes. A decode step of 8
    // sequences on 2 threads, 20 positions (nh 9, nkv 3, hd 64), float16
    // cache cold, min / median of 1000 calls, 3 alternating processes each:
    // 9.4-9.8 / 9.9-10.0 -> 7.7-8.6 / 8.4-8.8 us a call (at 60 and 200
    // positions the same within noise).
    //
    // A thread's units are its part's, one after another (Counter), so the
    // next one's rows are asked for while this one runs: each unit's rows had
    // been evicted since the last step by the weights streamed through, and
    // its loads waited on memory one after another. The kernel alone (SmolLM2
    // shape, 8 sequences at 36 positions, 96 MB read between steps, medians
    // of 6 alternating processes) moved within this host's noise, 27.4 ->
    // 27.1 us a call; the whole step in benchmarks/bench_batch.py (4
    // alternating processes, medians), 8 sequences: Q3_K_M 4.81 -> 4.50 ms,
    // Q4_0 4.90 -> 4.23 ms (1 sequence 2.93 -> 2.81, 2.90 -> 2.65).
    while (j.next.take(thread, &b, &e)) {
      UnitAt a = unit_at(j, b);
      prefetch_unit(j, a);  // the first of a take: not asked for yet
      for (int64_t u = b; u < e; u++) {
        UnitAt next{};
        next.empty = true;
        if (u + 1 < j.units) prefetch_unit(j, next = unit_at(j, u + 1));
        write_unit(j, u, scratch);
        run_unit(j, u, a, scratch, wide);
        a = next;
      }
    }
    return;
  }
  for (;;) {
    const int64_t u = j.next_write.fetch_add(1);
    if (u >= j.writes) break;
    write_unit(j, u, scratch);
    j.written.fetch_add(1, std::memory_order_release);
  }
  wait_for_writes(j);
  while (j.next.take(thread, &b, &e))
    for (int64_t u = b; u < e; u++) {
      const UnitAt a = unit_at(j, u);
      prefetch_unit(j, a);
      run_unit(j, u, a, scratch, wide);
    }
}

}  // namespace

int cake_attention(const float* qkv, const float* cos, const float* sin, void* cache, int kv_type,
                   const int32_t* slots, const int32_t* positions, const int32_t* lengths,
                   int64_t B, int64_t L, int64_t nh, int64_t nkv, int64_t hd, int64_t n_layers,
                   int64_t S, int64_t T, int64_t layer, int64_t window, float scale, float softcap,
                   float* out) {
  if (B < 0 || L < 0 || nh <= 0 || nkv <= 0 || hd <= 0 || n_layers <= 0 || S <= 0 || T <= 0) return -1;
  if (nh % nkv != 0) return -2;
  if (hd % 2 != 0) return -3;
  if (layer < 0 || layer >= n_layers) return -4;
  if (window < 0) return -5;
  if (!(scale > 0.0f) || !isfinite(scale) || !(softcap >= 0.0f) || !isfinite(softcap)) return -9;
  if (kv_type != kF32 && kv_type != kF16 && kv_type != kBF16) return -10;
  if (B == 0 || L == 0) return 0;
  if (!qkv || !cos || !sin || !cache || !slots || !positions || !lengths || !out) return -1;
  int64_t macs = 0;  // scores and weighted sums, for the choice of threads
  for (int64_t b = 0; b < B; b++) {
    const int64_t len = lengths[b];
    if (len < 0 || len > L) return -6;
    if (len == 0) continue;
    if (slots[b] < 0 || slots[b] >= S) return -7;
    if (positions[b] < 0 || (int64_t)positions[b] + len > T) return -8;
    const int64_t last = positions[b] + len - 1;
    const int64_t first = positions[b];
    // sum over tokens of the keys each reads
    const int64_t keys = window > 0 ? len * min64(window, last + 1)  // at most
                                    : (first + 1 + last + 1) * len / 2;
    macs += keys * nh * hd * 2;
  }

  // zeros for the padding rows
  for (int64_t b = 0; b < B; b++)
    if (lengths[b] < L) memset(out + (b * L + lengths[b]) * nh * hd, 0, sizeof(float) * (L - lengths[b]) * nh * hd);

  // the cache writes (work), then attention in units of (sequence, kv head,
  // tokens, query heads)
  Job job;
  job.writes = B * nkv;
  job.qkv = qkv, job.cos = cos, job.sin = sin, job.cache = cache, job.kv_type = kv_type;
  job.slots = slots, job.positions = positions, job.lengths = lengths;
  job.L = L, job.nh = nh, job.nkv = nkv, job.hd = hd, job.S = S, job.T = T;
  job.layer = layer, job.window = window, job.out = out;
  job.scale = scale, job.softcap = softcap;
  job.rep = nh / nkv;
  const bool one = macs < kParallelMin;
  const int threads = one ? 1 : cake_num_threads();
  // tokens per unit: share key loads, while leaving ~4 units per thread
  job.tokens = 1;
  while (job.tokens < kMaxTokens && job.tokens < L &&
         B * nkv * ((L + 2 * job.tokens - 1) / (2 * job.tokens)) >= 4 * threads)
    job.tokens *= 2;
  job.n_tok = (L + job.tokens - 1) / job.tokens;
  // key chunks of (sequence, token block): the units before any split of the heads
  auto chunks = [&](int64_t b, int64_t tb) -> int64_t {
    const int64_t l0 = tb * job.tokens;
    if (l0 >= lengths[b]) return 1;  // nothing to do: one idle unit
    const int64_t lo = first_key(job, positions[b] + l0);
    return chunks_of(lo, positions[b] + min64(l0 + job.tokens, (int64_t)lengths[b]) - 1);
  };
  int64_t base = 0;
  for (int64_t b = 0; b < B; b++)
    for (int64_t tb = 0; tb < job.n_tok; tb++) base += nkv * chunks(b, tb);
  // query heads per unit: all of the kv head's, unless that leaves threads idle
  int64_t split = base >= 2 * threads ? 1 : (2 * threads + base - 1) / base;
  if (split > job.rep) split = job.rep;
  job.heads = (job.rep + split - 1) / split;
  job.n_head = (job.rep + job.heads - 1) / job.heads;
  const int64_t groups = B * nkv * job.n_tok * job.n_head;
  job.first_unit.resize(groups + 1);
  int64_t units = 0;
  for (int64_t i = 0; i < groups; i++) {
    const int64_t b = i / (nkv * job.n_tok * job.n_head), tb = i / job.n_head % job.n_tok;
    const int64_t n = chunks(b, tb);
    job.first_unit[i] = units;
    job.chunked = job.chunked || n > 1;
    units += n;
  }
  job.first_unit[groups] = units;
  job.units = units;
  job.next.split(units, threads, 1);
  // the chunks' parts, in the calling thread's buffer (the pool's workers write
  // into it through job.part)
  thread_local std::vector<float> parts;
  std::vector<std::atomic<int64_t>> done(job.chunked ? groups : 0);
  if (job.chunked) {
    job.part_stride = job.tokens * job.heads * (hd + 2);
    if (parts.size() < (size_t)(units * job.part_stride)) parts.resize((size_t)(units * job.part_stride));
    job.part = parts.data();
    for (auto& d : done) d.store(0, std::memory_order_relaxed);
    job.done = &done;
  }
  cake_parallel(work, &job, threads);
  return 0;
}

#if defined(CAKE_WITH_XLA_FFI)
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using F32_3 = ffi::Buffer<ffi::F32, 3>;
using S32_1 = ffi::Buffer<ffi::S32, 1>;

ffi::Error ffi_attention(F32_3 qkv, F32_3 cos, F32_3 sin, ffi::AnyBuffer cache, S32_1 slots, S32_1 positions,
                         S32_1 lengths, ffi::Result<F32_3> out, ffi::Result<ffi::AnyBuffer> cache_out,
                         int64_t layer, int64_t window, float scale, float softcap) {
  int kv_type;
  switch (cache.element_type()) {
    case ffi::DataType::F32:
      kv_type = kF32;
      break;
    case ffi::DataType::F16:
      kv_type = kF16;
      break;
    case ffi::DataType::BF16:
      kv_type = kBF16;
      break;
    default:
      return ffi::Error::InvalidArgument("cake attention: the cache must be float32, float16 or bfloat16");
  }
  if (cache.dimensions().size() != 6 || cache_out->dimensions().size() != 6 ||
      cache_out->element_type() != cache.element_type())
    return ffi::Error::InvalidArgument("cake attention: cache and cache_out must be 6-D, of one type");
  const auto qd = qkv.dimensions(), cd = cache.dimensions(), od = out->dimensions();
  const int64_t B = qd[0], L = qd[1], nkv = cd[3], T = cd[4], hd = cd[5];
  if (hd <= 0 || hd % 2 != 0 || qd[2] % hd != 0 || qd[2] / hd <= 2 * nkv)
    return ffi::Error::InvalidArgument("cake attention: qkv must be (B, L, (nh + 2 nkv) hd), hd even");
  const int64_t nh = qd[2] / hd - 2 * nkv;
  for (const F32_3* t : {&cos, &sin}) {
    const auto d = t->dimensions();
    if (d[0] != B || d[1] != L || d[2] != hd / 2)
      return ffi::Error::InvalidArgument("cake attention: cos and sin must be (B, L, hd / 2)");
  }
  for (const S32_1* t : {&slots, &positions, &lengths})
    if (t->dimensions()[0] != B) return ffi::Error::InvalidArgument("cake attention: slots, positions, lengths must be (B,)");
  if (od[0] != B || od[1] != L || od[2] != nh * hd)
    return ffi::Error::InvalidArgument("cake attention: out must be (B, L, nh hd)");
  const auto rd = cache_out->dimensions();
  for (int i = 0; i < 6; i++)
    if (rd[i] != cd[i]) return ffi::Error::InvalidArgument("cake attention: cache_out must have the cache's shape");
  void* kv = cache_out->untyped_data();
  // XLA aliases the result to the operand (input_output_aliases); should it not, start from a copy
  if ((const void*)kv != cache.untyped_data()) memcpy(kv, cache.untyped_data(), cache.size_bytes());
  const int rc = cake_attention(qkv.typed_data(), cos.typed_data(), sin.typed_data(), kv, kv_type, slots.typed_data(),
                                positions.typed_data(), lengths.typed_data(), B, L, nh, nkv, hd, cd[0], cd[2], T,
                                layer, window, scale, softcap, out->typed_data());
  switch (rc) {
    case 0:
      return ffi::Error::Success();
    case -2:
      return ffi::Error::InvalidArgument("cake attention: nh is not a multiple of nkv");
    case -4:
      return ffi::Error::InvalidArgument("cake attention: layer out of range");
    case -5:
      return ffi::Error::InvalidArgument("cake attention: window < 0");
    case -6:
      return ffi::Error::InvalidArgument("cake attention: a length is outside [0, L]");
    case -7:
      return ffi::Error::InvalidArgument("cake attention: a slot is out of range");
    case -8:
      return ffi::Error::InvalidArgument("cake attention: a token's position is past the cache (>= T) or negative");
    case -9:
      return ffi::Error::InvalidArgument("cake attention: scale must be positive, softcap >= 0 (both finite)");
    default:
      return ffi::Error::InvalidArgument("cake attention: bad arguments (code " + std::to_string(rc) + ")");
  }
}

}  // namespace

#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(cake_ffi_attention, ffi_attention,
                              ffi::Ffi::Bind()
                                  .Arg<F32_3>()  // qkv (B, L, (nh + 2 nkv) hd)
                                  .Arg<F32_3>()  // cos (B, L, hd / 2)
                                  .Arg<F32_3>()  // sin (B, L, hd / 2)
                                  .Arg<ffi::AnyBuffer>()  // cache (n_layers, 2, S, nkv, T, hd), f32/f16/bf16
                                  .Arg<S32_1>()  // slots (B,)
                                  .Arg<S32_1>()  // positions (B,)
                                  .Arg<S32_1>()  // lengths (B,)
                                  .Ret<F32_3>()  // out (B, L, nh hd)
                                  .Ret<ffi::AnyBuffer>()  // cache_out: aliases cache
                                  .Attr<int64_t>("layer")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap"));
#pragma GCC visibility pop
#endif
