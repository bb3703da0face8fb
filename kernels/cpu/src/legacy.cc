// Dot and dequantize kernels for the 32-element formats (Q4_0, Q4_1, Q5_0,
// Q5_1, Q8_0) against cake_q8_32 activations, for F16 / F32 against float32
// activations and BF16 against bfloat16 ones. Block layouts: gguf.quants
// (ggml-common.h).
//
// Every weight block (value_j = d * q_j + m) is decoded once and reused for
// all activation rows:
//   sum_j value_j * (dx * qx_j) = d * dx * sum_j q_j qx_j + m * (dx * sum_j qx_j)
// with (dx * sum qx) precomputed as cake_q8_32.s. One u8 x s8 product
// instruction (vpdpbusd, or vpmaddubsw + vpmaddwd) does a block, q kept
// unsigned (Q4_0: q - 8 -> q with m = -8 d; Q5_0: m = -16 d); Q8_0's signed
// weights are multiplied as |q| x sign(qx, q).
//
// Paths, picked at compile time: AVX2 + FMA + F16C (with AVX-512 VL/VNNI
// instructions on 256-bit registers where present; 512-bit for F16 / BF16 /
// F32),
// and plain C++ for any other machine (ARM included).
#include <math.h>
#include <string.h>

#include "qdot.h"
#include "simd.h"

namespace {

// Activation rows per pass over a weight row. Q4_0, 3072 x 576, one thread:
// 4 rows 0.84-1.06 ns per block and row, 8 rows 0.74-0.97, 12 rows 0.70-0.84,
// 16 rows 0.75-1.03 (noisy shared machine): 8 leaves AVX2's 16 registers room.
constexpr int kMaxRows = 8;

inline float load_f16(const uint8_t* p) {
  uint16_t h;
  memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return cake_f16_to_f32(h);
#endif
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}

inline const cake_q8_32* act_row(const void* x, size_t stride, int r) {
  return (const cake_q8_32*)((const char*)x + (size_t)r * stride);
}

// ---- block decoders --------------------------------------------------------
// scalar(): q_j as ints with value_j = d * q_j + m, the reference's form.
// simd() (AVX2): one block as 32 bytes q_j, d broadcast, and c: value_j =
// d * q_j + kMinScale * c with q_j unsigned (Q4_0: c = d, kMinScale = -8;
// Q4_1: c = m, kMinScale = 1), or signed for Q8_0 (no c).

#if CAKE_AVX2
inline __m256 bcast_f16(const uint8_t* p) {
  uint16_t h;
  memcpy(&h, p, 2);
  return _mm256_cvtph_ps(_mm_set1_epi16((short)h));
}

inline __m256i nibbles(const uint8_t* p) {  // 16 bytes -> 32 nibbles, low ones first
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)p));
  return _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0xf));
}

inline __m256i high_bits(uint32_t qh) {  // bit j of qh -> 0x10 in byte j
#if CAKE_AVX512
  return _mm256_maskz_mov_epi8((__mmask32)qh, _mm256_set1_epi8(0x10));
#else
  const __m256i bytes = _mm256_shuffle_epi8(
      _mm256_set1_epi32((int)qh),
      _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
  const __m256i bit = _mm256_set1_epi64x((int64_t)0x8040201008040201);
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit), _mm256_set1_epi8(0x10));
#endif
}
#endif


struct Q4_0 {
  static constexpr int kBytes = 18;
  static constexpr bool kSigned = false, kHasMin = false;
  static void scalar(const uint8_t* b, int q[32], float* d, float* m) {
    *d = load_f16(b);
    *m = 0.0f;
    for (int j = 0; j < 16; j++) {
      q[j] = (b[2 + j] & 0xf) - 8;
      q[j + 16] = (b[2 + j] >> 4) - 8;
    }
  }
#if CAKE_AVX2
  static constexpr float kMinScale = -8.0f;
  static __m256i simd(const uint8_t* b, __m256* d, float* c) {
    *d = bcast_f16(b);
    *c = _mm256_cvtss_f32(*d);
    return nibbles(b + 2);
  }
#endif
};

struct Q4_1 {
  static constexpr int kBytes = 20;
  static constexpr bool kSigned = false, kHasMin = true;
  static void scalar(const uint8_t* b, int q[32], float* d, float* m) {
    *d = load_f16(b);
    *m = load_f16(b + 2);
    for (int j = 0; j < 16; j++) {
      q[j] = b[4 + j] & 0xf;
      q[j + 16] = b[4 + j] >> 4;
    }
  }
#if CAKE_AVX2
  static constexpr float kMinScale = 1.0f;
  static __m256i simd(const uint8_t* b, __m256* d, float* c) {
    *d = bcast_f16(b);
    *c = load_f16(b + 2);
    return nibbles(b + 4);
  }
#endif
};

struct Q5_0 {
  static constexpr int kBytes = 22;
  static constexpr bool kSigned = false, kHasMin = false;
  static void scalar(const uint8_t* b, int q[32], float* d, float* m) {
    *d = load_f16(b);
    *m = 0.0f;
    const uint32_t qh = load_u32(b + 2);
    for (int j = 0; j < 16; j++) {
      q[j] = ((b[6 + j] & 0xf) | (((qh >> j) & 1) << 4)) - 16;
      q[j + 16] = ((b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16;
    }
  }
#if CAKE_AVX2
  static constexpr float kMinScale = -16.0f;
  static __m256i simd(const uint8_t* b, __m256* d, float* c) {
    *d = bcast_f16(b);
    *c = _mm256_cvtss_f32(*d);
    return _mm256_or_si256(nibbles(b + 6), high_bits(load_u32(b + 2)));
  }
#endif
};

struct Q5_1 {
  static constexpr int kBytes = 24;
  static constexpr bool kSigned = false, kHasMin = true;
  static void scalar(const uint8_t* b, int q[32], float* d, float* m) {
    *d = load_f16(b);
    *m = load_f16(b + 2);
    const uint32_t qh = load_u32(b + 4);
    for (int j = 0; j < 16; j++) {
      q[j] = (b[8 + j] & 0xf) | (((qh >> j) & 1) << 4);
      q[j + 16] = (b[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
    }
  }
#if CAKE_AVX2
  static constexpr float kMinScale = 1.0f;
  static __m256i simd(const uint8_t* b, __m256* d, float* c) {
    *d = bcast_f16(b);
    *c = load_f16(b + 2);
    return _mm256_or_si256(nibbles(b + 8), high_bits(load_u32(b + 4)));
  }
#endif
};

struct Q8_0 {
  static constexpr int kBytes = 34;
  static constexpr bool kSigned = true, kHasMin = false;
  static void scalar(const uint8_t* b, int q[32], float* d, float* m) {
    *d = load_f16(b);
    *m = 0.0f;
    for (int j = 0; j < 32; j++) q[j] = (int8_t)b[2 + j];
  }
#if CAKE_AVX2
  static constexpr float kMinScale = 0.0f;
  static __m256i simd(const uint8_t* b, __m256* d, float* c) {
    *d = bcast_f16(b);
    *c = 0.0f;
    return _mm256_loadu_si256((const __m256i*)(b + 2));
  }
#endif
};

// ---- dot: one weight row x NR activation rows --------------------------------

#if CAKE_AVX2
// sum of 4 adjacent u8 x s8 products per int32 lane
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Per block and row: a u8 x s8 product, a conversion, two multiplies and the
// min's FMA. Q4_0 3072 x 576 in L2, one Zen 4 thread: 1.3-1.5 ns per block at
// 1 row, 0.66-0.71 ns per block and row at 8. Every vector op counts (leaving
// out any one saved ~0.2 ns per block and row); 512-bit registers holding two
// blocks measured slower (1.05 against 0.82 ns: their ops issue in two
// halves). Below 4 rows, two blocks go to separate accumulators so that the
// FMA latency does not bind.
template <class F, int NR>
__attribute__((noinline)) void dot_rows(int64_t nb, const uint8_t* w, const void* x, size_t stride, float* out) {
  constexpr int U = NR < 4 ? 2 : 1;
  __m256 acc[U][NR];
  float bias[U][NR];
  const cake_q8_32* xr[NR];
  for (int r = 0; r < NR; r++) {
    xr[r] = act_row(x, stride, r);
    for (int u = 0; u < U; u++) {
      acc[u][r] = _mm256_setzero_ps();
      bias[u][r] = 0.0f;
    }
  }
  auto block = [&](int64_t b, int u) {
    __m256 vd;
    float c;
    const __m256i q = F::simd(w + b * F::kBytes, &vd, &c);
    const __m256i uq = F::kSigned ? _mm256_abs_epi8(q) : q;
    for (int r = 0; r < NR; r++) {
      const cake_q8_32* xb = xr[r] + b;
      __m256i xq = _mm256_loadu_si256((const __m256i*)xb->qs);
      if (F::kSigned) xq = _mm256_sign_epi8(xq, q);
      const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(uq, xq));
      acc[u][r] = _mm256_fmadd_ps(_mm256_mul_ps(p, vd), _mm256_set1_ps(xb->d), acc[u][r]);
      if (!F::kSigned) bias[u][r] = fmaf(c, xb->s, bias[u][r]);
    }
  };
  int64_t b = 0;
  for (; b + U <= nb; b += U)
    for (int u = 0; u < U; u++) block(b + u, u);
  for (; b < nb; b++) block(b, 0);
  for (int r = 0; r < NR; r++) {
    for (int u = 1; u < U; u++) {
      acc[0][r] = _mm256_add_ps(acc[0][r], acc[u][r]);
      bias[0][r] += bias[u][r];
    }
    out[r] = hsum(acc[0][r]) + F::kMinScale * bias[0][r];
  }
}
#else
template <class F, int NR>
void dot_rows(int64_t nb, const uint8_t* w, const void* x, size_t stride, float* out) {
  float acc[NR];
  const cake_q8_32* xr[NR];
  for (int r = 0; r < NR; r++) {
    acc[r] = 0.0f;
    xr[r] = act_row(x, stride, r);
  }
  int q[32];
  for (int64_t b = 0; b < nb; b++, w += F::kBytes) {
    float d, m;
    F::scalar(w, q, &d, &m);
    for (int r = 0; r < NR; r++) {
      const cake_q8_32* xb = xr[r] + b;
      int s = 0;
      for (int j = 0; j < 32; j++) s += q[j] * xb->qs[j];
      acc[r] += d * xb->d * (float)s + m * xb->s;
    }
  }
  for (int r = 0; r < NR; r++) out[r] = acc[r];
}
#endif

// Any nrows, in runs of at most kMaxRows: K<n>::run with n a compile-time
// constant, so that the accumulators stay in registers. The kernels are not
// inlined here, and the common nrows <= kMaxRows is a jump to one of them: at
// one row each call's fixed cost (~8 ns) is a third of a 576-wide Q4_0 row.
template <template <int> class K, class... A>
void by_rows(int nrows, const void* x, size_t stride, float* out, A... a) {
  for (; nrows > kMaxRows; nrows -= kMaxRows, out += kMaxRows) {
    K<kMaxRows>::run(a..., x, stride, out);
    x = (const char*)x + (size_t)kMaxRows * stride;
  }
  switch (nrows) {
    case 1: return K<1>::run(a..., x, stride, out);
    case 2: return K<2>::run(a..., x, stride, out);
    case 3: return K<3>::run(a..., x, stride, out);
    case 4: return K<4>::run(a..., x, stride, out);
    case 5: return K<5>::run(a..., x, stride, out);
    case 6: return K<6>::run(a..., x, stride, out);
    case 7: return K<7>::run(a..., x, stride, out);
    case 8: return K<8>::run(a..., x, stride, out);
    default: return;  // nrows <= 0
  }
}
static_assert(kMaxRows == 8, "by_rows lists the cases 1 ... 8");

template <class F>
struct QuantKernel {
  template <int NR>
  struct K {
    static void run(int64_t nb, const uint8_t* w, const void* x, size_t stride, float* out) {
      dot_rows<F, NR>(nb, w, x, stride, out);
    }
  };
};

template <class F>
void dot_quant(int64_t k, const void* w, const void* x, size_t stride, int nrows, float* out) {
  by_rows<QuantKernel<F>::template K>(nrows, x, stride, out, k / 32, (const uint8_t*)w);
}

// value_j = d * q_j (+ m): the reference's roundings, d * q then + m, which the
// build keeps apart (-ffp-contract=off).
template <class F>
void dequant_quant(int64_t k, const void* w, float* out) {
  const uint8_t* b = (const uint8_t*)w;
  for (int64_t i = 0; i < k / 32; i++, b += F::kBytes, out += 32) {
#if CAKE_AVX2
    __m256 vd;
    float c;
    const __m256i q = F::simd(b, &vd, &c);
    // the 32 bytes as ints minus the zero point (Q4_0: 8, Q5_0: 16)
    const __m256i zero = _mm256_set1_epi32(F::kHasMin || F::kSigned ? 0 : (int)-F::kMinScale);
    for (int j = 0; j < 4; j++) {
      const __m128i q8 = _mm_loadl_epi64((const __m128i*)((const char*)&q + 8 * j));
      const __m256i qi = F::kSigned ? _mm256_cvtepi8_epi32(q8) : _mm256_cvtepu8_epi32(q8);
      __m256 v = _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_sub_epi32(qi, zero)));
      if (F::kHasMin) v = _mm256_add_ps(v, _mm256_set1_ps(c));
      _mm256_storeu_ps(out + 8 * j, v);
    }
#else
    int q[32];
    float d, m;
    F::scalar(b, q, &d, &m);
    for (int j = 0; j < 32; j++) out[j] = F::kHasMin ? d * (float)q[j] + m : d * (float)q[j];
#endif
  }
}

// ---- F16 / BF16 / F32: widen the weight (F32: load it), FMA in float32 -----

struct F16 {
  using T = uint16_t;
  static float one(const uint16_t* w, int64_t i) { return cake_f16_to_f32(w[i]); }
#if CAKE_AVX512
  static __m512 widen16(const uint16_t* w) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)w)); }
  static __m512 widen16_masked(const uint16_t* w, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, w));
  }
#elif CAKE_AVX2
  static __m256 widen8(const uint16_t* w) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)w)); }
#endif
};

struct BF16 {
  using T = uint16_t;
  static float one(const uint16_t* w, int64_t i) {
    const uint32_t bits = (uint32_t)w[i] << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
  }
#if CAKE_AVX512
  static __m512 widen16(const uint16_t* w) {
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)w));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  }
  static __m512 widen16_masked(const uint16_t* w, __mmask16 m) {
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, w));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  }
#elif CAKE_AVX2
  static __m256 widen8(const uint16_t* w) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)w));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  }
#endif
};

// F32: F16's kernel without the widening (a float32 GGUF or safetensors matrix
// as stored, (N, K) rows); its rows are twice the bytes, so a decode step is
// bound by reading them even more than F16's.
struct F32 {
  using T = float;
  static float one(const float* w, int64_t i) { return w[i]; }
#if CAKE_AVX512
  static __m512 widen16(const float* w) { return _mm512_loadu_ps(w); }
  static __m512 widen16_masked(const float* w, __mmask16 m) { return _mm512_maskz_loadu_ps(m, w); }
#elif CAKE_AVX2
  static __m256 widen8(const float* w) { return _mm256_loadu_ps(w); }
#endif
};

#if CAKE_AVX512
// The sum of v's 16 lanes in a fixed tree, GCC's _mm512_reduce_add_ps's: lane
// j + lane j + 8, then j + j + 4, j + j + 2, j + j + 1. hsum16_many gives each
// of up to 16 vectors that same sum in four transposing steps for all of them
// (~45 instructions, not ~8 per vector), so a row's bits do not depend on the
// vectors reduced with it.
inline float hsum16(__m512 v) {
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));       // lanes 0 + 2, 1 + 3
  return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));  // 0 + 1
}

// out[i] = hsum16(v[i]) for i < n (v[n ...] zero).
inline void hsum16_many(const __m512 v[16], int n, float* out) {
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; i++)  // j + j + 8: v[2i] in 128-bit lanes 0-1, v[2i + 1] in 2-3
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xee));
  for (int i = 0; i < 4; i++)  // j + j + 4: 128-bit lane c holds v[4i + c]
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xdd));
  for (int i = 0; i < 2; i++)  // j + j + 2: lane c: v[8i + c] (2 values), v[8i + 4 + c]
    w[i] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0x44), _mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0xee));
  // j + j + 1: value 4c + j is v[4j + c]'s sum
  const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x88), _mm512_shuffle_ps(w[0], w[1], 0xdd));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  _mm512_mask_storeu_ps(out, (__mmask16)((1u << n) - 1u), _mm512_permutexvar_ps(order, s));
}
#endif

// The weight rows are read in order, one after another (a thread's block of
// rows), so a prefetch this far ahead of the read brings in the rows to come.
// The 8-row products are bound by their FMAs (51 GMAC/s on one Zen 4 core in
// cache), and without it the loads waited on memory on top: BF16 3072 x 576,
// 30 matrices, 2 threads, us: M = 8 284 -> 206, M = 1 97 -> 87.
constexpr size_t kFloatPrefetch = 8192;

template <class F, int NR>
void dot_float_rows(int64_t k, const typename F::T* w, const void* x, size_t stride, float* out) {
  const float* xr[NR];
  for (int r = 0; r < NR; r++) xr[r] = (const float*)((const char*)x + (size_t)r * stride);
  int64_t i = 0;
  float tail[NR];
  for (int r = 0; r < NR; r++) tail[r] = 0.0f;
#if CAKE_AVX512
  __m512 acc[NR];
  for (int r = 0; r < NR; r++) acc[r] = _mm512_setzero_ps();
  for (; i + 16 <= k; i += 16) {
    _mm_prefetch((const char*)(w + i) + kFloatPrefetch, _MM_HINT_T0);
    const __m512 wv = F::widen16(w + i);
    for (int r = 0; r < NR; r++) acc[r] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xr[r] + i), acc[r]);
  }
  if (i < k) {
    const __mmask16 m = (__mmask16)((1u << (k - i)) - 1);
    const __m512 wv = F::widen16_masked(w + i, m);
    for (int r = 0; r < NR; r++) acc[r] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, xr[r] + i), acc[r]);
    i = k;
  }
  for (int r = 0; r < NR; r++) tail[r] = hsum16(acc[r]);
#elif CAKE_AVX2
  __m256 acc[NR];
  for (int r = 0; r < NR; r++) acc[r] = _mm256_setzero_ps();
  for (; i + 8 <= k; i += 8) {
    _mm_prefetch((const char*)(w + i) + kFloatPrefetch, _MM_HINT_T0);
    const __m256 wv = F::widen8(w + i);
    for (int r = 0; r < NR; r++) acc[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xr[r] + i), acc[r]);
  }
  for (int r = 0; r < NR; r++) tail[r] = hsum(acc[r]);
#endif
  for (; i < k; i++) {
    const float wi = F::one(w, i);
    for (int r = 0; r < NR; r++) tail[r] = fmaf(wi, xr[r][i], tail[r]);
  }
  for (int r = 0; r < NR; r++) out[r] = tail[r];
}

// Weight rows w0 and w1 against the same NR rows, each x vector loaded once for
// both: 2 NR accumulators (AVX-512; elsewhere one row after the other). Each
// row's sums are dot_float_rows's, operation for operation, so a weight row's
// result does not depend on whether it was paired.
template <class F, int NR>
void dot2_float_rows(int64_t k, const typename F::T* w0, const typename F::T* w1, const void* x, size_t stride,
                     float* out) {
#if CAKE_AVX512
  const float* xr[NR];
  for (int r = 0; r < NR; r++) xr[r] = (const float*)((const char*)x + (size_t)r * stride);
  __m512 a0[NR], a1[NR];
  for (int r = 0; r < NR; r++) a0[r] = a1[r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    _mm_prefetch((const char*)(w0 + i) + kFloatPrefetch, _MM_HINT_T0);
    _mm_prefetch((const char*)(w1 + i) + kFloatPrefetch, _MM_HINT_T0);
    __m512 v0 = F::widen16(w0 + i), v1 = F::widen16(w1 + i);
    // each vector in a register for all its FMAs: GCC folds the loads into
    // them otherwise (the x rows' twice, or the weights' NR times; in L2, 1
    // thread, M = 8: 42 -> 78-80 GMAC/s)
    __asm__("" : "+v"(v0), "+v"(v1));
    for (int r = 0; r < NR; r++) {
      __m512 xv = _mm512_loadu_ps(xr[r] + i);
      __asm__("" : "+v"(xv));
      a0[r] = _mm512_fmadd_ps(v0, xv, a0[r]);
      a1[r] = _mm512_fmadd_ps(v1, xv, a1[r]);
    }
  }
  if (i < k) {
    const __mmask16 m = (__mmask16)((1u << (k - i)) - 1);
    const __m512 v0 = F::widen16_masked(w0 + i, m), v1 = F::widen16_masked(w1 + i, m);
    for (int r = 0; r < NR; r++) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, xr[r] + i);
      a0[r] = _mm512_fmadd_ps(v0, xv, a0[r]);
      a1[r] = _mm512_fmadd_ps(v1, xv, a1[r]);
    }
  }
  __m512 v[16];
  for (int r = 0; r < NR; r++) v[r] = a0[r], v[NR + r] = a1[r];
  for (int r = 2 * NR; r < 16; r++) v[r] = _mm512_setzero_ps();
  hsum16_many(v, 2 * NR, out);
#else
  dot_float_rows<F, NR>(k, w0, x, stride, out);
  dot_float_rows<F, NR>(k, w1, x, stride, out + NR);
#endif
}

// BF16: bfloat16 weights against bfloat16 activations (cake_round_bf16), each
// product exact in float32. With AVX-512 BF16 one vdpbf16ps does 32 of them
// (two per lane, added to the lane's sum in turn); elsewhere both sides are
// widened and multiplied as F16's rows. 8 rows at once were bound by their
// float32 FMAs (51 GMAC/s a Zen 4 core): a batch of 8 cost 2.3x one row.
template <int NR>
void dot_bf16_rows(int64_t k, const uint16_t* w, const void* x, size_t stride, float* out) {
  const uint16_t* xr[NR];
  for (int r = 0; r < NR; r++) xr[r] = (const uint16_t*)((const char*)x + (size_t)r * stride);
  int64_t i = 0;
  float tail[NR];
  for (int r = 0; r < NR; r++) tail[r] = 0.0f;
#if CAKE_AVX512 && defined(__AVX512BF16__)
  __m512 acc[NR];
  for (int r = 0; r < NR; r++) acc[r] = _mm512_setzero_ps();
  for (; i + 32 <= k; i += 32) {
    _mm_prefetch((const char*)(w + i) + kFloatPrefetch, _MM_HINT_T0);
    const __m512bh wv = (__m512bh)_mm512_loadu_si512((const void*)(w + i));
    for (int r = 0; r < NR; r++)
      acc[r] = _mm512_dpbf16_ps(acc[r], wv, (__m512bh)_mm512_loadu_si512((const void*)(xr[r] + i)));
  }
  if (i < k) {
    const __mmask32 m = (__mmask32)((k - i) >= 32 ? 0xffffffffu : ((1u << (k - i)) - 1u));
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, w + i);
    for (int r = 0; r < NR; r++)
      acc[r] = _mm512_dpbf16_ps(acc[r], wv, (__m512bh)_mm512_maskz_loadu_epi16(m, xr[r] + i));
    i = k;
  }
  for (int r = 0; r < NR; r++) tail[r] = _mm512_reduce_add_ps(acc[r]);
#elif CAKE_AVX512
  __m512 acc[NR];
  for (int r = 0; r < NR; r++) acc[r] = _mm512_setzero_ps();
  for (; i + 16 <= k; i += 16) {
    _mm_prefetch((const char*)(w + i) + kFloatPrefetch, _MM_HINT_T0);
    const __m512 wv = BF16::widen16(w + i);
    for (int r = 0; r < NR; r++) acc[r] = _mm512_fmadd_ps(wv, BF16::widen16(xr[r] + i), acc[r]);
  }
  for (int r = 0; r < NR; r++) tail[r] = _mm512_reduce_add_ps(acc[r]);
#elif CAKE_AVX2
  __m256 acc[NR];
  for (int r = 0; r < NR; r++) acc[r] = _mm256_setzero_ps();
  for (; i + 8 <= k; i += 8) {
    _mm_prefetch((const char*)(w + i) + kFloatPrefetch, _MM_HINT_T0);
    const __m256 wv = BF16::widen8(w + i);
    for (int r = 0; r < NR; r++) acc[r] = _mm256_fmadd_ps(wv, BF16::widen8(xr[r] + i), acc[r]);
  }
  for (int r = 0; r < NR; r++) tail[r] = hsum(acc[r]);
#endif
  for (; i < k; i++) {
    const float wi = BF16::one(w, i);
    for (int r = 0; r < NR; r++) tail[r] = fmaf(wi, BF16::one(xr[r], i), tail[r]);
  }
  for (int r = 0; r < NR; r++) out[r] = tail[r];
}

// Weight rows w0 and w1 (dot2): 2 NR accumulators, each activation vector
// loaded once for both rows (AVX-512 BF16; elsewhere one row after the other).
template <int NR>
void dot2_bf16_rows(int64_t k, const uint16_t* w0, const uint16_t* w1, const void* x, size_t stride,
                    float* out) {
#if CAKE_AVX512 && defined(__AVX512BF16__)
  const uint16_t* xr[NR];
  for (int r = 0; r < NR; r++) xr[r] = (const uint16_t*)((const char*)x + (size_t)r * stride);
  __m512 a0[NR], a1[NR];
  for (int r = 0; r < NR; r++) a0[r] = a1[r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    _mm_prefetch((const char*)(w0 + i) + kFloatPrefetch, _MM_HINT_T0);
    _mm_prefetch((const char*)(w1 + i) + kFloatPrefetch, _MM_HINT_T0);
    const __m512bh v0 = (__m512bh)_mm512_loadu_si512((const void*)(w0 + i));
    const __m512bh v1 = (__m512bh)_mm512_loadu_si512((const void*)(w1 + i));
    for (int r = 0; r < NR; r++) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void*)(xr[r] + i));
      a0[r] = _mm512_dpbf16_ps(a0[r], v0, xv);
      a1[r] = _mm512_dpbf16_ps(a1[r], v1, xv);
    }
  }
  if (i < k) {
    const __mmask32 m = (__mmask32)((1u << (k - i)) - 1u);
    const __m512bh v0 = (__m512bh)_mm512_maskz_loadu_epi16(m, w0 + i);
    const __m512bh v1 = (__m512bh)_mm512_maskz_loadu_epi16(m, w1 + i);
    for (int r = 0; r < NR; r++) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, xr[r] + i);
      a0[r] = _mm512_dpbf16_ps(a0[r], v0, xv);
      a1[r] = _mm512_dpbf16_ps(a1[r], v1, xv);
    }
  }
  for (int r = 0; r < NR; r++) {
    out[r] = _mm512_reduce_add_ps(a0[r]);
    out[NR + r] = _mm512_reduce_add_ps(a1[r]);
  }
#else
  dot_bf16_rows<NR>(k, w0, x, stride, out);
  dot_bf16_rows<NR>(k, w1, x, stride, out + NR);
#endif
}

template <int NR>
struct BF16Kernel {
  static void run(int64_t k, const uint16_t* w, const void* x, size_t stride, float* out) {
    dot_bf16_rows<NR>(k, w, x, stride, out);
  }
};

template <class F>
struct FloatKernel {
  template <int NR>
  struct K {
    static void run(int64_t k, const typename F::T* w, const void* x, size_t stride, float* out) {
      dot_float_rows<F, NR>(k, w, x, stride, out);
    }
  };
};

template <class F>
void dot_float(int64_t k, const void* w, const void* x, size_t stride, int nrows, float* out) {
  by_rows<FloatKernel<F>::template K>(nrows, x, stride, out, k, (const typename F::T*)w);
}

}  // namespace

void cake_dot_q4_0(int64_t k, const void* w, const void* x, size_t s, int n, float* out) { dot_quant<Q4_0>(k, w, x, s, n, out); }
void cake_dot_q4_1(int64_t k, const void* w, const void* x, size_t s, int n, float* out) { dot_quant<Q4_1>(k, w, x, s, n, out); }
void cake_dot_q5_0(int64_t k, const void* w, const void* x, size_t s, int n, float* out) { dot_quant<Q5_0>(k, w, x, s, n, out); }
void cake_dot_q5_1(int64_t k, const void* w, const void* x, size_t s, int n, float* out) { dot_quant<Q5_1>(k, w, x, s, n, out); }
void cake_dot_q8_0(int64_t k, const void* w, const void* x, size_t s, int n, float* out) { dot_quant<Q8_0>(k, w, x, s, n, out); }
void cake_dot_f16(int64_t k, const void* w, const void* x, size_t s, int n, float* out) { dot_float<F16>(k, w, x, s, n, out); }
void cake_dot_f32(int64_t k, const void* w, const void* x, size_t s, int n, float* out) { dot_float<F32>(k, w, x, s, n, out); }
void cake_dot_bf16(int64_t k, const void* w, const void* x, size_t s, int n, float* out) {
  by_rows<BF16Kernel>(n, x, s, out, k, (const uint16_t*)w);
}

void cake_dot2_bf16(int64_t k, const void* w, size_t ws, const void* x, size_t s, int n, float* out) {
  const uint16_t* w0 = (const uint16_t*)w;
  const uint16_t* w1 = (const uint16_t*)((const char*)w + ws);
  switch (n) {  // n <= kMaxRows: the driver's tiles
    case 1: return dot2_bf16_rows<1>(k, w0, w1, x, s, out);
    case 2: return dot2_bf16_rows<2>(k, w0, w1, x, s, out);
    case 3: return dot2_bf16_rows<3>(k, w0, w1, x, s, out);
    case 4: return dot2_bf16_rows<4>(k, w0, w1, x, s, out);
    case 5: return dot2_bf16_rows<5>(k, w0, w1, x, s, out);
    case 6: return dot2_bf16_rows<6>(k, w0, w1, x, s, out);
    case 7: return dot2_bf16_rows<7>(k, w0, w1, x, s, out);
    case 8: return dot2_bf16_rows<8>(k, w0, w1, x, s, out);
    default: {  // more rows than a tile: one row after the other
      cake_dot_bf16(k, w0, x, s, n, out);
      cake_dot_bf16(k, w1, x, s, n, out + n);
    }
  }
}

void cake_dot2_f32(int64_t k, const void* w, size_t ws, const void* x, size_t s, int n, float* out) {
  const float* w0 = (const float*)w;
  const float* w1 = (const float*)((const char*)w + ws);
  switch (n) {  // n <= kMaxRows: the driver's tiles
    case 1: return dot2_float_rows<F32, 1>(k, w0, w1, x, s, out);
    case 2: return dot2_float_rows<F32, 2>(k, w0, w1, x, s, out);
    case 3: return dot2_float_rows<F32, 3>(k, w0, w1, x, s, out);
    case 4: return dot2_float_rows<F32, 4>(k, w0, w1, x, s, out);
    case 5: return dot2_float_rows<F32, 5>(k, w0, w1, x, s, out);
    case 6: return dot2_float_rows<F32, 6>(k, w0, w1, x, s, out);
    case 7: return dot2_float_rows<F32, 7>(k, w0, w1, x, s, out);
    case 8: return dot2_float_rows<F32, 8>(k, w0, w1, x, s, out);
    default: {  // more rows than a tile: one row after the other
      cake_dot_f32(k, w0, x, s, n, out);
      cake_dot_f32(k, w1, x, s, n, out + n);
    }
  }
}

void cake_dequant_q4_0(int64_t k, const void* w, float* out) { dequant_quant<Q4_0>(k, w, out); }
void cake_dequant_q4_1(int64_t k, const void* w, float* out) { dequant_quant<Q4_1>(k, w, out); }
void cake_dequant_q5_0(int64_t k, const void* w, float* out) { dequant_quant<Q5_0>(k, w, out); }
void cake_dequant_q5_1(int64_t k, const void* w, float* out) { dequant_quant<Q5_1>(k, w, out); }
void cake_dequant_q8_0(int64_t k, const void* w, float* out) { dequant_quant<Q8_0>(k, w, out); }

void cake_dequant_f16(int64_t k, const void* w, float* out) {
  const uint16_t* h = (const uint16_t*)w;
  int64_t i = 0;
#if CAKE_AVX2
  for (; i + 8 <= k; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + i))));
#endif
  for (; i < k; i++) out[i] = cake_f16_to_f32(h[i]);
}

void cake_dequant_f32(int64_t k, const void* w, float* out) { memcpy(out, w, (size_t)k * sizeof(float)); }

void cake_dequant_bf16(int64_t k, const void* w, float* out) {
  const uint16_t* h = (const uint16_t*)w;
  uint32_t* o = (uint32_t*)out;
  for (int64_t i = 0; i < k; i++) o[i] = (uint32_t)h[i] << 16;
}
