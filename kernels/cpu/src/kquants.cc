// K-quant dot and dequantize kernels (Q2_K ... Q6_K, super-blocks of 256).
//
// Every dot decodes a weight super-block once into unsigned quants u (256
// bytes, element order), per-16 scales s and per-16 min/bias multipliers m,
// then for each activation row computes
//   dA * sum_j s_j * (u_j . q_j) - dB * sum_j m_j * bsum_j
// times the row's d: the integer part is pure u8 x s8 products, and the mins
// (Q2_K, Q4_K, Q5_K, dB = dmin) and the -4 / -32 offsets (Q3_K, Q6_K, dB = d,
// m_j = offset * s_j) come from the activation bsums.
// Three paths: AVX-512 VNNI (u8 x s8 -> vpdpbusd, scales by vpdpwssd), AVX2
// (vpmaddubsw, scales by vpmaddwd) and portable scalar code.
#include <string.h>

#include "qdot.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__)
#define CAKE_KQ_AVX512 1
#elif defined(__AVX2__)
#define CAKE_KQ_AVX2 1
#endif
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

// The decoders and rows must inline into the unrolled row loops: GCC otherwise
// calls decode per block and passes the registers through the stack.
#if defined(__GNUC__)
#define KQ_INLINE inline __attribute__((always_inline))
#define KQ_NOINLINE __attribute__((noinline))
#else
#define KQ_INLINE inline
#define KQ_NOINLINE
#endif

namespace {

constexpr int kQK = 256;
// Activation rows per pass over the weight row (the driver's tile is 8); more
// rows decode each block once per 8.
constexpr int kMaxRows = 8;

// The GGUF block layouts (ggml-common.h), bytes only: rows may start anywhere.
struct BlockQ2K {
  uint8_t scales[16];  // low nibble scale, high nibble min, per 16
  uint8_t qs[64];      // 2-bit quants
  uint8_t d[2], dmin[2];
};
struct BlockQ3K {
  uint8_t hmask[32];   // high bit of each 3-bit quant
  uint8_t qs[64];      // low 2 bits
  uint8_t scales[12];  // 16 6-bit scales, biased by 32
  uint8_t d[2];
};
struct BlockQ4K {
  uint8_t d[2], dmin[2];
  uint8_t scales[12];  // 8 6-bit scales and 8 6-bit mins, per 32
  uint8_t qs[128];
};
struct BlockQ5K {
  uint8_t d[2], dmin[2];
  uint8_t scales[12];
  uint8_t qh[32];  // fifth bit
  uint8_t qs[128];
};
struct BlockQ6K {
  uint8_t ql[128];  // low 4 bits
  uint8_t qh[64];   // high 2 bits
  int8_t scales[16];
  uint8_t d[2];
};
static_assert(sizeof(BlockQ2K) == 84 && sizeof(BlockQ3K) == 110, "layout");
static_assert(sizeof(BlockQ4K) == 144 && sizeof(BlockQ5K) == 176, "layout");
static_assert(sizeof(BlockQ6K) == 210 && sizeof(cake_q8_256) == 292, "layout");

inline float f16(const uint8_t* p) {
  uint16_t h;
  memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    exp = 113;
    while (!(man & 0x400)) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
#endif
}

inline uint32_t load32(const uint8_t* p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}

// The 12-byte 6-bit packings, unpacked four bytes at a time: w[i] holds bytes
// 4i..4i+3 of the result (little endian). The SIMD paths build vectors from w
// in registers; a 16-byte load of bytes just stored as words would stall.
// Q4_K/Q5_K: bytes 0..7 the scales, 8..15 the mins, per 32 elements.
inline void unpack_q4k_scales(const uint8_t* p, uint32_t w[4]) {
  const uint32_t a = load32(p), b = load32(p + 4), c = load32(p + 8);
  w[0] = a & 0x3F3F3F3Fu;
  w[1] = (c & 0x0F0F0F0Fu) | ((a >> 2) & 0x30303030u);
  w[2] = b & 0x3F3F3F3Fu;
  w[3] = ((c >> 4) & 0x0F0F0F0Fu) | ((b >> 2) & 0x30303030u);
}

// Q3_K: 16 6-bit scales per 16 elements, stored + 32 (the caller subtracts it).
inline void unpack_q3k_scales(const uint8_t* p, uint32_t w[4]) {
  const uint32_t a = load32(p), b = load32(p + 4), c = load32(p + 8);
  const uint32_t lo = 0x0F0F0F0Fu, hi = 0x03030303u;
  w[0] = (a & lo) | ((c & hi) << 4);
  w[1] = (b & lo) | (((c >> 2) & hi) << 4);
  w[2] = ((a >> 4) & lo) | (((c >> 4) & hi) << 4);
  w[3] = ((b >> 4) & lo) | (((c >> 6) & hi) << 4);
}

// ---------------------------------------------------------------------------
// Portable decode: what the dequantizers use, and the scalar dot.

struct Decoded {
  uint8_t q[kQK];  // unsigned quants in element order
  int8_t s[16];    // scale per 16 elements
  int16_t m[16];   // min (or offset * scale) per 16 elements
  float dA, dB;    // value = dA * s * q - dB * m
};

// 2-bit fields: element h*128 + j*32 + l is bits 2j of byte h*32 + l.
inline void unpack_2bit(const uint8_t* qs, uint8_t* q) {
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 32; ++l)
        q[h * 128 + j * 32 + l] = (qs[h * 32 + l] >> (2 * j)) & 3;
}

// 4-bit fields: element c*64 + t*32 + l is nibble t of byte c*32 + l.
inline void unpack_4bit(const uint8_t* qs, uint8_t* q) {
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < 32; ++l) {
      q[c * 64 + l] = qs[c * 32 + l] & 0x0F;
      q[c * 64 + 32 + l] = qs[c * 32 + l] >> 4;
    }
}

// One bit per element: element j*32 + l is bit j of byte l, worth `value`.
inline void add_bitplane(const uint8_t* bits, uint8_t value, uint8_t* q) {
  for (int j = 0; j < 8; ++j)
    for (int l = 0; l < 32; ++l)
      q[j * 32 + l] |= (uint8_t)(((bits[l] >> j) & 1) * value);
}

void decode(const BlockQ2K* b, Decoded& o) {
  unpack_2bit(b->qs, o.q);
  for (int i = 0; i < 16; ++i) {
    o.s[i] = (int8_t)(b->scales[i] & 0x0F);
    o.m[i] = b->scales[i] >> 4;
  }
  o.dA = f16(b->d);
  o.dB = f16(b->dmin);
}

void decode(const BlockQ3K* b, Decoded& o) {
  unpack_2bit(b->qs, o.q);
  add_bitplane(b->hmask, 4, o.q);
  uint32_t w[4];
  unpack_q3k_scales(b->scales, w);
  uint8_t sc[16];
  memcpy(sc, w, 16);
  for (int i = 0; i < 16; ++i) {
    o.s[i] = (int8_t)(sc[i] - 32);
    o.m[i] = (int16_t)(4 * o.s[i]);
  }
  o.dA = o.dB = f16(b->d);
}

inline void decode_q45_scales(const uint8_t* p, Decoded& o) {
  uint32_t w[4];
  unpack_q4k_scales(p, w);
  uint8_t sm[16];
  memcpy(sm, w, 16);
  for (int i = 0; i < 16; ++i) {
    o.s[i] = (int8_t)sm[i / 2];
    o.m[i] = sm[8 + i / 2];
  }
}

void decode(const BlockQ4K* b, Decoded& o) {
  unpack_4bit(b->qs, o.q);
  decode_q45_scales(b->scales, o);
  o.dA = f16(b->d);
  o.dB = f16(b->dmin);
}

void decode(const BlockQ5K* b, Decoded& o) {
  unpack_4bit(b->qs, o.q);
  add_bitplane(b->qh, 16, o.q);
  decode_q45_scales(b->scales, o);
  o.dA = f16(b->d);
  o.dB = f16(b->dmin);
}

void decode(const BlockQ6K* b, Decoded& o) {
  // Element h*128 + 32j + l: nibble j/2 of ql[h*64 + 32(j%2) + l], 2 bits j of
  // qh[h*32 + l].
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 32; ++l) {
        const int lo = (b->ql[h * 64 + 32 * (j % 2) + l] >> (4 * (j / 2))) & 0x0F;
        const int hi = (b->qh[h * 32 + l] >> (2 * j)) & 3;
        o.q[h * 128 + 32 * j + l] = (uint8_t)(lo | (hi << 4));
      }
  for (int i = 0; i < 16; ++i) {
    o.s[i] = b->scales[i];
    o.m[i] = (int16_t)(32 * b->scales[i]);
  }
  o.dA = o.dB = f16(b->d);
}

#if defined(__clang__)
#pragma clang fp contract(off)  // match NumPy's separate multiply and subtract
#endif
// Not inlined into dequant: GCC 12.2 at -O2 inlined decode(BlockQ4K) there and
// then dropped the whole cake_dequant_q4_k call (IPA modref took it as pure).
template <class B>
KQ_NOINLINE void decode_outline(const B* b, Decoded& o) {
  decode(b, o);
}

// kOff: the offset the quants carry (Q3_K 4, Q6_K 32; then there is no min).
template <class B, int kOff>
void dequant(int64_t k, const void* w, float* out) {
  const B* blocks = (const B*)w;
  for (int64_t ib = 0; ib < k / kQK; ++ib) {
    Decoded d;
    decode_outline(blocks + ib, d);
    float* y = out + ib * kQK;
    for (int g = 0; g < 16; ++g) {
      // gguf.quants: (d * scale) * q - (dmin * min), each product in float32.
      const float dl = d.dA * (float)d.s[g];
      const float ml = kOff ? 0.0f : d.dB * (float)d.m[g];
      for (int i = 0; i < 16; ++i) {
        const float t = dl * (float)((int)d.q[g * 16 + i] - kOff);
        y[g * 16 + i] = t - ml;
      }
    }
  }
}

// ---------------------------------------------------------------------------
#if CAKE_KQ_AVX512 || CAKE_KQ_AVX2
// Both SIMD paths end a row on 256 bits (Zen 4 splits 512-bit operations in
// two): 8 int32 partial sums s, 8 min / bias sums m.
using Acc = __m256;
KQ_INLINE Acc acc_zero() { return _mm256_setzero_ps(); }
KQ_INLINE float acc_sum(Acc a) {
  __m128 v = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  v = _mm_add_ss(v, _mm_movehdup_ps(v));
  return _mm_cvtss_f32(v);
}
KQ_INLINE __m256 fmadd(__m256 a, __m256 b, __m256 c) {
#if defined(__FMA__)
  return _mm256_fmadd_ps(a, b, c);
#else
  return _mm256_add_ps(_mm256_mul_ps(a, b), c);
#endif
}

// acc + d * (dA * s - dB * m), vA = dA and vB = -dB broadcast; kFold: dB == dA,
// the bias is subtracted in integers.
template <bool kFold>
KQ_INLINE Acc finish(__m256i s, __m256i m, __m256 vA, __m256 vB, float d, Acc acc) {
  const __m256 dx = _mm256_set1_ps(d);
  if (kFold) return fmadd(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(s, m)), vA), dx, acc);
  const __m256 t = fmadd(_mm256_cvtepi32_ps(m), vB, _mm256_mul_ps(_mm256_cvtepi32_ps(s), vA));
  return fmadd(t, dx, acc);
}
#endif

#if CAKE_KQ_AVX512
// One block in registers: q[c] holds elements 64c..64c+63. A row's vpdpbusd
// sums of 4 (|4 * 63 * 127| < 32768) are packed to int16 two registers at a
// time, and sc[k] holds the scale of each packed sum, for vpdpwssd; mb the 16
// min multipliers, vA and vB the broadcast dA and -dB.
struct Blk {
  __m512i q[4];
  __m512i sc[2];
  __m256i mb;
  __m256 vA, vB;
};

KQ_INLINE __m512i bcast32(const uint8_t* p) {
  return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)p));
}
KQ_INLINE __m512i m8(int v) { return _mm512_set1_epi8((char)v); }

// s8: the 16 per-16 scales as signed bytes. In vpdpbusd's sums of q[c], 128-bit
// lane i is group 4c + i; vpackssdw(q[2k] sums, q[2k+1] sums) puts int16 t in
// lane t/8 of the one (t % 8 < 4) or the other: group 8k + 4 (t % 8 / 4) + t / 8.
KQ_INLINE void set_scales(__m128i s8, Blk& o) {
  const __m512i s16 = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(s8));
  alignas(64) int16_t idx[2][32];
  for (int k = 0; k < 2; ++k)
    for (int t = 0; t < 32; ++t) idx[k][t] = (int16_t)(8 * k + 4 * (t % 8 / 4) + t / 8);
  for (int k = 0; k < 2; ++k)
    o.sc[k] = _mm512_permutexvar_epi16(_mm512_load_si512(idx[k]), s16);
}

// 2-bit fields into q[0..3]: lanes 0..31 of q[c] are bits 4(c%2) of the 32
// bytes at 32(c/2), lanes 32..63 bits 4(c%2) + 2.
KQ_INLINE void unpack_2bit(const uint8_t* qs, Blk& o) {
  for (int h = 0; h < 2; ++h) {
    const __m512i v = bcast32(qs + 32 * h);
    o.q[2 * h] =
        _mm512_and_si512(_mm512_srlv_epi64(v, _mm512_setr_epi64(0, 0, 0, 0, 2, 2, 2, 2)), m8(3));
    o.q[2 * h + 1] =
        _mm512_and_si512(_mm512_srlv_epi64(v, _mm512_setr_epi64(4, 4, 4, 4, 6, 6, 6, 6)), m8(3));
  }
}

KQ_INLINE void unpack_4bit(const uint8_t* qs, Blk& o) {
  const __m512i sh = _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4);
  for (int c = 0; c < 4; ++c)
    o.q[c] = _mm512_and_si512(_mm512_srlv_epi64(bcast32(qs + 32 * c), sh), m8(0x0F));
}

// Bit j of byte l (element 32j + l) adds `value`: q[c] takes planes 2c, 2c+1.
KQ_INLINE void add_bitplane(const uint8_t* bits, int value, Blk& o) {
  const __m512i h = bcast32(bits);
  for (int c = 0; c < 4; ++c) {
    const __m512i plane = _mm512_inserti64x4(
        _mm512_set1_epi8((char)(1 << (2 * c))), _mm256_set1_epi8((char)(1 << (2 * c + 1))), 1);
    o.q[c] = _mm512_mask_add_epi8(o.q[c], _mm512_test_epi8_mask(h, plane), o.q[c], m8(value));
  }
}

KQ_INLINE void decode(const BlockQ2K* b, Blk& o) {
  unpack_2bit(b->qs, o);
  const __m128i v = _mm_loadu_si128((const __m128i*)b->scales);
  const __m128i s = _mm_and_si128(v, _mm_set1_epi8(0x0F));
  set_scales(s, o);
  o.mb = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0F)));
  o.vA = _mm256_set1_ps(f16(b->d));
  o.vB = _mm256_set1_ps(-f16(b->dmin));
}

KQ_INLINE void decode(const BlockQ3K* b, Blk& o) {
  unpack_2bit(b->qs, o);
  add_bitplane(b->hmask, 4, o);
  uint32_t w[4];
  unpack_q3k_scales(b->scales, w);
  const __m128i s = _mm_sub_epi8(_mm_setr_epi32((int)w[0], (int)w[1], (int)w[2], (int)w[3]),
                                 _mm_set1_epi8(32));
  set_scales(s, o);
  o.mb = _mm256_slli_epi16(_mm256_cvtepi8_epi16(s), 2);
  o.vA = _mm256_set1_ps(f16(b->d));
}

KQ_INLINE void q45_scales(const uint8_t* p, Blk& o) {
  uint32_t w[4];
  unpack_q4k_scales(p, w);
  const __m128i v = _mm_setr_epi32((int)w[0], (int)w[1], (int)w[2], (int)w[3]);
  const __m128i dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  set_scales(_mm_shuffle_epi8(v, dup), o);
  o.mb = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(v, _mm_add_epi8(dup, _mm_set1_epi8(8))));
}

KQ_INLINE void decode(const BlockQ4K* b, Blk& o) {
  unpack_4bit(b->qs, o);
  q45_scales(b->scales, o);
  o.vA = _mm256_set1_ps(f16(b->d));
  o.vB = _mm256_set1_ps(-f16(b->dmin));
}

KQ_INLINE void decode(const BlockQ5K* b, Blk& o) {
  unpack_4bit(b->qs, o);
  add_bitplane(b->qh, 16, o);
  q45_scales(b->scales, o);
  o.vA = _mm256_set1_ps(f16(b->d));
  o.vB = _mm256_set1_ps(-f16(b->dmin));
}

KQ_INLINE void decode(const BlockQ6K* b, Blk& o) {
  const __m512i top = _mm512_set1_epi8(0x30);
  for (int h = 0; h < 2; ++h) {
    const __m512i l = _mm512_loadu_si512(b->ql + 64 * h);
    const __m512i hb = bcast32(b->qh + 32 * h);
    // bits 2(p/32) of qh -> bits 4..5: p/32 = 0, 1 for q[2h], 2, 3 for q[2h+1]
    const __m512i h0 = _mm512_sllv_epi64(hb, _mm512_setr_epi64(4, 4, 4, 4, 2, 2, 2, 2));
    const __m512i h1 = _mm512_srlv_epi64(hb, _mm512_setr_epi64(0, 0, 0, 0, 2, 2, 2, 2));
    o.q[2 * h] = _mm512_or_si512(_mm512_and_si512(l, m8(0x0F)), _mm512_and_si512(h0, top));
    o.q[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), m8(0x0F)),
                                     _mm512_and_si512(h1, top));
  }
  const __m128i s = _mm_loadu_si128((const __m128i*)b->scales);
  set_scales(s, o);
  o.mb = _mm256_slli_epi16(_mm256_cvtepi8_epi16(s), 5);
  o.vA = _mm256_set1_ps(f16(b->d));
}

template <bool kFold>
KQ_INLINE Acc row(const Blk& b, const cake_q8_256* y, Acc acc) {
  const __m512i z = _mm512_setzero_si512();
  __m512i p[4];
  for (int c = 0; c < 4; ++c)
    p[c] = _mm512_dpbusd_epi32(z, b.q[c], _mm512_loadu_si512(y->qs + 64 * c));
  __m512i s = _mm512_madd_epi16(_mm512_packs_epi32(p[0], p[1]), b.sc[0]);
  s = _mm512_dpwssd_epi32(s, _mm512_packs_epi32(p[2], p[3]), b.sc[1]);
  const __m256i m = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)y->bsums), b.mb);
  const __m256i s8 = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
  return finish<kFold>(s8, m, b.vA, b.vB, y->d, acc);
}

// ---------------------------------------------------------------------------
#elif CAKE_KQ_AVX2
// q[k] holds elements 32k..32k+31; sc[k] the int16 scale of each pair of them.
struct Blk {
  __m256i q[8];
  __m256i sc[8];
  __m256i mb;
  __m256 vA, vB;
};

KQ_INLINE __m256i load(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
KQ_INLINE __m256i m8(int v) { return _mm256_set1_epi8((char)v); }
KQ_INLINE __m256i srl(__m256i v, int n) { return _mm256_srli_epi16(v, n); }

KQ_INLINE void set_scales(__m128i s8, Blk& o) {
  for (int k = 0; k < 8; ++k) {
    const __m128i idx = _mm_or_si128(_mm_set1_epi8((char)(2 * k)),
                                     _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1));
    o.sc[k] = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(s8, idx));
  }
}

KQ_INLINE void unpack_2bit(const uint8_t* qs, Blk& o) {
  for (int h = 0; h < 2; ++h) {
    const __m256i v = load(qs + 32 * h);
    for (int j = 0; j < 4; ++j) o.q[4 * h + j] = _mm256_and_si256(srl(v, 2 * j), m8(3));
  }
}

KQ_INLINE void unpack_4bit(const uint8_t* qs, Blk& o) {
  for (int c = 0; c < 4; ++c) {
    const __m256i v = load(qs + 32 * c);
    o.q[2 * c] = _mm256_and_si256(v, m8(0x0F));
    o.q[2 * c + 1] = _mm256_and_si256(srl(v, 4), m8(0x0F));
  }
}

// Bit j of byte l adds `value` (a power of two, bit v) to q[j].
KQ_INLINE void add_bitplane(const uint8_t* bits, int v, Blk& o) {
  const __m256i h = load(bits);
  for (int j = 0; j < 8; ++j) {
    const __m256i t = j < v ? _mm256_slli_epi16(h, v - j) : srl(h, j - v);
    o.q[j] = _mm256_or_si256(o.q[j], _mm256_and_si256(t, m8(1 << v)));
  }
}

KQ_INLINE void decode(const BlockQ2K* b, Blk& o) {
  unpack_2bit(b->qs, o);
  const __m128i v = _mm_loadu_si128((const __m128i*)b->scales);
  set_scales(_mm_and_si128(v, _mm_set1_epi8(0x0F)), o);
  o.mb = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0F)));
  o.vA = _mm256_set1_ps(f16(b->d));
  o.vB = _mm256_set1_ps(-f16(b->dmin));
}

KQ_INLINE void decode(const BlockQ3K* b, Blk& o) {
  unpack_2bit(b->qs, o);
  add_bitplane(b->hmask, 2, o);
  uint32_t w[4];
  unpack_q3k_scales(b->scales, w);
  const __m128i s = _mm_sub_epi8(_mm_setr_epi32((int)w[0], (int)w[1], (int)w[2], (int)w[3]),
                                 _mm_set1_epi8(32));
  set_scales(s, o);
  o.mb = _mm256_slli_epi16(_mm256_cvtepi8_epi16(s), 2);
  o.vA = _mm256_set1_ps(f16(b->d));
}

KQ_INLINE void q45_scales(const uint8_t* p, Blk& o) {
  uint32_t w[4];
  unpack_q4k_scales(p, w);
  const __m128i v = _mm_setr_epi32((int)w[0], (int)w[1], (int)w[2], (int)w[3]);
  const __m128i dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  set_scales(_mm_shuffle_epi8(v, dup), o);
  o.mb = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(v, _mm_add_epi8(dup, _mm_set1_epi8(8))));
}

KQ_INLINE void decode(const BlockQ4K* b, Blk& o) {
  unpack_4bit(b->qs, o);
  q45_scales(b->scales, o);
  o.vA = _mm256_set1_ps(f16(b->d));
  o.vB = _mm256_set1_ps(-f16(b->dmin));
}

KQ_INLINE void decode(const BlockQ5K* b, Blk& o) {
  unpack_4bit(b->qs, o);
  add_bitplane(b->qh, 4, o);
  q45_scales(b->scales, o);
  o.vA = _mm256_set1_ps(f16(b->d));
  o.vB = _mm256_set1_ps(-f16(b->dmin));
}

KQ_INLINE void decode(const BlockQ6K* b, Blk& o) {
  const __m256i top = m8(0x30), low = m8(0x0F);
  for (int h = 0; h < 2; ++h) {
    const __m256i l0 = load(b->ql + 64 * h), l1 = load(b->ql + 64 * h + 32);
    const __m256i hb = load(b->qh + 32 * h);
    // element h*128 + 32j + l: nibble j/2 of ql[h*64 + 32(j%2) + l], bits 2j of hb
    o.q[4 * h] = _mm256_or_si256(_mm256_and_si256(l0, low),
                                 _mm256_and_si256(_mm256_slli_epi16(hb, 4), top));
    o.q[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(l1, low),
                                     _mm256_and_si256(_mm256_slli_epi16(hb, 2), top));
    o.q[4 * h + 2] =
        _mm256_or_si256(_mm256_and_si256(srl(l0, 4), low), _mm256_and_si256(hb, top));
    o.q[4 * h + 3] =
        _mm256_or_si256(_mm256_and_si256(srl(l1, 4), low), _mm256_and_si256(srl(hb, 2), top));
  }
  const __m128i s = _mm_loadu_si128((const __m128i*)b->scales);
  set_scales(s, o);
  o.mb = _mm256_slli_epi16(_mm256_cvtepi8_epi16(s), 5);
  o.vA = _mm256_set1_ps(f16(b->d));
}

template <bool kFold>
KQ_INLINE Acc row(const Blk& b, const cake_q8_256* y, Acc acc) {
  __m256i s0 = _mm256_setzero_si256(), s1 = s0;
  for (int k = 0; k < 8; k += 2) {
    // pair sums fit int16: 2 * 63 * 127 < 32768
    const __m256i* x = (const __m256i*)(y->qs + 32 * k);
    s0 = _mm256_add_epi32(
        s0, _mm256_madd_epi16(_mm256_maddubs_epi16(b.q[k], _mm256_loadu_si256(x)), b.sc[k]));
    s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_maddubs_epi16(b.q[k + 1],
                                                                     _mm256_loadu_si256(x + 1)),
                                                b.sc[k + 1]));
  }
  const __m256i m = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)y->bsums), b.mb);
  return finish<kFold>(_mm256_add_epi32(s0, s1), m, b.vA, b.vB, y->d, acc);
}

// ---------------------------------------------------------------------------
#else
using Blk = Decoded;
using Acc = float;
inline Acc acc_zero() { return 0.0f; }
inline float acc_sum(Acc a) { return a; }

template <bool kFold>
KQ_INLINE Acc row(const Blk& b, const cake_q8_256* y, Acc acc) {
  // the quants are < 64: as int8 the products are s8 x s8 dots, which compilers
  // vectorize (ARM sdot, x86 pmaddwd)
  const int8_t* q = (const int8_t*)b.q;
  int32_t s = 0, m = 0;
  for (int g = 0; g < 16; ++g) {
    int32_t t = 0;
    for (int i = 0; i < 16; ++i) t += q[g * 16 + i] * y->qs[g * 16 + i];
    s += b.s[g] * t;
    m += b.m[g] * y->bsums[g];
  }
  if (kFold) return acc + y->d * b.dA * (float)(s - m);
  return acc + y->d * (b.dA * (float)s - b.dB * (float)m);
}
#endif

// kRows activation rows against one weight row, unrolled: the accumulators
// stay in registers and the rows' integer work interleaves.
template <class B, bool kFold, int kRows>
void dot_rows(int64_t nb, const B* w, const char* x, size_t x_stride, float* out) {
  Acc acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = acc_zero();
  for (int64_t ib = 0; ib < nb; ++ib) {
    Blk b;
    decode(w + ib, b);
    for (int r = 0; r < kRows; ++r)
      acc[r] = row<kFold>(b, (const cake_q8_256*)(x + r * x_stride) + ib, acc[r]);
  }
  for (int r = 0; r < kRows; ++r) out[r] = acc_sum(acc[r]);
}

template <class B, bool kFold>
void dot(int64_t k, const void* w, const void* x, size_t x_stride, int nrows, float* out) {
  using Fn = void (*)(int64_t, const B*, const char*, size_t, float*);
  static constexpr Fn kFns[kMaxRows] = {
      dot_rows<B, kFold, 1>, dot_rows<B, kFold, 2>, dot_rows<B, kFold, 3>,
      dot_rows<B, kFold, 4>, dot_rows<B, kFold, 5>, dot_rows<B, kFold, 6>,
      dot_rows<B, kFold, 7>, dot_rows<B, kFold, 8>};
  for (int r0 = 0; r0 < nrows; r0 += kMaxRows) {
    const int nr = nrows - r0 < kMaxRows ? nrows - r0 : kMaxRows;
    kFns[nr - 1](k / kQK, (const B*)w, (const char*)x + (size_t)r0 * x_stride, x_stride,
                 out + r0);
  }
}

}  // namespace

extern "C" {

void cake_dot_q2_k(int64_t k, const void* w, const void* x, size_t x_stride, int nrows,
                   float* out) {
  dot<BlockQ2K, false>(k, w, x, x_stride, nrows, out);
}
void cake_dot_q3_k(int64_t k, const void* w, const void* x, size_t x_stride, int nrows,
                   float* out) {
  dot<BlockQ3K, true>(k, w, x, x_stride, nrows, out);
}
void cake_dot_q4_k(int64_t k, const void* w, const void* x, size_t x_stride, int nrows,
                   float* out) {
  dot<BlockQ4K, false>(k, w, x, x_stride, nrows, out);
}
void cake_dot_q5_k(int64_t k, const void* w, const void* x, size_t x_stride, int nrows,
                   float* out) {
  dot<BlockQ5K, false>(k, w, x, x_stride, nrows, out);
}
void cake_dot_q6_k(int64_t k, const void* w, const void* x, size_t x_stride, int nrows,
                   float* out) {
  dot<BlockQ6K, true>(k, w, x, x_stride, nrows, out);
}

void cake_dequant_q2_k(int64_t k, const void* w, float* out) { dequant<BlockQ2K, 0>(k, w, out); }
void cake_dequant_q3_k(int64_t k, const void* w, float* out) { dequant<BlockQ3K, 4>(k, w, out); }
void cake_dequant_q4_k(int64_t k, const void* w, float* out) { dequant<BlockQ4K, 0>(k, w, out); }
void cake_dequant_q5_k(int64_t k, const void* w, float* out) { dequant<BlockQ5K, 0>(k, w, out); }
void cake_dequant_q6_k(int64_t k, const void* w, float* out) { dequant<BlockQ6K, 32>(k, w, out); }

}  // extern "C"
