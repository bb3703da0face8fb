// Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 repacked at load time into tiles of 8 weight
// rows ("Q4_0R8" ...), and their GEMM against cake_q8_32 activations.
//
// The per-row kernels (legacy.cc) spend ~5 vector ops per (block, weight row,
// activation row): product, conversion, scale multiplies, accumulation. Here
// one 256-bit register holds 4 consecutive elements of each of 8 weight rows
// (int32 lane r = row r), so one u8 x s8 product against 4 broadcast activation
// bytes gives partial dots of all 8 rows; after a block the 8 lanes are whole
// block dots, scaled by one FMA with the vector of the 8 rows' scales.
//
// A repacked matrix has the plain one's bytes, reordered: N / 8 tiles, each
// K / 32 groups, group b holding block b of the tile's rows 0..7. Tiles 2p
// and 2p + 1 are stored as one unit of group pairs where the 512-bit kernel
// is built (interleave 2, qdot.h; elsewhere tiles one after another): group b
// of tile 2p, then group b of tile 2p + 1, then group b + 1 of each, so that
// the kernel reads a pair of tiles as one forward stream; an odd last tile is
// stored alone, its groups one after another. A group:
//   d[8]   float16, row r's scale                                    16 bytes
//   m[8]   Q4_1 / Q5_1 only, float16, row r's min                    16 bytes
//   h[8]   Q5_0 / Q5_1 only, uint32: bit 4r + t of h[c] = high bit
//          of element 4c + t of row r                                32 bytes
//   qs     Q8_0: 8 chunks c of 32 bytes, bytes 4r .. 4r + 3 of chunk c =
//          elements 4c .. 4c + 3 of row r (int8)                    256 bytes
//          4- and 5-bit: 4 chunks v of 32 bytes, bytes 4r .. 4r + 3 of
//          chunk v = bytes 4v .. 4v + 3 of row r's qs (low nibble
//          element 4v + t, high nibble element 16 + 4v + t)         128 bytes
// So chunk c (0 .. 7) of element values always covers elements 4c .. 4c + 3:
// 4- and 5-bit chunks 0 .. 3 are the low nibbles, 4 .. 7 the high ones.
//
// The products take unsigned weights: the 4- and 5-bit formats their stored q
// (value d (q - Z) with Z = 8 / 16, or d q + m), Q8_0 q + 128 (Z = 128) with
// VNNI, which does not saturate. The -Z d_w s_x term is folded in by
// multiplying the activations' s = d_x sum q_x by -Z once per call (s_scale
// below), so a block costs per activation row: 8 products, one conversion, two
// FMAs (the min formats: one more, m s_x). Plain AVX2's vpmaddubsw saturates at
// (q + 128) q_x, so there Q8_0 multiplies |q| x sign(q_x, q) and needs no s
// (s_scale 0).
//
// With AVX-512 VNNI the two tiles of a unit are taken at once (gemm_pair):
// chunk c of both in one zmm, so a broadcast and the per-row tail serve 16
// weight rows, with the same operations lane by lane (the same bits as one
// tile at a time, which the AVX2 and plain builds do).
#include <string.h>

#include "qdot.h"
#include "simd.h"

// the two-tile path wants the EVEX vpdpbusd on zmm
#if CAKE_AVX512 && CAKE_VNNI && defined(__AVX512VNNI__)
#define CAKE_R512 1
#endif

namespace {

constexpr int kR = 8;  // weight rows per tile

inline float load_f16(const uint8_t* p) {
  uint16_t h;
  memcpy(&h, p, 2);
  return cake_f16_to_f32(h);
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}

// ---- formats: plain block bytes, group bytes, repack and decode ------------
// repack(src, stride, g): the 8 rows' block at src + r * stride -> group g.
// decode(g, r, q): row r's 32 values as ints, value_j = d_r * q_j.

// kZ: the zero point the stored q carry (value d (q - kZ) + m); kMin: a min m.
struct Q8_0 {
  static constexpr int kBytes = 34, kGroup = 16 + 256, kZ = 0, kM = 0;
  static constexpr int kQMax = 128;  // the largest unsigned weight a product takes (AVX2: |q|)
  static constexpr bool kMin = false;
  static void repack(const uint8_t* src, size_t stride, uint8_t* g) {
    for (int r = 0; r < kR; r++)
      for (int c = 0; c < 8; c++) memcpy(g + 16 + 32 * c + 4 * r, src + r * stride + 2 + 4 * c, 4);
  }
  static void decode(const uint8_t* g, int r, int q[32]) {
    for (int c = 0; c < 8; c++)
      for (int t = 0; t < 4; t++) q[4 * c + t] = (int8_t)g[16 + 32 * c + 4 * r + t];
  }
};

// The 4- and 5-bit formats: kMin_ (Q4_1, Q5_1: a float16 min after d), kHigh
// (Q5_0, Q5_1: uint32 qh of high bits before qs).
template <bool kMin_, bool kHigh>
struct Nibbles {
  static constexpr bool kMin = kMin_;
  static constexpr int kBytes = 18 + 2 * kMin + 4 * kHigh, kGroup = kR * kBytes;
  static constexpr int kZ = kMin ? 0 : kHigh ? 16 : 8;
  static constexpr int kQMax = kHigh ? 31 : 15;
  // offsets: plain block (qh, qs), group (m, h, qs)
  static constexpr int kPlainQh = 2 + 2 * kMin, kPlainQs = kPlainQh + 4 * kHigh;
  static constexpr int kM = 16, kH = 16 + 16 * kMin, kQs = kH + 32 * kHigh;

  static void repack(const uint8_t* src, size_t stride, uint8_t* g) {
    for (int r = 0; r < kR; r++) {
      if (kMin) memcpy(g + kM + 2 * r, src + r * stride + 2, 2);
      for (int v = 0; v < 4; v++) memcpy(g + kQs + 32 * v + 4 * r, src + r * stride + kPlainQs + 4 * v, 4);
    }
    if (kHigh)
      for (int c = 0; c < 8; c++) {
        uint32_t h = 0;
        for (int r = 0; r < kR; r++) h |= ((load_u32(src + r * stride + kPlainQh) >> (4 * c)) & 0xf) << (4 * r);
        memcpy(g + kH + 4 * c, &h, 4);
      }
  }
  static void decode(const uint8_t* g, int r, int q[32]) {
    for (int v = 0; v < 4; v++) {
      uint32_t lo = 0, hi = 0;
      if (kHigh) {
        lo = load_u32(g + kH + 4 * v) >> (4 * r);
        hi = load_u32(g + kH + 4 * (v + 4)) >> (4 * r);
      }
      for (int t = 0; t < 4; t++) {
        const uint8_t b = g[kQs + 32 * v + 4 * r + t];
        q[4 * v + t] = ((b & 0xf) | (((lo >> t) & 1) << 4)) - kZ;
        q[16 + 4 * v + t] = ((b >> 4) | (((hi >> t) & 1) << 4)) - kZ;
      }
    }
  }
};

using Q4_0 = Nibbles<false, false>;
using Q4_1 = Nibbles<true, false>;
using Q5_0 = Nibbles<false, true>;
using Q5_1 = Nibbles<true, true>;

template <class F>
void repack_tile(int64_t k, const void* w, size_t stride, void* out) {
  const uint8_t* src = (const uint8_t*)w;
  uint8_t* g = (uint8_t*)out;
  for (int64_t b = 0; b < k / 32; b++, src += F::kBytes, g += F::kGroup) {
    for (int r = 0; r < kR; r++) memcpy(g + 2 * r, src + r * stride, 2);
    F::repack(src, stride, g);
  }
}

template <class F>
void dequant_tile_scalar(int64_t k, const void* w, float* out) {
  const uint8_t* g = (const uint8_t*)w;
  int q[32];
  for (int64_t b = 0; b < k / 32; b++, g += F::kGroup)
    for (int r = 0; r < kR; r++) {
      const float d = load_f16(g + 2 * r);
      float* o = out + r * k + 32 * b;
      F::decode(g, r, q);
      if constexpr (F::kMin) {
        const float m = load_f16(g + F::kM + 2 * r);
        for (int j = 0; j < 32; j++) o[j] = d * (float)q[j] + m;
      } else {
        for (int j = 0; j < 32; j++) o[j] = d * (float)q[j];
      }
    }
}

// ---- GEMM: one tile x NR activation rows, y[i * ys + r] ---------------------

#if CAKE_AVX2
// chunk vectors for the products, unsigned (see the top of the file)
template <class F>
struct Simd;

// The bytes a block reads, kPrefetch ahead of pos, towards L1. A thread's tiles
// are contiguous and read in order (a pair of tiles: both at once), so pos is
// how far it has read. Without it 8 activation rows wait on the weights: under
// ~50 cycles of products per block few lines are in flight, and the hardware
// prefetchers do not make up for it here. SmolLM2 Q4_1 decode, matmul time per
// step on 2 threads, M = 1 / M = 8: none 4.0-4.6 / 7.4-8.3 ms, 4 KB ahead
// 3.3-4.0 / 5.5-6.1 ms (2 to 16 KB ahead, T0 to T2: the same within noise).
// A unit of two tiles (gemm_pair) is one stream of group pairs, prefetched
// kPrefetchPair ahead (4-16 KB: the same within noise, Zen 5).
// Non-temporal (NTA): a weight is read once per step, and filling L2 with it
// pushed out what is read again (activations, the cache rows, the pool's
// lines). SmolLM2 decode step at B = 1, min over ~1500 steps, 3 alternating
// processes each, T0 / NTA: Q4_1 2.98-3.24 / 2.41-2.97 ms, Q4_K_M 3.15-3.79 /
// 2.79-3.07 ms.
constexpr size_t kPrefetch = 4096, kPrefetchPair = 8192;
template <int kBytes, size_t kAhead = kPrefetch>
inline void prefetch_ahead(const uint8_t* pos) {
  for (int j = 0; j < kBytes; j += 64) _mm_prefetch((const char*)pos + kAhead + j, _MM_HINT_NTA);
}

inline __m256i nib_lo(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0xf)); }
inline __m256i nib_hi(__m256i v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0xf)); }
inline __m256i load256(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }

inline __m256i or_high_bits(__m256i lo, uint32_t h) {  // lo | 0x10 in each byte j with bit j of h
#if CAKE_AVX512
  return _mm256_mask_add_epi8(lo, (__mmask32)h, lo, _mm256_set1_epi8(0x10));
#else
  const __m256i bytes = _mm256_shuffle_epi8(
      _mm256_set1_epi32((int)h),
      _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
  const __m256i bit = _mm256_set1_epi64x((int64_t)0x8040201008040201);
  return _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit),
                                              _mm256_set1_epi8(0x10)));
#endif
}

template <>
struct Simd<Q8_0> {
#if CAKE_VNNI
  static constexpr float kSScale = -128.0f;
  static void unpack(const uint8_t* g, __m256i wq[8]) {
    for (int c = 0; c < 8; c++) wq[c] = _mm256_xor_si256(load256(g + 16 + 32 * c), _mm256_set1_epi8((char)0x80));
  }
  static __m256i signed_x(__m256i x, const uint8_t*, int) { return x; }
#else
  static constexpr float kSScale = 0.0f;
  static void unpack(const uint8_t* g, __m256i wq[8]) {
    for (int c = 0; c < 8; c++) wq[c] = _mm256_abs_epi8(load256(g + 16 + 32 * c));
  }
  static __m256i signed_x(__m256i x, const uint8_t* g, int c) { return _mm256_sign_epi8(x, load256(g + 16 + 32 * c)); }
#endif
  // the chunks as value / d, int8
  static void values(const uint8_t* g, __m256i v[8]) {
    for (int c = 0; c < 8; c++) v[c] = load256(g + 16 + 32 * c);
  }
};

template <bool kMin, bool kHigh>
struct Simd<Nibbles<kMin, kHigh>> {
  using F = Nibbles<kMin, kHigh>;
  static constexpr float kSScale = kMin ? 1.0f : -(float)F::kZ;
  static void unpack(const uint8_t* g, __m256i wq[8]) {
    for (int v = 0; v < 4; v++) {
      const __m256i b = load256(g + F::kQs + 32 * v);
      wq[v] = nib_lo(b);
      wq[v + 4] = nib_hi(b);
      if (kHigh) {
        wq[v] = or_high_bits(wq[v], load_u32(g + F::kH + 4 * v));
        wq[v + 4] = or_high_bits(wq[v + 4], load_u32(g + F::kH + 4 * (v + 4)));
      }
    }
  }
  static __m256i signed_x(__m256i x, const uint8_t*, int) { return x; }
  static void values(const uint8_t* g, __m256i v[8]) {  // (value - m) / d
    unpack(g, v);
    for (int c = 0; c < 8; c++) v[c] = _mm256_sub_epi8(v[c], _mm256_set1_epi8(F::kZ));
  }
};

// acc + the sums of 4 adjacent u8 x s8 products per int32 lane
inline __m256i dot_acc(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// 32 ymm registers with AVX-512VL: 8 weight chunks + 8 rows of float and int
// accumulators; AVX2's 16 hold half as many rows.
#if CAKE_AVX512
constexpr int kMaxRows = 8;
#else
constexpr int kMaxRows = 4;
#endif

// Without VNNI a product is vpmaddubsw (u8 x s8, adjacent pairs summed to
// int16) and then vpmaddwd by ones to int32: two multiplies per 32 byte
// products. A pair sum is at most 2 x kQMax x 127 in size, so int16_run chunks of a
// block can add up in int16 first (< 2^15: the sums are exact, the bits the
// same) and one vpmaddwd per run widens them: 4-bit weights (15) 8 chunks, the
// whole block; 5-bit (31) 4; Q8_0 on AVX2 (|q| up to 128) 1, the plain chain.
template <class F>
constexpr int int16_run() {
  const int n = 32767 / (2 * F::kQMax * 127);
  return n >= 8 ? 8 : n >= 4 ? 4 : n >= 2 ? 2 : 1;
}

template <class F, int NR>
__attribute__((noinline)) void gemm_rows(int64_t nb, const uint8_t* w, const void* x, size_t xs, float* y,
                                         size_t ys) {
  using S = Simd<F>;
#if CAKE_VNNI
  constexpr int R = 1;
#else
  constexpr int R = int16_run<F>();
#endif
  // below 4 rows, two chains of products per row so that their latency does not bind
  constexpr int U = NR < 4 ? 2 : 1;
  __m256 acc[NR];
  const cake_q8_32* xr[NR];
  for (int i = 0; i < NR; i++) {
    acc[i] = _mm256_setzero_ps();
    xr[i] = (const cake_q8_32*)((const char*)x + (size_t)i * xs);
  }
  for (int64_t b = 0; b < nb; b++, w += F::kGroup) {
    prefetch_ahead<F::kGroup>(w);
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)w));
    __m256 mw = _mm256_setzero_ps();
    if constexpr (F::kMin) mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + F::kM)));
    __m256i wq[8];
    S::unpack(w, wq);
    for (int i = 0; i < NR; i++) {
      const cake_q8_32* xb = xr[i] + b;
      __m256i s[U];
      for (int u = 0; u < U; u++) s[u] = _mm256_setzero_si256();
      if constexpr (R == 1) {
        for (int c = 0; c < 8; c++) {
          const __m256i xv = _mm256_set1_epi32((int)load_u32((const uint8_t*)xb->qs + 4 * c));
          s[c % U] = dot_acc(s[c % U], wq[c], S::signed_x(xv, w, c));
        }
      } else {  // runs of R chunks summed in int16 (int16_run), two chains below 4 rows
        for (int c0 = 0; c0 < 8; c0 += R) {
          __m256i h[U];
          for (int c = c0; c < c0 + R; c++) {
            const __m256i xv = _mm256_set1_epi32((int)load_u32((const uint8_t*)xb->qs + 4 * c));
            const __m256i p = _mm256_maddubs_epi16(wq[c], S::signed_x(xv, w, c));
            h[c % U] = c - c0 < U ? p : _mm256_add_epi16(h[c % U], p);
          }
          if (U == 2) h[0] = _mm256_add_epi16(h[0], h[U - 1]);
          s[0] = _mm256_add_epi32(s[0], _mm256_madd_epi16(h[0], _mm256_set1_epi16(1)));
        }
      }
      if (U == 2) s[0] = _mm256_add_epi32(s[0], s[U - 1]);
      if constexpr (F::kMin) {
        const __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(s[0]), _mm256_set1_ps(xb->d));
        acc[i] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xb->s), _mm256_fmadd_ps(p, dw, acc[i]));
      } else {
        const __m256 p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[0]), _mm256_set1_ps(xb->d), _mm256_set1_ps(xb->s));
        acc[i] = _mm256_fmadd_ps(p, dw, acc[i]);
      }
    }
  }
  for (int i = 0; i < NR; i++) _mm256_storeu_ps(y + i * ys, acc[i]);
}

template <class F>
constexpr float s_scale() {
  return Simd<F>::kSScale;
}

#if CAKE_R512
// A unit of two tiles at once (output columns 0 .. 15 of y): each zmm holds a
// chunk of tile 0 in its low 256 bits and the same chunk of tile 1 (its group
// right after tile 0's) in its high ones, so one activation broadcast feeds 64
// byte products and the per-row conversion and FMAs serve 16 weight rows. Lane
// by lane the operations are gemm_rows's: the results are the same bits.
inline __m512i load_pair(const uint8_t* w0, const uint8_t* w1, int off) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(load256(w0 + off)), load256(w1 + off), 1);
}
inline __m512 pair_f16(const uint8_t* w0, const uint8_t* w1, int off) {  // 16 float16 scales
  return _mm512_cvtph_ps(_mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)(w0 + off))), _mm_loadu_si128((const __m128i*)(w1 + off)), 1));
}

template <class F>
struct Simd512;

template <>
struct Simd512<Q8_0> {
  static void unpack(const uint8_t* w0, const uint8_t* w1, __m512i wq[8]) {
    for (int c = 0; c < 8; c++) wq[c] = _mm512_xor_si512(load_pair(w0, w1, 16 + 32 * c), _mm512_set1_epi8((char)0x80));
  }
};

template <bool kMin, bool kHigh>
struct Simd512<Nibbles<kMin, kHigh>> {
  using F = Nibbles<kMin, kHigh>;
  static void unpack(const uint8_t* w0, const uint8_t* w1, __m512i wq[8]) {
    const __m512i m = _mm512_set1_epi8(0xf);
    for (int v = 0; v < 4; v++) {
      const __m512i b = load_pair(w0, w1, F::kQs + 32 * v);
      wq[v] = _mm512_and_si512(b, m);
      wq[v + 4] = _mm512_and_si512(_mm512_srli_epi16(b, 4), m);
      if (kHigh) {  // + 0x10 in each byte j whose bit j of the two tiles' h is set
        const __m512i k = _mm512_set1_epi8(0x10);
        for (int u = 0; u < 2; u++) {
          const int c = v + 4 * u;
          const __mmask64 h = (__mmask64)load_u32(w0 + F::kH + 4 * c) | (__mmask64)load_u32(w1 + F::kH + 4 * c) << 32;
          wq[c] = _mm512_mask_add_epi8(wq[c], h, wq[c], k);
        }
      }
    }
  }
};

// Per block: 8 vpdpbusd zmm per activation row plus the float tail (3 or 4
// ops), all on the two 512-bit ports; the rows' product chains run RG side by
// side so that their latencies overlap (one row after another left the 8-row
// kernel waiting on them: 116 -> 74 us for Q4_1R8 3072 x 576 at M = 8, 1 thread).
// Each row's 8 products are two chains of 4 (even and odd chunks), summed
// before the tail: on Zen 4 vpdpbusd issues 2 a cycle with a latency of 4, and
// a block's one chain of 8 (32 cycles) and its tail made the critical path
// longer than the ports' 44 cycles for a Q4_1 block at 8 rows. 1024 x 576 at
// M = 8, one thread, in L2, MACs a cycle, one chain / two: Q4_1 75-77 /
// 81-83, Q5_0 73-75 / 76-78, Q8_0 73-76 / 74-77 (8 chains of 8, RG = 8: no
// better; 2 rows of 4 chains of 2: the same as two). Integer sums: the same bits.
template <class F, int NR>
__attribute__((noinline)) void gemm_pair(int64_t nb, const uint8_t* w0, const void* x, size_t xs, float* y,
                                         size_t ys) {
  const uint8_t* w1 = w0 + F::kGroup;
  constexpr int RG = NR < 4 ? NR : 4;
  constexpr int U = 2;  // chains of products per row
  __m512 acc[NR];
  const cake_q8_32* xr[NR];
  for (int i = 0; i < NR; i++) {
    acc[i] = _mm512_setzero_ps();
    xr[i] = (const cake_q8_32*)((const char*)x + (size_t)i * xs);
  }
  for (int64_t b = 0; b < nb; b++, w0 += 2 * F::kGroup, w1 += 2 * F::kGroup) {
    const __m512 dw = pair_f16(w0, w1, 0);
    __m512 mw = _mm512_setzero_ps();
    if constexpr (F::kMin) mw = pair_f16(w0, w1, F::kM);
    prefetch_ahead<2 * F::kGroup, kPrefetchPair>(w0);  // the unit's one stream
    __m512i wq[8];
    Simd512<F>::unpack(w0, w1, wq);
    for (int i0 = 0; i0 < NR; i0 += RG) {
      __m512i s[RG][U];
#pragma GCC unroll 4
      for (int k = 0; k < RG; k++)
        for (int u = 0; u < U; u++) s[k][u] = _mm512_setzero_si512();
#pragma GCC unroll 8
      for (int c = 0; c < 8; c++)
#pragma GCC unroll 4
        for (int k = 0; k < RG; k++) {
          if (i0 + k >= NR) break;
          const __m512i xv = _mm512_set1_epi32((int)load_u32((const uint8_t*)(xr[i0 + k] + b)->qs + 4 * c));
          s[k][c % U] = _mm512_dpbusd_epi32(s[k][c % U], wq[c], xv);
        }
#pragma GCC unroll 4
      for (int k = 0; k < RG; k++) {
        const int i = i0 + k;
        if (i >= NR) break;
        const cake_q8_32* xb = xr[i] + b;
        __m512i t = s[k][0];
        for (int u = 1; u < U; u++) t = _mm512_add_epi32(t, s[k][u]);
        if constexpr (F::kMin) {
          const __m512 p = _mm512_mul_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(xb->d));
          acc[i] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xb->s), _mm512_fmadd_ps(p, dw, acc[i]));
        } else {
          const __m512 p = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(xb->d), _mm512_set1_ps(xb->s));
          acc[i] = _mm512_fmadd_ps(p, dw, acc[i]);
        }
      }
    }
  }
  for (int i = 0; i < NR; i++) _mm512_storeu_ps(y + i * ys, acc[i]);
}
#endif

// One group as 8 rows of 32 int8 values (value / d): the chunks transposed as
// an 8 x 8 matrix of int32 (chunk c, row r) -> (row r, chunk c).
template <class F>
inline void group_values(const uint8_t* g, int8_t rows[8][32]) {
  __m256i v[8];
  Simd<F>::values(g, v);
  __m256i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int r = 0; r < 4; r++) {
    _mm256_storeu_si256((__m256i*)rows[r], _mm256_permute2x128_si256(u[r], u[r + 4], 0x20));
    _mm256_storeu_si256((__m256i*)rows[r + 4], _mm256_permute2x128_si256(u[r], u[r + 4], 0x31));
  }
}

// value = d * q (+ m) as in the reference (the build keeps d * q unfused)
template <class F>
void dequant_tile(int64_t k, const void* w, float* out) {
  const uint8_t* g = (const uint8_t*)w;
  alignas(32) int8_t rows[8][32];
  for (int64_t b = 0; b < k / 32; b++, g += F::kGroup) {
    group_values<F>(g, rows);
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)g));
    alignas(32) float ds[8], ms[8] = {};
    _mm256_store_ps(ds, d);
    if constexpr (F::kMin) _mm256_store_ps(ms, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(g + F::kM))));
    for (int r = 0; r < kR; r++) {
      const __m256 vd = _mm256_set1_ps(ds[r]), vm = _mm256_set1_ps(ms[r]);
      float* o = out + r * k + 32 * b;
      for (int j = 0; j < 4; j++) {
        const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(rows[r] + 8 * j)));
        __m256 v = _mm256_mul_ps(vd, _mm256_cvtepi32_ps(q));
        if constexpr (F::kMin) v = _mm256_add_ps(v, vm);
        _mm256_storeu_ps(o + 8 * j, v);
      }
    }
  }
}
#else
constexpr int kMaxRows = 4;

template <class F, int NR>
void gemm_rows(int64_t nb, const uint8_t* w, const void* x, size_t xs, float* y, size_t ys) {
  float acc[NR][kR] = {};
  const cake_q8_32* xr[NR];
  for (int i = 0; i < NR; i++) xr[i] = (const cake_q8_32*)((const char*)x + (size_t)i * xs);
  int q[kR][32];
  float d[kR], m[kR] = {};
  for (int64_t b = 0; b < nb; b++, w += F::kGroup) {
    for (int r = 0; r < kR; r++) {
      F::decode(w, r, q[r]);
      d[r] = load_f16(w + 2 * r);
      if constexpr (F::kMin) m[r] = load_f16(w + F::kM + 2 * r);
    }
    for (int i = 0; i < NR; i++) {
      const cake_q8_32* xb = xr[i] + b;
      for (int r = 0; r < kR; r++) {
        int s = 0;
        for (int j = 0; j < 32; j++) s += q[r][j] * xb->qs[j];
        acc[i][r] += d[r] * xb->d * (float)s + m[r] * xb->s;
      }
    }
  }
  for (int i = 0; i < NR; i++)
    for (int r = 0; r < kR; r++) y[i * ys + r] = acc[i][r];
}

template <class F>
constexpr float s_scale() {
  return 1.0f;  // s unused
}

template <class F>
void dequant_tile(int64_t k, const void* w, float* out) {
  dequant_tile_scalar<F>(k, w, out);
}
#endif

// Where the 512-bit kernel is built the tiles are stored in units of two
// (kInterleave), each unit through gemm_pair at every M, an odd last tile
// alone; elsewhere tiles one after another, tile by tile (a unit read as two
// tiles was 8-10 % slower in an AVX2 build's decode steps: each tile's pass
// reads the other's groups' lines too). The pairs used to be two adjacent tiles stored
// one after the other, read as two streams a tile (a few KB) apart: the
// hardware prefetchers followed those worse than one stream, so below 5 (Q8_0:
// 9) activation rows single tiles had been faster (Zen 4: Q8_0 at M = 1 4.58 /
// 3.23 ms for the 120 products of 30 SmolLM2 layers). Stored as one stream of
// group pairs, a unit is as fast as single tiles at M = 1 and faster from M = 2
// on. Zen 5, 2 threads, ms per pass over those products, best of 11 rounds, in
// one process (benchmarks/tile_pairs_ab.cc), two streams / one stream / single
// tiles:
//   Q4_1  M = 1 1.67 / 1.29 / 1.30   M = 4 1.59 / 1.33 / 1.83   M = 8 2.05 / 1.65 / 3.34
//   Q8_0  M = 1 2.04 / 1.68 / 1.73   M = 4 2.41 / 1.86 / 2.20   M = 8 2.58 / 2.23 / 3.07
//   Q5_0  M = 1 1.72 / 1.11 / 1.39   M = 8 2.54 / 2.04 / 3.38
//   Q4_0  M = 1 1.16 / 0.95 / 1.07   M = 8 1.88 / 1.87 / 3.13
// The same bits either way. Blocks of work start on even tiles (align 2), so a
// block's odd last tile is the matrix's.
template <class F>
void gemm(int64_t k, const void* w, int64_t ntiles, const void* x, size_t xs, int nrows, float* y, size_t ys) {
  const size_t tile_bytes = (size_t)(k / 32) * F::kGroup;
  const uint8_t* base = (const uint8_t*)w;
  int64_t t = 0;
#if CAKE_R512
  for (; t + 2 <= ntiles; t += 2)
    cake_tiles::gemm<kMaxRows>(nrows, x, xs, y + kR * t, ys, [&](auto nr, const void* xt, float* yt) {
      gemm_pair<F, decltype(nr)::value>(k / 32, base + t * tile_bytes, xt, xs, yt, ys);
    });
#endif
  for (; t < ntiles; t++)
    cake_tiles::gemm<kMaxRows>(nrows, x, xs, y + kR * t, ys, [&](auto nr, const void* xt, float* yt) {
      gemm_rows<F, decltype(nr)::value>(k / 32, base + t * tile_bytes, xt, xs, yt, ys);
    });
}

#if CAKE_R512
constexpr int64_t kInterleave = 2;
#else
constexpr int64_t kInterleave = 1;
#endif

}  // namespace

const cake_tile_kernels cake_r8_q4_0 = {Q4_0::kGroup, s_scale<Q4_0>(), gemm<Q4_0>, dequant_tile<Q4_0>, repack_tile<Q4_0>, 8, 2, 1, kInterleave};
const cake_tile_kernels cake_r8_q4_1 = {Q4_1::kGroup, s_scale<Q4_1>(), gemm<Q4_1>, dequant_tile<Q4_1>, repack_tile<Q4_1>, 8, 2, 1, kInterleave};
const cake_tile_kernels cake_r8_q5_0 = {Q5_0::kGroup, s_scale<Q5_0>(), gemm<Q5_0>, dequant_tile<Q5_0>, repack_tile<Q5_0>, 8, 2, 1, kInterleave};
const cake_tile_kernels cake_r8_q5_1 = {Q5_1::kGroup, s_scale<Q5_1>(), gemm<Q5_1>, dequant_tile<Q5_1>, repack_tile<Q5_1>, 8, 2, 1, kInterleave};
const cake_tile_kernels cake_r8_q8_0 = {Q8_0::kGroup, s_scale<Q8_0>(), gemm<Q8_0>, dequant_tile<Q8_0>, repack_tile<Q8_0>, 8, 2, 1, kInterleave};
