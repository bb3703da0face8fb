// The K-quants (Q2_K ... Q6_K) repacked at load time into tiles of 8 weight
// rows ("Q2_KR8" ... "Q6_KR8"), and their GEMM against cake_q8_256 activations.
//
// As in repack.cc, one product instruction serves all 8 rows of a tile. Here a
// 512-bit register holds 8 consecutive elements of each of the 8 rows (bytes
// 8r .. 8r + 7 = row r, int32 lanes 2r and 2r + 1), so its activation operand
// is one 64-bit broadcast (a plain load); the 256-bit paths take its halves
// (rows 0..3, rows 4..7). The per-sub-block scales are applied in integers
// with a 16-bit multiply-add (vpdpwssd / vpmaddwd) on partial dots that fit in
// int16, the mins (Q2_K, Q4_K, Q5_K) and the offsets (Q3_K -4, Q6_K -32) come
// from the activations' bsums, and each block ends in a few float ops per
// activation row.
//
// A repacked matrix has the plain one's bytes, reordered: N / 8 tiles, each
// K / 256 groups, group b holding block b of the tile's rows 0..7. Element e
// of a "chunk" p (8 elements: 8p .. 8p + 7 of the block) is byte 8r + e of
// its 64-byte vector for row r.
//
// Q4_KR8, 1152 bytes per group (8 x 144):
//   d[8]      float16, row r's d                                     16 bytes
//   dmin[8]   float16, row r's dmin                                  16 bytes
//   sc        byte 8i + r = byte i (0..11) of row r's 12 packed
//             6-bit scales and mins (the plain layout, transposed)   96 bytes
//   qs        16 vectors v = 4c + t of 64 bytes, byte 8r + e = byte
//             32c + 8t + e of row r's qs: low nibble element
//             64c + 8t + e (sub-block 2c), high nibble 32 elements
//             later (sub-block 2c + 1)                             1024 bytes
// Q5_KR8, 1408 bytes per group (8 x 176): Q4_KR8's 1152, then
//   qh        4 vectors t of 64 bytes, byte 8r + e = byte 8t + e of
//             row r's qh: bit 2c (2c + 1) is the fifth bit of the
//             element of qs vector 4c + t's low (high) nibble        256 bytes
// Q6_KR8, 1680 bytes per group (8 x 210):
//   d[8]      float16                                                16 bytes
//   sc        byte 8s + r = row r's int8 scale of sub-block s
//             (elements 16s .. 16s + 15)                            128 bytes
//   q         8 groups G of 3 vectors of 64 bytes, G covering chunks
//             4G .. 4G + 3: byte 8r + e of vector 3G + k (k < 3) has
//             row r's 6-bit q (value d sc (q - 32)) of element
//             8(4G + k) + e in bits 0..5, and bits 2k, 2k + 1 of the
//             q of element 8(4G + 3) + e in bits 6..7              1536 bytes
// Q3_KR8, 880 bytes per group (8 x 110), value d (s - 32) (q - 4):
//   d[8]      float16                                                16 bytes
//   sc        byte 8i + r = byte i (0..11) of row r's 12 packed
//             6-bit scales (the plain layout, transposed)            96 bytes
//   ql        8 vectors v = 4h + t of 64 bytes ("paired" chunks),
//             byte 8r + 4u + e (u < 2, e < 4) = byte 32h + 16u + 4t
//             + e of row r's qs: bits 2j, 2j + 1 the low bits of
//             element 128h + 32j + 16u + 4t + e                     512 bytes
//   qh        4 vectors t of 64 bytes, byte 8r + 4u + e = byte 16u +
//             4t + e of row r's hmask: bit 4h + j that element's
//             third bit                                             256 bytes
// Q2_KR8, 672 bytes per group (8 x 84), value d s q - dmin m:
//   d[8], dmin[8]   float16                                          32 bytes
//   sc        byte 8s + r = row r's scales[s] (s low nibble, m
//             high nibble) of sub-block s (elements 16s .. 16s + 15) 128 bytes
//   ql        as Q3_KR8's                                           512 bytes
//
// The 512-bit path (AVX-512 BW/VL with VNNI), per block and activation row:
// Q4_K: vpdpbusd of the 4 chunks of a sub-block (16 elements per int32 lane,
// |dot| <= 30480 < 2^15), then vpdpwssd of those int32 lanes with int16 pairs
// (row's scale, 0): the low half is the dot, the high half sign bits times 0.
// 4 vpdpwssd of the bsums with the mins: 32 + 12 ops and 5 float ones for
// 2048 products. Q5_K (q < 32): the same with a vpdpwssd every 2 chunks.
// Q6_K (q < 64): vpmaddubsw of the 2 chunks of a 16-element sub-block summed
// in int16 (|sum| <= 32004), one vpdpwssd with the rows' scales; the -32
// scale bsums offset joins the same int32 sums: 64 + 4 ops and 3 float ones.
// Q3_K, Q2_K (q < 8, < 4): vpdpbusd of a group's 4 paired chunks (each
// int32 lane one 16-element sub-block), then vpdpwssd with (scale, 0) as for
// Q4_K: 32 + 12 ops. The rows' 16 lanes (2 per row) are summed at the end.
// The AVX2 path does the same with vpmaddubsw / vpmaddwd on the 256-bit
// halves, 4 activation rows at a time; the scalar path decodes each row of
// the tile and runs kquants.cc's integer dots.
#include <string.h>

#include "qdot.h"
#include "simd.h"

// the 512-bit path wants the EVEX vpdpbusd / vpdpwssd; AVX-512 without them,
// or AVX-VNNI alone, takes the AVX2 path
#if CAKE_AVX512 && CAKE_VNNI && defined(__AVX512VNNI__)
#define CAKE_K512 1
#endif

#if defined(__GNUC__)
#define RK_NOINLINE __attribute__((noinline))
#else
#define RK_NOINLINE
#endif

namespace {

constexpr int kR = 8;     // weight rows per tile
constexpr int kQK = 256;  // elements per block

inline float load_f16(const uint8_t* p) {
  uint16_t h;
  memcpy(&h, p, 2);
  return cake_f16_to_f32(h);
}

inline uint64_t load_u64(const uint8_t* p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return v;
}

inline void store_u64(uint8_t* p, uint64_t v) { memcpy(p, &v, 8); }

// ---- one row's block, decoded as kquants.cc does -----------------------------
// value_i = dA * s[i / 16] * (q_i - off) - dB * m[i / 16] (off: Q6_K 32, m = 0)
struct Decoded {
  uint8_t q[kQK];
  int8_t s[16];
  int16_t m[16];
  float dA, dB;
};

// ---- formats: plain block bytes, group bytes, repack and decode ----------------
// repack(src, stride, g): the 8 rows' block at src + r * stride -> group g;
// decode(g, r, o): row r of group g as a Decoded.

// Q4_K, and Q5_K (kHigh: a fifth bit per element in qh[32]).
template <bool kHigh_>
struct Q45K {
  static constexpr bool kHigh = kHigh_;
  static constexpr int kKind = 0;  // which SIMD kernel
  static constexpr int kBytes = kHigh ? 176 : 144, kGroup = kR * kBytes, kOff = 0;
  static constexpr int kD = 0, kDmin = 16, kSc = 32, kQs = 128, kQh = 1152;  // group offsets
  // plain block: d, dmin, scales[12] (the 6-bit scales and mins of the 8
  // sub-blocks of 32, packed as ggml's get_scale_min_k4 reads them), Q5_K:
  // qh[32], then qs[128]: element 64c + l (l < 32) is the low nibble of
  // qs[32c + l] (+ 16 x bit 2c of qh[l]), 64c + 32 + l its high nibble (+ 16
  // x bit 2c + 1)
  static constexpr int kPlainQs = kHigh ? 48 : 16;
  static void repack(const uint8_t* src, size_t stride, uint8_t* g) {
    for (int r = 0; r < kR; r++) {
      const uint8_t* b = src + r * stride;
      memcpy(g + kD + 2 * r, b, 2);
      memcpy(g + kDmin + 2 * r, b + 2, 2);
      for (int i = 0; i < 12; i++) g[kSc + 8 * i + r] = b[4 + i];
      for (int v = 0; v < 16; v++) memcpy(g + kQs + 64 * v + 8 * r, b + kPlainQs + 8 * v, 8);
      if (kHigh)
        for (int t = 0; t < 4; t++) memcpy(g + kQh + 64 * t + 8 * r, b + 16 + 8 * t, 8);
    }
  }
  // row r of group g, decoded
  static void decode(const uint8_t* g, int r, Decoded& o) {
    uint8_t p[12], sc[8], mn[8];
    for (int i = 0; i < 12; i++) p[i] = g[kSc + 8 * i + r];
    for (int j = 0; j < 4; j++) {
      sc[j] = p[j] & 63;
      mn[j] = p[j + 4] & 63;
      sc[j + 4] = (p[j + 8] & 0xF) | ((p[j] >> 6) << 4);
      mn[j + 4] = (p[j + 8] >> 4) | ((p[j + 4] >> 6) << 4);
    }
    for (int i = 0; i < 16; i++) {
      o.s[i] = (int8_t)sc[i / 2];
      o.m[i] = mn[i / 2];
    }
    const uint64_t m4 = 0x0F0F0F0F0F0F0F0Full, m1 = 0x0101010101010101ull;
    for (int v = 0; v < 16; v++) {  // 8 bytes at a time
      const int c = v / 4, t = v % 4;
      uint64_t lo = load_u64(g + kQs + 64 * v + 8 * r), hi = (lo >> 4) & m4;
      lo &= m4;
      if (kHigh) {
        const uint64_t h = load_u64(g + kQh + 64 * t + 8 * r);
        lo |= ((h >> (2 * c)) & m1) << 4;
        hi |= ((h >> (2 * c + 1)) & m1) << 4;
      }
      store_u64(o.q + 64 * c + 8 * t, lo);
      store_u64(o.q + 64 * c + 32 + 8 * t, hi);
    }
    o.dA = load_f16(g + kD + 2 * r);
    o.dB = load_f16(g + kDmin + 2 * r);
  }
};
using Q4K = Q45K<false>;
using Q5K = Q45K<true>;

struct Q6K {
  static constexpr int kKind = 1;
  static constexpr int kBytes = 210, kGroup = kR * kBytes, kOff = 32;
  static constexpr int kD = 0, kSc = 16, kQ = 144;  // group offsets
  // plain block: ql[128], qh[64], scales[16], d. Element 128h + 32j + l:
  // nibble j / 2 of ql[64h + 32(j % 2) + l], bits 2j of qh[32h + l].
  static void plain_q(const uint8_t* b, uint8_t q[kQK]) {
    for (int h = 0; h < 2; h++)
      for (int j = 0; j < 4; j++)
        for (int l = 0; l < 32; l++) {
          const int lo = (b[64 * h + 32 * (j % 2) + l] >> (4 * (j / 2))) & 0xF;
          const int hi = (b[128 + 32 * h + l] >> (2 * j)) & 3;
          q[128 * h + 32 * j + l] = (uint8_t)(lo | hi << 4);
        }
  }
  static void repack(const uint8_t* src, size_t stride, uint8_t* g) {
    uint8_t q[kQK];
    for (int r = 0; r < kR; r++) {
      const uint8_t* b = src + r * stride;
      memcpy(g + kD + 2 * r, b + 208, 2);
      for (int s = 0; s < 16; s++) g[kSc + 8 * s + r] = b[192 + s];
      plain_q(b, q);
      for (int G = 0; G < 8; G++)
        for (int k = 0; k < 3; k++)
          for (int e = 0; e < 8; e++)
            g[kQ + 64 * (3 * G + k) + 8 * r + e] =
                (uint8_t)(q[32 * G + 8 * k + e] | ((q[32 * G + 24 + e] >> (2 * k)) & 3) << 6);
    }
  }
  // row r of group g, decoded
  static void decode(const uint8_t* g, int r, Decoded& o) {
    for (int G = 0; G < 8; G++) {  // 8 bytes at a time
      const uint8_t* v = g + kQ + 64 * 3 * G + 8 * r;
      const uint64_t v0 = load_u64(v), v1 = load_u64(v + 64), v2 = load_u64(v + 128);
      const uint64_t m6 = 0x3F3F3F3F3F3F3F3Full, m2 = 0x0303030303030303ull;
      store_u64(o.q + 32 * G, v0 & m6);
      store_u64(o.q + 32 * G + 8, v1 & m6);
      store_u64(o.q + 32 * G + 16, v2 & m6);
      store_u64(o.q + 32 * G + 24, ((v0 >> 6) & m2) | ((v1 >> 4) & m2 << 2) | ((v2 >> 2) & m2 << 4));
    }
    for (int s = 0; s < 16; s++) {
      o.s[s] = (int8_t)g[kSc + 8 * s + r];
      o.m[s] = (int16_t)(32 * o.s[s]);
    }
    o.dA = o.dB = load_f16(g + kD + 2 * r);
  }
};

// Q3_K and Q2_K keep the plain 2-bit fields (element 128h + 32j + l: bits 2j
// of qs[32h + l]; Q3_K's third bit: bit 4h + j of hmask[l]), so chunk 4G + t
// (G = 4h + j) is field j of ql vector 4h + t (and bit 4h + j of qh vector t).
// Their chunks are "paired": chunk t of group G (elements 32G .. 32G + 31)
// holds elements 4t .. 4t + 3 of sub-block 2G in bytes 0..3 and those of
// sub-block 2G + 1 in bytes 4..7 (paired_copy), so that an int32 lane sums
// one sub-block over the group's 4 chunks; the SIMD paths take activations
// in the same order (arrange_paired).

// the 8 bytes of paired chunk t, from a group's 32 plain bytes at src
inline void paired_copy(uint8_t* dst, const uint8_t* src, int t) {
  memcpy(dst, src + 4 * t, 4);
  memcpy(dst + 4, src + 16 + 4 * t, 4);
}
// chunk t's 8 bytes v back to the plain order of their group at dst
inline void store_paired(uint8_t* dst, int t, uint64_t v) {
  const uint32_t lo = (uint32_t)v, hi = (uint32_t)(v >> 32);
  memcpy(dst + 4 * t, &lo, 4);
  memcpy(dst + 16 + 4 * t, &hi, 4);
}
struct Q3K {
  static constexpr int kKind = 2;
  static constexpr int kBytes = 110, kGroup = kR * kBytes, kOff = 4;
  static constexpr int kD = 0, kSc = 16, kL = 112, kH = 624;  // group offsets
  // plain block: hmask[32], qs[64], scales[12] (16 6-bit scales + 32), d
  static void repack(const uint8_t* src, size_t stride, uint8_t* g) {
    for (int r = 0; r < kR; r++) {
      const uint8_t* b = src + r * stride;
      memcpy(g + kD + 2 * r, b + 108, 2);
      for (int i = 0; i < 12; i++) g[kSc + 8 * i + r] = b[96 + i];
      for (int v = 0; v < 8; v++) paired_copy(g + kL + 64 * v + 8 * r, b + 32 + 32 * (v / 4), v % 4);
      for (int t = 0; t < 4; t++) paired_copy(g + kH + 64 * t + 8 * r, b, t);
    }
  }
  // value = d (s - 32) (q - 4), q = low 2 bits + 4 x the hmask bit
  static void decode(const uint8_t* g, int r, Decoded& o) {
    uint8_t p[12];
    for (int i = 0; i < 12; i++) p[i] = g[kSc + 8 * i + r];
    for (int k = 0; k < 4; k++) {
      o.s[k] = (int8_t)(((p[k] & 0xF) | ((p[8 + k] & 3) << 4)) - 32);
      o.s[k + 4] = (int8_t)(((p[4 + k] & 0xF) | (((p[8 + k] >> 2) & 3) << 4)) - 32);
      o.s[k + 8] = (int8_t)(((p[k] >> 4) | (((p[8 + k] >> 4) & 3) << 4)) - 32);
      o.s[k + 12] = (int8_t)(((p[4 + k] >> 4) | (((p[8 + k] >> 6) & 3) << 4)) - 32);
    }
    for (int i = 0; i < 16; i++) o.m[i] = (int16_t)(4 * o.s[i]);
    const uint64_t m1 = 0x0101010101010101ull, m2 = 0x0303030303030303ull;
    for (int G = 0; G < 8; G++)
      for (int t = 0; t < 4; t++) {
        const int h = G / 4, j = G % 4;
        const uint64_t lo = load_u64(g + kL + 64 * (4 * h + t) + 8 * r);
        const uint64_t hi = load_u64(g + kH + 64 * t + 8 * r);
        store_paired(o.q + 32 * G, t, ((lo >> (2 * j)) & m2) | ((hi >> (4 * h + j)) & m1) << 2);
      }
    o.dA = o.dB = load_f16(g + kD + 2 * r);
  }
};

struct Q2K {
  static constexpr int kKind = 2;
  static constexpr int kBytes = 84, kGroup = kR * kBytes, kOff = 0;
  static constexpr int kD = 0, kDmin = 16, kSc = 32, kL = 160;  // group offsets
  // plain block: scales[16] (low nibble scale, high nibble min), qs[64], d, dmin;
  // tile sc: byte 8s + r = row r's scales[s]
  static void repack(const uint8_t* src, size_t stride, uint8_t* g) {
    for (int r = 0; r < kR; r++) {
      const uint8_t* b = src + r * stride;
      memcpy(g + kD + 2 * r, b + 80, 2);
      memcpy(g + kDmin + 2 * r, b + 82, 2);
      for (int s = 0; s < 16; s++) g[kSc + 8 * s + r] = b[s];
      for (int v = 0; v < 8; v++) paired_copy(g + kL + 64 * v + 8 * r, b + 16 + 32 * (v / 4), v % 4);
    }
  }
  static void decode(const uint8_t* g, int r, Decoded& o) {
    for (int s = 0; s < 16; s++) {
      o.s[s] = (int8_t)(g[kSc + 8 * s + r] & 0xF);
      o.m[s] = g[kSc + 8 * s + r] >> 4;
    }
    const uint64_t m2 = 0x0303030303030303ull;
    for (int G = 0; G < 8; G++)
      for (int t = 0; t < 4; t++) {
        const uint64_t lo = load_u64(g + kL + 64 * (4 * (G / 4) + t) + 8 * r);
        store_paired(o.q + 32 * G, t, (lo >> (2 * (G % 4))) & m2);
      }
    o.dA = load_f16(g + kD + 2 * r);
    o.dB = load_f16(g + kDmin + 2 * r);
  }
};

template <class F>
void repack_tile(int64_t k, const void* w, size_t stride, void* out) {
  const uint8_t* src = (const uint8_t*)w;
  uint8_t* g = (uint8_t*)out;
  for (int64_t b = 0; b < k / kQK; b++, src += F::kBytes, g += F::kGroup) F::repack(src, stride, g);
}

// gguf.quants: (d * scale) * (q - off) - (dmin * min), each product in float32
// (the build keeps them unfused)
template <class F>
void dequant_tile(int64_t k, const void* w, float* out) {
  const uint8_t* g = (const uint8_t*)w;
  Decoded d;
  for (int64_t b = 0; b < k / kQK; b++, g += F::kGroup)
    for (int r = 0; r < kR; r++) {
      F::decode(g, r, d);
      float* y = out + r * k + kQK * b;
      for (int s = 0; s < 16; s++) {
        const float dl = d.dA * (float)d.s[s];
        const float ml = F::kOff ? 0.0f : d.dB * (float)d.m[s];
        for (int i = 0; i < 16; i++) {
          const float t = dl * (float)((int)d.q[16 * s + i] - F::kOff);
          y[16 * s + i] = t - ml;
        }
      }
    }
}

// ---- GEMM: one tile x NR activation rows, y[i * ys + r] -----------------------

inline const cake_q8_256* act_row(const void* x, size_t xs, int i) {
  return (const cake_q8_256*)((const char*)x + (size_t)i * xs);
}

#if CAKE_AVX2
// Part p of n of the cache lines of the group 2 groups after g (past the
// tile's end, the next tile's: the driver takes tiles in order), towards L1.
// The hardware prefetchers alone leave ~20% of M = 1 to memory stalls.
// Non-temporal, as repack.cc's prefetch_ahead (measured there).
template <int kBytes>
inline void prefetch_part(const uint8_t* g, int p, int n) {
  constexpr int kLines = (kBytes + 63) / 64;
  for (int l = p * kLines / n; l < (p + 1) * kLines / n; l++)
    _mm_prefetch((const char*)g + 2 * kBytes + 64 * l, _MM_HINT_NTA);
}
#endif

#if CAKE_K512
constexpr int kMaxRows = 8;

inline __m512i bq(const void* p) {  // 8 bytes broadcast: a plain load
  int64_t v;
  memcpy(&v, p, 8);
  return _mm512_set1_epi64(v);
}
inline __m512i m8(int v) { return _mm512_set1_epi8((char)v); }
inline __m512i srl16(__m512i v, int n) { return _mm512_srli_epi16(v, n); }
inline __m512i load512(const uint8_t* p) { return _mm512_loadu_si512((const void*)p); }
// (v >> 4) & 0x0f in each byte
inline __m512i high_nibbles(__m512i v) {
#if defined(__GFNI__)
  return _mm512_gf2p8affine_epi64_epi8(v, _mm512_set1_epi64(0x1020408000000000), 0);
#else
  return _mm512_and_si512(srl16(v, 4), m8(0x0f));
#endif
}
// Q6_KR8's chunk 3 of a group: bits 6, 7 of v0, v1, v2 -> bits 0 .. 5
inline __m512i top_bits(__m512i v0, __m512i v1, __m512i v2) {
#if defined(__GFNI__)
  return _mm512_ternarylogic_epi64(_mm512_gf2p8affine_epi64_epi8(v0, _mm512_set1_epi64(0x4080000000000000), 0),
                                   _mm512_gf2p8affine_epi64_epi8(v1, _mm512_set1_epi64(0x0000408000000000), 0),
                                   _mm512_gf2p8affine_epi64_epi8(v2, _mm512_set1_epi64(0x0000000040800000), 0),
                                   0xfe);
#else
  return _mm512_or_si512(
      _mm512_or_si512(_mm512_and_si512(srl16(v0, 6), m8(0x03)), _mm512_and_si512(srl16(v1, 4), m8(0x0c))),
      _mm512_and_si512(srl16(v2, 2), m8(0x30)));
#endif
}

// ((qh >> k) & 1) << 4 in each byte
inline __m512i bit_to_16(__m512i qh, int k) {
#if defined(__GFNI__)
  return _mm512_gf2p8affine_epi64_epi8(qh, _mm512_set1_epi64((int64_t)(1ull << k) << 24), 0);
#else
  const __m512i t = k <= 4 ? _mm512_slli_epi16(qh, 4 - k) : _mm512_srli_epi16(qh, k - 4);
  return _mm512_and_si512(t, m8(0x10));
#endif
}

// Index vectors for vpermw (int16 w of a zmm: lane w >> 1) and vpermps, from
// int16 tables [s][r] of 4 sub-blocks s' scales or mins for rows r.
struct Idx512 {
  // sub[s]: row w >> 2's value of sub-block s (4 copies per row, 2 per lane)
  // pair[p]: lane L = 2u + t, row u's value of sub-block 2p + t (twice):
  // Q4_K's mins, Q3_K's / Q2_K's scales of a group's paired chunks
  // q6_mw: lane L = 2u + t, row u's scales of sub-blocks 2t, 2t + 1
  alignas(64) int16_t sub[4][32], pair[2][32], q6_mw[32];
  alignas(64) int32_t rows[16], out[16];  // lane L <- row L >> 1; 8 rows' sums <- lanes 2r
  Idx512() {
    for (int w = 0; w < 32; w++) {
      for (int s = 0; s < 4; s++) sub[s][w] = (int16_t)(s * 8 + (w >> 2));
      for (int p = 0; p < 2; p++) pair[p][w] = (int16_t)((2 * p + ((w >> 1) & 1)) * 8 + (w >> 2));
      q6_mw[w] = (int16_t)((w & 3) * 8 + (w >> 2));
    }
    for (int L = 0; L < 16; L++) {
      rows[L] = L >> 1;
      out[L] = L < 8 ? 2 * L : 0;
    }
  }
};
const Idx512 kIdx;

inline __m512i idx16(const int16_t* p) { return _mm512_load_si512((const void*)p); }
inline __m512i idx32(const int32_t* p) { return _mm512_load_si512((const void*)p); }

// the tile's 8 float16 at p, lane L holding row L >> 1's
inline __m512 rows_f16(const uint8_t* p) {
  const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
  return _mm512_permutexvar_ps(idx32(kIdx.rows), _mm512_zextps256_ps512(v));
}

// y[0..7] = the 8 rows' sums of lanes 2r, 2r + 1
inline void store_rows(__m512 acc, float* y) {
  const __m512 s = _mm512_add_ps(acc, _mm512_permute_ps(acc, _MM_SHUFFLE(2, 3, 0, 1)));
  _mm256_storeu_ps(y, _mm512_castps512_ps256(_mm512_permutexvar_ps(idx32(kIdx.out), s)));
}

// Few registers live (NR = 8 spilled the sums otherwise): the rows' float
// sums stay in memory (a load and a store per row and block), a sub-block
// pair's scales are made where they are used, the mins at the block's end.
template <class F, int NR>
RK_NOINLINE void q45k_rows(int64_t nb, const uint8_t* w, const void* x, size_t xs, float* y, size_t ys) {
  alignas(64) float acc[NR][16];
  for (int i = 0; i < NR; i++) _mm512_store_ps(acc[i], _mm512_setzero_ps());
  const __m512i zero = _mm512_setzero_si512();
  const __m256i c3f = _mm256_set1_epi8(0x3f), c0f = _mm256_set1_epi8(0x0f), c30 = _mm256_set1_epi8(0x30);
  for (int64_t b = 0; b < nb; b++, w += F::kGroup) {
    // the 8 rows' packed scales and mins as bytes [j][r]
    const __m256i plo = _mm256_loadu_si256((const __m256i*)(w + F::kSc));
    const __m256i phi = _mm256_loadu_si256((const __m256i*)(w + F::kSc + 32));
    const __m256i pq = _mm256_loadu_si256((const __m256i*)(w + F::kSc + 64));
    // scales of sub-blocks 0..3 and 4..7 as int16 [j % 4][r]
    const __m512i s03 = _mm512_cvtepu8_epi16(_mm256_and_si256(plo, c3f));
    const __m512i s47 = _mm512_cvtepu8_epi16(
        _mm256_or_si256(_mm256_and_si256(pq, c0f), _mm256_and_si256(_mm256_srli_epi16(plo, 2), c30)));
    __m512i isum[NR];
    for (int i = 0; i < NR; i++) isum[i] = zero;
    for (int c = 0; c < 4; c++) {
      prefetch_part<F::kGroup>(w, c, 4);
      // sub-blocks 2c, 2c + 1: int16 pairs (row L >> 1's scale, 0)
      const __m512i z = c < 2 ? s03 : s47;
      const __m512i sca = _mm512_maskz_permutexvar_epi16(0x55555555u, idx16(kIdx.sub[(2 * c) & 3]), z);
      const __m512i scb = _mm512_maskz_permutexvar_epi16(0x55555555u, idx16(kIdx.sub[(2 * c + 1) & 3]), z);
      __m512i lo[4], hi[4];
      for (int t = 0; t < 4; t++) {
        const __m512i v = load512(w + F::kQs + 64 * (4 * c + t));
        if constexpr (F::kHigh) {  // + 16 x bits 2c, 2c + 1 of the qh bytes
          const __m512i qh = load512(w + F::kQh + 64 * t);
          lo[t] = _mm512_ternarylogic_epi32(v, bit_to_16(qh, 2 * c), m8(0x0f), 0xec);  // (v & 0x0f) | bit
          hi[t] = _mm512_or_si512(high_nibbles(v), bit_to_16(qh, 2 * c + 1));
        } else {
          lo[t] = _mm512_and_si512(v, m8(0x0f));
          hi[t] = high_nibbles(v);
        }
      }
      // the product chains of 4 rows side by side, so that their latencies overlap
      constexpr int RG = NR < 4 ? NR : 4;
      // chunks per partial dot: |sum| of 4 * kRun q < 16 (< 32) x 127 < 2^15
      constexpr int kRun = F::kHigh ? 2 : 4;
      for (int i0 = 0; i0 < NR; i0 += RG) {
        __m512i a[RG], h[RG];
#pragma GCC unroll 4
        for (int t = 0; t < 4; t++) {
#pragma GCC unroll 8
          for (int k = 0; k < RG; k++) {
            if (i0 + k >= NR) break;
            const int8_t* q = act_row(x, xs, i0 + k)[b].qs + 64 * c + 8 * t;
            a[k] = _mm512_dpbusd_epi32(t % kRun ? a[k] : zero, lo[t], bq(q));
            h[k] = _mm512_dpbusd_epi32(t % kRun ? h[k] : zero, hi[t], bq(q + 32));
          }
          if (t % kRun != kRun - 1) continue;
          // |a|, |h| < 2^15: their low int16 halves are the sums, the high ones sign bits times 0
#pragma GCC unroll 8
          for (int k = 0; k < RG; k++) {
            if (i0 + k >= NR) break;
            isum[i0 + k] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(isum[i0 + k], a[k], sca), h[k], scb);
          }
        }
      }
    }
    // mn[c]: lane L = 2u + t, row u's min of sub-block 2c + t, twice
    const __m512i n03 = _mm512_cvtepu8_epi16(_mm256_and_si256(phi, c3f));
    const __m512i n47 = _mm512_cvtepu8_epi16(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(pq, 4), c0f),
                                                             _mm256_and_si256(_mm256_srli_epi16(phi, 2), c30)));
    __m512i mn[4];
    for (int c = 0; c < 4; c++) mn[c] = _mm512_permutexvar_epi16(idx16(kIdx.pair[c & 1]), c < 2 ? n03 : n47);
    const __m512 dB = rows_f16(w + F::kD), mB = rows_f16(w + F::kDmin);
#pragma GCC unroll 8
    for (int i = 0; i < NR; i++) {
      const cake_q8_256* xb = act_row(x, xs, i) + b;
      __m512i ms = _mm512_dpwssd_epi32(zero, bq(xb->bsums), mn[0]);
      for (int c = 1; c < 4; c++) ms = _mm512_dpwssd_epi32(ms, bq(xb->bsums + 4 * c), mn[c]);
      const __m512 t =
          _mm512_fnmadd_ps(_mm512_cvtepi32_ps(ms), mB, _mm512_mul_ps(_mm512_cvtepi32_ps(isum[i]), dB));
      _mm512_store_ps(acc[i], _mm512_fmadd_ps(t, _mm512_set1_ps(xb->d), _mm512_load_ps(acc[i])));
    }
  }
  for (int i = 0; i < NR; i++) store_rows(_mm512_load_ps(acc[i]), y + i * ys);
}

template <class F, int NR>
RK_NOINLINE void q6k_rows(int64_t nb, const uint8_t* w, const void* x, size_t xs, float* y, size_t ys) {
  __m512 acc[NR];
  for (int i = 0; i < NR; i++) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b++, w += Q6K::kGroup) {
    // z[c]: the scales of sub-blocks 4c .. 4c + 3 as int16 [s % 4][r]
    __m512i z[4];
    for (int c = 0; c < 4; c++)
      z[c] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + Q6K::kSc + 32 * c)));
    // below 4 rows, two chains of sums per row so that their latency does not bind
    constexpr int U = NR < 4 ? 2 : 1;
    __m512i isum[NR], isum2[NR];
    for (int i = 0; i < NR; i++) isum[i] = isum2[i] = _mm512_setzero_si512();
    for (int G = 0; G < 8; G++) {
      prefetch_part<Q6K::kGroup>(w, G, 8);
      // sub-blocks 2G, 2G + 1: lane L holds row L >> 1's scale, twice
      const __m512i sa = _mm512_permutexvar_epi16(idx16(kIdx.sub[(2 * G) & 3]), z[G / 2]);
      const __m512i sb = _mm512_permutexvar_epi16(idx16(kIdx.sub[(2 * G + 1) & 3]), z[G / 2]);
      const uint8_t* v = w + Q6K::kQ + 3 * 64 * G;
      const __m512i v0 = load512(v), v1 = load512(v + 64), v2 = load512(v + 128);
      const __m512i c0 = _mm512_and_si512(v0, m8(0x3f)), c1 = _mm512_and_si512(v1, m8(0x3f));
      const __m512i c2 = _mm512_and_si512(v2, m8(0x3f));
      const __m512i c3 = top_bits(v0, v1, v2);
#pragma GCC unroll 8
      for (int i = 0; i < NR; i++) {
        const int8_t* q = act_row(x, xs, i)[b].qs + 32 * G;
        const __m512i s0 = _mm512_add_epi16(_mm512_maddubs_epi16(c0, bq(q)), _mm512_maddubs_epi16(c1, bq(q + 8)));
        const __m512i s1 =
            _mm512_add_epi16(_mm512_maddubs_epi16(c2, bq(q + 16)), _mm512_maddubs_epi16(c3, bq(q + 24)));
        if (U == 2) {
          isum[i] = _mm512_dpwssd_epi32(isum[i], s0, sa);
          isum2[i] = _mm512_dpwssd_epi32(isum2[i], s1, sb);
        } else {
          isum[i] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(isum[i], s0, sa), s1, sb);
        }
      }
    }
    if (U == 2)
      for (int i = 0; i < NR; i++) isum[i] = _mm512_add_epi32(isum[i], isum2[i]);
    // mw[c]: lane L = 2u + t holds -32 x row u's scales of sub-blocks 4c + 2t, + 1
    __m512i mw[4];
    for (int c = 0; c < 4; c++)
      mw[c] = _mm512_mullo_epi16(_mm512_permutexvar_epi16(idx16(kIdx.q6_mw), z[c]), _mm512_set1_epi16(-32));
    const __m512 dB = rows_f16(w + Q6K::kD);
#pragma GCC unroll 8
    for (int i = 0; i < NR; i++) {
      const cake_q8_256* xb = act_row(x, xs, i) + b;
      __m512i s = isum[i];
      for (int c = 0; c < 4; c++) s = _mm512_dpwssd_epi32(s, bq(xb->bsums + 4 * c), mw[c]);
      acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s), dB), _mm512_set1_ps(xb->d), acc[i]);
    }
  }
  for (int i = 0; i < NR; i++) store_rows(acc[i], y + i * ys);
}

// Q3_K / Q2_K: bits 2j, 2j + 1 of each byte of v -> bits 0, 1 (GFNI: one op)
inline __m512i field2(__m512i v, int j) {
#if defined(__GFNI__)
  return _mm512_gf2p8affine_epi64_epi8(v, _mm512_set1_epi64((int64_t)(((1ull << (2 * j + 1)) << 48) |
                                                                       ((1ull << (2 * j)) << 56))),
                                       0);
#else
  return _mm512_and_si512(srl16(v, 2 * j), m8(0x03));
#endif
}
// bit k of each byte -> bit 2
inline __m512i bit_to_4(__m512i v, int k) {
#if defined(__GFNI__)
  return _mm512_gf2p8affine_epi64_epi8(v, _mm512_set1_epi64((int64_t)(1ull << k) << 40), 0);
#else
  const __m512i t = k <= 2 ? _mm512_slli_epi16(v, 2 - k) : _mm512_srli_epi16(v, k - 2);
  return _mm512_and_si512(t, m8(0x04));
#endif
}

// The 4 chunks 4G .. 4G + 3 of a Q3_K / Q2_K group (quants < 8 / < 4).
inline void chunks(const Q3K*, const uint8_t* w, int G, __m512i c[4]) {
  const int h = G / 4, j = G % 4;
  for (int t = 0; t < 4; t++)
    c[t] = _mm512_or_si512(field2(load512(w + Q3K::kL + 64 * (4 * h + t)), j),
                           bit_to_4(load512(w + Q3K::kH + 64 * t), 4 * h + j));
}
inline void chunks(const Q2K*, const uint8_t* w, int G, __m512i c[4]) {
  for (int t = 0; t < 4; t++) c[t] = field2(load512(w + Q2K::kL + 64 * (4 * (G / 4) + t)), G % 4);
}

// The scales of sub-blocks 4c .. 4c + 3 as int16 [s % 4][r] (z), Q2_K's mins too (zm).
inline void scales16(const Q3K*, const uint8_t* w, __m512i z[4], __m512i*) {
  const __m256i a = _mm256_loadu_si256((const __m256i*)(w + Q3K::kSc));  // bytes 0..3, [i][r]
  const __m256i b = _mm256_loadu_si256((const __m256i*)(w + Q3K::kSc + 32));
  const __m256i c = _mm256_loadu_si256((const __m256i*)(w + Q3K::kSc + 64));
  const __m256i f = _mm256_set1_epi8(0x0f), t = _mm256_set1_epi8(0x30);
  const __m256i s[4] = {
      _mm256_or_si256(_mm256_and_si256(a, f), _mm256_and_si256(_mm256_slli_epi16(c, 4), t)),
      _mm256_or_si256(_mm256_and_si256(b, f), _mm256_and_si256(_mm256_slli_epi16(c, 2), t)),
      _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), f), _mm256_and_si256(c, t)),
      _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b, 4), f), _mm256_and_si256(_mm256_srli_epi16(c, 2), t))};
  for (int q = 0; q < 4; q++) z[q] = _mm512_sub_epi16(_mm512_cvtepu8_epi16(s[q]), _mm512_set1_epi16(32));
}
inline void scales16(const Q2K*, const uint8_t* w, __m512i z[4], __m512i* zm) {
  for (int q = 0; q < 4; q++) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)(w + Q2K::kSc + 32 * q));
    z[q] = _mm512_cvtepu8_epi16(_mm256_and_si256(v, _mm256_set1_epi8(0x0f)));
    zm[q] = _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0f)));
  }
}

// Q3_K and Q2_K: the 4 paired chunks of a group put one sub-block of 16 in
// each int32 lane (lanes 2r, 2r + 1: row r's sub-blocks 2G, 2G + 1), |dot| <=
// 16 x 7 x 127 < 2^15, scaled by one vpdpwssd with (scale, 0): 32 + 8 + 4
// products per block and activation row. Q3_K's -4 scale bsums join the
// sums, Q2_K's mins are summed apart (dmin).
template <class F, int NR>
RK_NOINLINE void k16_rows(int64_t nb, const uint8_t* w, const void* x, size_t xs, float* y, size_t ys) {
  constexpr bool kMin = F::kOff == 0;
  __m512 acc[NR];
  for (int i = 0; i < NR; i++) acc[i] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t b = 0; b < nb; b++, w += F::kGroup) {
    __m512i z[4], zm[4];
    scales16((const F*)nullptr, w, z, zm);
    // below 4 rows, two chains of sums per row so that their latency does not bind
    constexpr int U = NR < 4 ? 2 : 1;
    __m512i isum[NR], isum2[NR];
    for (int i = 0; i < NR; i++) isum[i] = isum2[i] = zero;
    for (int G = 0; G < 8; G++) {
      prefetch_part<F::kGroup>(w, G, 8);
      // int16 pairs: lane L = 2u + t (row u, sub-block 2G + t): (scale, 0)
      const __m512i sab = _mm512_maskz_permutexvar_epi16(0x55555555u, idx16(kIdx.pair[G & 1]), z[G / 2]);
      __m512i c[4];
      chunks((const F*)nullptr, w, G, c);
      if constexpr (U == 2) {  // two short chains: the latency of one row's products binds below 4 rows
#pragma GCC unroll 8
        for (int i = 0; i < NR; i++) {
          const int8_t* q = act_row(x, xs, i)[b].qs + 32 * G;
          const __m512i p =
              _mm512_add_epi32(_mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, c[0], bq(q)), c[1], bq(q + 8)),
                               _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, c[2], bq(q + 16)), c[3], bq(q + 24)));
          if (G % 2)
            isum2[i] = _mm512_dpwssd_epi32(isum2[i], p, sab);
          else
            isum[i] = _mm512_dpwssd_epi32(isum[i], p, sab);
        }
      } else {  // the rows' product chains side by side, so that their latencies overlap
        __m512i p[NR];
#pragma GCC unroll 4
        for (int t = 0; t < 4; t++)
#pragma GCC unroll 8
          for (int i = 0; i < NR; i++)
            p[i] = _mm512_dpbusd_epi32(t ? p[i] : zero, c[t], bq(act_row(x, xs, i)[b].qs + 32 * G + 8 * t));
#pragma GCC unroll 8
        for (int i = 0; i < NR; i++) isum[i] = _mm512_dpwssd_epi32(isum[i], p[i], sab);
      }
    }
    if (U == 2)
      for (int i = 0; i < NR; i++) isum[i] = _mm512_add_epi32(isum[i], isum2[i]);
    // mw[c]: lane L = 2u + t holds row u's Q2_K mins / Q3_K -4 x scales of
    // sub-blocks 4c + 2t, + 1
    __m512i mw[4];
    for (int c = 0; c < 4; c++) {
      mw[c] = _mm512_permutexvar_epi16(idx16(kIdx.q6_mw), kMin ? zm[c] : z[c]);
      if (!kMin) mw[c] = _mm512_slli_epi16(_mm512_sub_epi16(zero, mw[c]), 2);
    }
    const __m512 dB = rows_f16(w + F::kD);
#pragma GCC unroll 8
    for (int i = 0; i < NR; i++) {
      const cake_q8_256* xb = act_row(x, xs, i) + b;
      __m512 t;
      if constexpr (kMin) {
        __m512i ms = _mm512_dpwssd_epi32(zero, bq(xb->bsums), mw[0]);
        for (int c = 1; c < 4; c++) ms = _mm512_dpwssd_epi32(ms, bq(xb->bsums + 4 * c), mw[c]);
        t = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(ms), rows_f16(w + Q2K::kDmin),
                             _mm512_mul_ps(_mm512_cvtepi32_ps(isum[i]), dB));
      } else {
        __m512i s = isum[i];
        for (int c = 0; c < 4; c++) s = _mm512_dpwssd_epi32(s, bq(xb->bsums + 4 * c), mw[c]);
        t = _mm512_mul_ps(_mm512_cvtepi32_ps(s), dB);
      }
      acc[i] = _mm512_fmadd_ps(t, _mm512_set1_ps(xb->d), acc[i]);
    }
  }
  for (int i = 0; i < NR; i++) store_rows(acc[i], y + i * ys);
}

#elif CAKE_AVX2
// Rows 0..3 and 4..7 in turn (half h: bytes 32h .. 32h + 31 of each vector):
// int32 lane L of a 256-bit chunk is row 4h + (L >> 1).
constexpr int kMaxRows = 4;

inline __m256i bq(const void* p) {
  int64_t v;
  memcpy(&v, p, 8);
  return _mm256_set1_epi64x(v);
}
inline __m256i m8(int v) { return _mm256_set1_epi8((char)v); }
inline __m256i srl16(__m256i v, int n) { return _mm256_srli_epi16(v, n); }
inline __m256i load256(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }

// the half's 4 float16 at p (8 rows) in lanes L -> row 4h + (L >> 1)
inline __m256 half_f16(const uint8_t* p, int h) {
  const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
  return _mm256_permutevar8x32_ps(v, _mm256_add_epi32(_mm256_set1_epi32(4 * h),
                                                      _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)));
}

// y[u] = lanes 2u + 2u + 1 (u < 4)
inline void store_half(__m256 acc, float* y) {
  const __m256 s = _mm256_hadd_ps(acc, acc);  // [a0+a1 a2+a3 . . | a4+a5 a6+a7 . .]
  const __m128 lo = _mm256_castps256_ps128(s), hi = _mm256_extractf128_ps(s, 1);
  _mm_storeu_ps(y, _mm_castpd_ps(_mm_unpacklo_pd(_mm_castps_pd(lo), _mm_castps_pd(hi))));
}

// pshufb indices into 8 rows' bytes [r] (pair: two such, [t][r]) picking for
// int16 w row 4h + (w >> 2) (pair: of the t = (w >> 1) & 1 one)
inline __m128i half_bytes(int h, bool pair) {
  alignas(16) int8_t idx[16];
  for (int w = 0; w < 16; w++) idx[w] = (int8_t)((pair ? 8 * ((w >> 1) & 1) : 0) + 4 * h + (w >> 2));
  return _mm_load_si128((const __m128i*)idx);
}

template <class F, int NR>
RK_NOINLINE void q45k_rows(int64_t nb, const uint8_t* w0, const void* x, size_t xs, float* y, size_t ys) {
  for (int h = 0; h < 2; h++) {
    const __m128i pick = half_bytes(h, false), pick2 = half_bytes(h, true);
    __m256 acc[NR];
    for (int i = 0; i < NR; i++) acc[i] = _mm256_setzero_ps();
    const uint8_t* w = w0;
    for (int64_t b = 0; b < nb; b++, w += F::kGroup) {
      alignas(32) uint8_t scb[64], mnb[64];
      {
        const __m256i plo = load256(w + F::kSc), phi = load256(w + F::kSc + 32);
        const __m256i pq = load256(w + F::kSc + 64);
        _mm256_store_si256((__m256i*)scb, _mm256_and_si256(plo, m8(0x3f)));
        _mm256_store_si256((__m256i*)mnb, _mm256_and_si256(phi, m8(0x3f)));
        _mm256_store_si256((__m256i*)(scb + 32),
                           _mm256_or_si256(_mm256_and_si256(pq, m8(0x0f)), _mm256_and_si256(srl16(plo, 2), m8(0x30))));
        _mm256_store_si256((__m256i*)(mnb + 32), _mm256_or_si256(_mm256_and_si256(srl16(pq, 4), m8(0x0f)),
                                                                 _mm256_and_si256(srl16(phi, 2), m8(0x30))));
      }
      // sc[j]: int16 w = row 4h + (w >> 2)'s scale of sub-block j; mn[c]: lane
      // L = 2u + t, row 4h + u's min of sub-block 2c + t
      __m256i sc[8], mn[4];
      for (int j = 0; j < 8; j++)
        sc[j] = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(_mm_loadl_epi64((const __m128i*)(scb + 8 * j)), pick));
      for (int c = 0; c < 4; c++)
        mn[c] = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(_mm_load_si128((const __m128i*)(mnb + 16 * c)), pick2));
      __m256i isum[NR];
      for (int i = 0; i < NR; i++) isum[i] = _mm256_setzero_si256();
      for (int j = 0; j < 8; j++) {
        if (h == 0) prefetch_part<F::kGroup>(w, j, 8);
        __m256i q4[4];
        for (int t = 0; t < 4; t++) {
          const __m256i v = load256(w + F::kQs + 64 * (4 * (j / 2) + t) + 32 * h);
          q4[t] = _mm256_and_si256(j & 1 ? srl16(v, 4) : v, m8(0x0f));
          if constexpr (F::kHigh) {  // + 16 x bit j of the qh bytes
            const __m256i qh = load256(w + F::kQh + 64 * t + 32 * h);
            const __m256i b = j <= 4 ? _mm256_slli_epi16(qh, 4 - j) : srl16(qh, j - 4);
            q4[t] = _mm256_or_si256(q4[t], _mm256_and_si256(b, m8(0x10)));
          }
        }
        for (int i = 0; i < NR; i++) {
          const int8_t* q = act_row(x, xs, i)[b].qs + 32 * j;
          __m256i s = _mm256_maddubs_epi16(q4[0], bq(q));  // int16 sums of 8 products: < 8 x 32 x 127 < 2^15
          for (int t = 1; t < 4; t++) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(q4[t], bq(q + 8 * t)));
          isum[i] = _mm256_add_epi32(isum[i], _mm256_madd_epi16(s, sc[j]));
        }
      }
      const __m256 dA = half_f16(w + F::kD, h), mA = half_f16(w + F::kDmin, h);
      for (int i = 0; i < NR; i++) {
        const cake_q8_256* xb = act_row(x, xs, i) + b;
        __m256i ms = _mm256_madd_epi16(bq(xb->bsums), mn[0]);
        for (int c = 1; c < 4; c++) ms = _mm256_add_epi32(ms, _mm256_madd_epi16(bq(xb->bsums + 4 * c), mn[c]));
        const __m256 t =
            _mm256_fnmadd_ps(_mm256_cvtepi32_ps(ms), mA, _mm256_mul_ps(_mm256_cvtepi32_ps(isum[i]), dA));
        acc[i] = _mm256_fmadd_ps(t, _mm256_set1_ps(xb->d), acc[i]);
      }
    }
    for (int i = 0; i < NR; i++) store_half(acc[i], y + i * ys + 4 * h);
  }
}

// The 16-element-sub-block formats: the half's 4 chunks 4G .. 4G + 3 (q < 64)
inline void half_chunks(const Q6K*, const uint8_t* w, int G, int h, __m256i c[4]) {
  const uint8_t* v = w + Q6K::kQ + 3 * 64 * G + 32 * h;
  const __m256i v0 = load256(v), v1 = load256(v + 64), v2 = load256(v + 128);
  c[0] = _mm256_and_si256(v0, m8(0x3f));
  c[1] = _mm256_and_si256(v1, m8(0x3f));
  c[2] = _mm256_and_si256(v2, m8(0x3f));
  c[3] = _mm256_or_si256(
      _mm256_or_si256(_mm256_and_si256(srl16(v0, 6), m8(0x03)), _mm256_and_si256(srl16(v1, 4), m8(0x0c))),
      _mm256_and_si256(srl16(v2, 2), m8(0x30)));
}
inline void half_chunks(const Q3K*, const uint8_t* w, int G, int h2, __m256i c[4]) {
  const int h = G / 4, j = G % 4;
  for (int t = 0; t < 4; t++) {
    const __m256i lo = load256(w + Q3K::kL + 64 * (4 * h + t) + 32 * h2), hb = load256(w + Q3K::kH + 64 * t + 32 * h2);
    const int k = 4 * h + j;  // hmask bit -> bit 2
    const __m256i hi = k <= 2 ? _mm256_slli_epi16(hb, 2 - k) : srl16(hb, k - 2);
    c[t] = _mm256_or_si256(_mm256_and_si256(srl16(lo, 2 * j), m8(0x03)), _mm256_and_si256(hi, m8(0x04)));
  }
}
inline void half_chunks(const Q2K*, const uint8_t* w, int G, int h2, __m256i c[4]) {
  for (int t = 0; t < 4; t++)
    c[t] = _mm256_and_si256(srl16(load256(w + Q2K::kL + 64 * (4 * (G / 4) + t) + 32 * h2), 2 * (G % 4)), m8(0x03));
}

// The rows' int8 scales [s][r] (128 bytes) for sub-blocks s of 16, Q2_K's mins too.
inline const uint8_t* scale_bytes(const Q6K*, const uint8_t* w, uint8_t*, uint8_t*) { return w + Q6K::kSc; }
inline const uint8_t* scale_bytes(const Q3K*, const uint8_t* w, uint8_t* buf, uint8_t*) {
  const __m256i a = load256(w + Q3K::kSc), b = load256(w + Q3K::kSc + 32), c = load256(w + Q3K::kSc + 64);
  const __m256i f = m8(0x0f), t = m8(0x30), k32 = m8(32);
  const __m256i s[4] = {
      _mm256_or_si256(_mm256_and_si256(a, f), _mm256_and_si256(_mm256_slli_epi16(c, 4), t)),
      _mm256_or_si256(_mm256_and_si256(b, f), _mm256_and_si256(_mm256_slli_epi16(c, 2), t)),
      _mm256_or_si256(_mm256_and_si256(srl16(a, 4), f), _mm256_and_si256(c, t)),
      _mm256_or_si256(_mm256_and_si256(srl16(b, 4), f), _mm256_and_si256(srl16(c, 2), t))};
  for (int q = 0; q < 4; q++) _mm256_store_si256((__m256i*)(buf + 32 * q), _mm256_sub_epi8(s[q], k32));
  return buf;
}
inline const uint8_t* scale_bytes(const Q2K*, const uint8_t* w, uint8_t* buf, uint8_t* mins) {
  for (int q = 0; q < 4; q++) {
    const __m256i v = load256(w + Q2K::kSc + 32 * q);
    _mm256_store_si256((__m256i*)(buf + 32 * q), _mm256_and_si256(v, m8(0x0f)));
    _mm256_store_si256((__m256i*)(mins + 32 * q), _mm256_and_si256(srl16(v, 4), m8(0x0f)));
  }
  return buf;
}

// Q6_K, Q3_K, Q2_K: vpmaddubsw of the 2 chunks of a sub-block of 16, summed in
// int16 (|sum| <= 4 x 63 x 127), vpmaddwd with the rows' scales (Q3_K, Q2_K:
// the 4 paired chunks of two sub-blocks summed in int16, |sum| <= 8 x 7 x 127,
// one vpmaddwd); the offset (-32 or -4 scale bsums) joins the int32 sums,
// Q2_K's mins are summed apart.
template <class F, int NR>
RK_NOINLINE void k16x_rows(int64_t nb, const uint8_t* w0, const void* x, size_t xs, float* y, size_t ys) {
  constexpr bool kMin = F::kOff == 0;
  for (int h = 0; h < 2; h++) {
    const __m128i pick = half_bytes(h, false);
    __m256 acc[NR];
    for (int i = 0; i < NR; i++) acc[i] = _mm256_setzero_ps();
    const uint8_t* w = w0;
    for (int64_t b = 0; b < nb; b++, w += F::kGroup) {
      alignas(32) uint8_t buf[128], mins[128];
      const uint8_t* scb = scale_bytes((const F*)nullptr, w, buf, mins);
      // sc[s]: int16 w = row 4h + (w >> 2)'s scale of sub-block s; mw[c]: lane
      // L = 2u + t, row 4h + u's -off x scales (Q2_K: mins) of sub-blocks 4c + 2t, + 1
      __m256i sc[16], mw[4];
      for (int s = 0; s < 16; s++)
        sc[s] = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(_mm_loadl_epi64((const __m128i*)(scb + 8 * s)), pick));
      for (int c = 0; c < 4; c++) {
        __m256i m4[4];
        for (int k = 0; k < 4; k++)
          m4[k] = kMin ? _mm256_cvtepu8_epi16(
                             _mm_shuffle_epi8(_mm_loadl_epi64((const __m128i*)(mins + 8 * (4 * c + k))), pick))
                       : sc[4 * c + k];
        __m256i t = _mm256_blend_epi16(m4[0], m4[1], 0x22);
        t = _mm256_blend_epi16(t, m4[2], 0x44);
        t = _mm256_blend_epi16(t, m4[3], 0x88);
        mw[c] = kMin ? t : _mm256_mullo_epi16(t, _mm256_set1_epi16((int16_t)-F::kOff));
      }
      __m256i isum[NR];
      for (int i = 0; i < NR; i++) isum[i] = _mm256_setzero_si256();
      for (int G = 0; G < 8; G++) {
        if (h == 0) prefetch_part<F::kGroup>(w, G, 8);
        __m256i c[4];
        half_chunks((const F*)nullptr, w, G, h, c);
        // paired chunks (Q3_K, Q2_K): int16 w holds sub-block 2G + ((w >> 1) & 1)
        const __m256i sp = _mm256_blend_epi16(sc[2 * G], sc[2 * G + 1], 0xCC);
        for (int i = 0; i < NR; i++) {
          const int8_t* q = act_row(x, xs, i)[b].qs + 32 * G;
          const __m256i s0 =
              _mm256_add_epi16(_mm256_maddubs_epi16(c[0], bq(q)), _mm256_maddubs_epi16(c[1], bq(q + 8)));
          const __m256i s1 =
              _mm256_add_epi16(_mm256_maddubs_epi16(c[2], bq(q + 16)), _mm256_maddubs_epi16(c[3], bq(q + 24)));
          if constexpr (F::kKind == 2)
            isum[i] = _mm256_add_epi32(isum[i], _mm256_madd_epi16(_mm256_add_epi16(s0, s1), sp));
          else
            isum[i] = _mm256_add_epi32(
                isum[i], _mm256_add_epi32(_mm256_madd_epi16(s0, sc[2 * G]), _mm256_madd_epi16(s1, sc[2 * G + 1])));
        }
      }
      const __m256 dB = half_f16(w + F::kD, h);
      for (int i = 0; i < NR; i++) {
        const cake_q8_256* xb = act_row(x, xs, i) + b;
        __m256i s = kMin ? _mm256_setzero_si256() : isum[i];
        for (int c = 0; c < 4; c++) s = _mm256_add_epi32(s, _mm256_madd_epi16(bq(xb->bsums + 4 * c), mw[c]));
        __m256 t;
        if constexpr (kMin)
          t = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(s), half_f16(w + Q2K::kDmin, h),
                               _mm256_mul_ps(_mm256_cvtepi32_ps(isum[i]), dB));
        else
          t = _mm256_mul_ps(_mm256_cvtepi32_ps(s), dB);
        acc[i] = _mm256_fmadd_ps(t, _mm256_set1_ps(xb->d), acc[i]);
      }
    }
    for (int i = 0; i < NR; i++) store_half(acc[i], y + i * ys + 4 * h);
  }
}

template <class F, int NR>
void q6k_rows(int64_t nb, const uint8_t* w, const void* x, size_t xs, float* y, size_t ys) {
  k16x_rows<F, NR>(nb, w, x, xs, y, ys);
}
template <class F, int NR>
void k16_rows(int64_t nb, const uint8_t* w, const void* x, size_t xs, float* y, size_t ys) {
  k16x_rows<F, NR>(nb, w, x, xs, y, ys);
}
#else
constexpr int kMaxRows = 4;
#endif

#if !CAKE_K512 && !CAKE_AVX2
// Each row's plain block decoded, then the integer dots of kquants.cc's scalar path.
template <class F, int NR>
void scalar_rows(int64_t nb, const uint8_t* w, const void* x, size_t xs, float* y, size_t ys) {
  float acc[NR][kR] = {};
  Decoded d[kR];
  for (int64_t b = 0; b < nb; b++, w += F::kGroup) {
    for (int r = 0; r < kR; r++) F::decode(w, r, d[r]);
    for (int i = 0; i < NR; i++) {
      const cake_q8_256* xb = act_row(x, xs, i) + b;
      for (int r = 0; r < kR; r++) {
        const int8_t* q = (const int8_t*)d[r].q;  // < 64: s8 x s8 dots
        int32_t s = 0, m = 0;
        for (int g = 0; g < 16; g++) {
          int32_t t = 0;
          for (int j = 0; j < 16; j++) t += q[16 * g + j] * xb->qs[16 * g + j];
          s += d[r].s[g] * t;
          m += d[r].m[g] * xb->bsums[g];
        }
        if (F::kOff)
          acc[i][r] += xb->d * d[r].dA * (float)(s - m);
        else
          acc[i][r] += xb->d * (d[r].dA * (float)s - d[r].dB * (float)m);
      }
    }
  }
  for (int i = 0; i < NR; i++)
    for (int r = 0; r < kR; r++) y[i * ys + r] = acc[i][r];
}
#endif

template <class F, int NR>
void rows(int64_t nb, const uint8_t* w, const void* x, size_t xs, float* y, size_t ys) {
#if CAKE_K512 || CAKE_AVX2
  if constexpr (F::kKind == 0)
    q45k_rows<F, NR>(nb, w, x, xs, y, ys);
  else if constexpr (F::kKind == 1)
    q6k_rows<F, NR>(nb, w, x, xs, y, ys);
  else
    k16_rows<F, NR>(nb, w, x, xs, y, ys);
#else
  scalar_rows<F, NR>(nb, w, x, xs, y, ys);
#endif
}

template <class F>
void gemm(int64_t k, const void* w, int64_t ntiles, const void* x, size_t xs, int nrows, float* y, size_t ys) {
  const size_t tile_bytes = (size_t)(k / kQK) * F::kGroup;
  for (int64_t t = 0; t < ntiles; t++)
    cake_tiles::gemm<kMaxRows>(nrows, x, xs, y + kR * t, ys, [&](auto nr, const void* xt, float* yt) {
      rows<F, decltype(nr)::value>(k / kQK, (const uint8_t*)w + t * tile_bytes, xt, xs, yt, ys);
    });
}

// Paired chunks' activation order (Q2K, Q3K): each group of 32 qs as paired chunks
// 0..3. The scalar path decodes the weights back to the plain order instead.
void arrange_paired(void* x, int64_t k) {
  cake_q8_256* row = (cake_q8_256*)x;
  for (int64_t b = 0; b < k / kQK; b++)
    for (int G = 0; G < kQK / 32; G++) {
      int8_t* q = row[b].qs + 32 * G;
      int8_t plain[32];
      memcpy(plain, q, 32);
      for (int t = 0; t < 4; t++) paired_copy((uint8_t*)q + 8 * t, (const uint8_t*)plain, t);
    }
}
#if CAKE_K512 || CAKE_AVX2
constexpr void (*kPairedActs)(void*, int64_t) = arrange_paired;
#else
constexpr void (*kPairedActs)(void*, int64_t) = nullptr;
#endif

}  // namespace

// s_scale is unused with cake_q8_256 activations (1: the driver leaves them be)
const cake_tile_kernels cake_r8_q2_k = {Q2K::kGroup, 1.0f, gemm<Q2K>, dequant_tile<Q2K>, repack_tile<Q2K>, 8, 2, 1, 1,
                                        kPairedActs};
const cake_tile_kernels cake_r8_q3_k = {Q3K::kGroup, 1.0f, gemm<Q3K>, dequant_tile<Q3K>, repack_tile<Q3K>, 8, 2, 1, 1,
                                        kPairedActs};
const cake_tile_kernels cake_r8_q4_k = {Q4K::kGroup, 1.0f, gemm<Q4K>, dequant_tile<Q4K>, repack_tile<Q4K>, 8, 2, 1, 1};
const cake_tile_kernels cake_r8_q5_k = {Q5K::kGroup, 1.0f, gemm<Q5K>, dequant_tile<Q5K>, repack_tile<Q5K>, 8, 2, 1, 1};
const cake_tile_kernels cake_r8_q6_k = {Q6K::kGroup, 1.0f, gemm<Q6K>, dequant_tile<Q6K>, repack_tile<Q6K>, 8, 2, 1, 1};
