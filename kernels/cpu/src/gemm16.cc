// Panel GEMMs for 16-bit weights (BF16, F16), and float32 ones (F32), when x
// has many rows (a long prefill): y (M, N) = x (M, K) @ W^T without the
// horizontal sums of the dot kernels (legacy.cc), whose structure is one weight
// row against <= 8 x rows.
//
// The weights stay as stored, row-major (N, K). Each call takes a block of
// weight rows (output columns); kNB of them at a time are repacked into a
// thread-local panel that stays in L2 (K = 1536: 144 KiB in BF16 pairs),
// then a register-blocked microkernel multiplies every x row by it: kMR x
// rows times kNB columns of accumulators, one vector load of the panel per
// kNB / lanes columns and one broadcast per x row.
//
// Layouts of the panel, per path (picked at compile time):
//   AVX-512 BF16: [ceil(K/2)][kNB] 32-bit words, each the pair of weights
//     (2p, 2p + 1) of one column; x (bf16 rows, cake_round_bf16, an even
//     stride with a zero past an odd K) broadcast as 32-bit pairs into
//     vdpbf16ps: two products per lane and instruction, as the dot kernels.
//   elsewhere (and F16, F32 everywhere): [K][kNB] float32, the weights
//     widened (F32: copied) while packing, x's values broadcast (widened from
//     bf16 for BF16) into float32 FMAs. BF16 x BF16 products are exact in
//     float32 either way.
// K is taken in chunks of kKC so that a panel stays in L2 for any K; the
// chunks' sums are added into y in turn. Each row's result does not depend on
// M or on the other rows (each row's accumulators see the same sequence of
// operations whatever the tile it is in).
#include <stdlib.h>
#include <string.h>

#include "qdot.h"
#include "simd.h"

namespace {

inline float bf16_f32(uint16_t h) {
  const uint32_t b = (uint32_t)h << 16;
  float f;
  memcpy(&f, &b, 4);
  return f;
}

// Weight values as float32 (kBytes each in the stored rows; value i of a row).
struct WBF16 {
  static constexpr int kBytes = 2;
  static float one(const char* row, int64_t i) { return bf16_f32(((const uint16_t*)row)[i]); }
#if CAKE_AVX512
  static __m512i widen16(const char* w, __mmask16 m) {
    return _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, w)), 16);
  }
#endif
};
struct WF16 {
  static constexpr int kBytes = 2;
  static float one(const char* row, int64_t i) { return cake_f16_to_f32(((const uint16_t*)row)[i]); }
#if CAKE_AVX512
  static __m512i widen16(const char* w, __mmask16 m) {
    return _mm512_castps_si512(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, w)));
  }
#endif
};
struct WF32 {
  static constexpr int kBytes = 4;
  static float one(const char* row, int64_t i) { return ((const float*)row)[i]; }
#if CAKE_AVX512
  static __m512i widen16(const char* w, __mmask16 m) { return _mm512_castps_si512(_mm512_maskz_loadu_ps(m, w)); }
#endif
};

// x's values as float32: float rows (F16) or bfloat16 rows (BF16).
struct XF32 {
  static float one(const char* x, int64_t i) { return ((const float*)x)[i]; }
};
struct XBF16 {
  static float one(const char* x, int64_t i) { return bf16_f32(((const uint16_t*)x)[i]); }
};

// One 64-byte aligned buffer per thread (the pool's threads persist), freed
// when its thread ends.
struct PanelBuffer {
  void* p = nullptr;
  size_t cap = 0;
  ~PanelBuffer() { free(p); }
};

void* panel_buffer(size_t bytes) {
  thread_local PanelBuffer b;
  if (b.cap < bytes) {
    free(b.p);
    b.cap = (bytes + 63) / 64 * 64;
    b.p = aligned_alloc(64, b.cap);
  }
  return b.p;
}

#if CAKE_AVX512
// 16 vectors of 16 32-bit values, rows -> columns.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  __m512i u[16];
  for (int g = 0; g < 16; g += 4) {
    u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  // u[4g + e], 128-bit lane L: rows 4g ... 4g + 3 of column 4L + e
  for (int e = 0; e < 4; e++) {
    const __m512i p = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x88), q = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xdd);
    const __m512i s = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x88);
    const __m512i v = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xdd);
    r[e] = _mm512_shuffle_i32x4(p, s, 0x88);
    r[8 + e] = _mm512_shuffle_i32x4(p, s, 0xdd);
    r[4 + e] = _mm512_shuffle_i32x4(q, v, 0x88);
    r[12 + e] = _mm512_shuffle_i32x4(q, v, 0xdd);
  }
}

inline __mmask16 mask16(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u); }

// acc (16 floats, columns c .. c + 15 of row yr) into y: added to y's sum of
// the chunks of K before (unless first), then to the residual after the last
// (so that y is bit for bit residual + the product).
inline void store16(__m512 acc, float* yr, const float* rr, int64_t cols, bool first, bool last) {
  const __mmask16 m = mask16(cols);
  if (!first) acc = _mm512_add_ps(_mm512_maskz_loadu_ps(m, yr), acc);
  if (last && rr != nullptr) acc = _mm512_add_ps(_mm512_maskz_loadu_ps(m, rr), acc);
  _mm512_mask_storeu_ps(yr, m, acc);
}
#endif

// ---- the paths ----------------------------------------------------------------

#if CAKE_AVX512
// 8 rows x 3 vectors: 24 accumulators, 3 panel loads and 8 broadcasts per step
// of K (a pair with BF16) of 24 instructions.
constexpr int kMR = 8, kNV = 3, kLanes = 16;
#elif CAKE_AVX2
// 16 ymm registers: 6 rows x 2 vectors of accumulators, 2 panel loads, 1 broadcast.
constexpr int kMR = 6, kNV = 2, kLanes = 8;
#else
constexpr int kMR = 4, kNV = 4, kLanes = 4;
#endif
constexpr int kNB = kNV * kLanes;  // columns per panel
// K per panel chunk: 1536 (SmolLM2's widest K) -> BF16 pairs 144 KiB, float32 288 KiB of L2.
constexpr int64_t kKC = 1536;

#if CAKE_AVX512 && defined(__AVX512BF16__)
constexpr bool kPairs = true;
#else
constexpr bool kPairs = false;
#endif

// BF16 pairs: columns [0, cols) (cols <= kNB) of w, K values [k0, k0 + kc)
// -> panel [ceil(kc / 2)][kNB], zero past cols and past K.
void pack_pairs(const uint16_t* w, size_t ws, int64_t cols, int64_t k0, int64_t kc, uint32_t* panel,
                const char* next) {
#if CAKE_AVX512 && defined(__AVX512BF16__)
  const int64_t kp = (kc + 1) / 2;
  for (int g = 0; g < kNV; g++) {
    for (int64_t p = 0; p < kp; p += 16) {
      const int64_t left = kc - 2 * p;  // bf16 values of this run
      const __mmask32 m = left >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << left) - 1u);
      __m512i r[16];
      for (int i = 0; i < 16; i++) {
        const int64_t c = g * 16 + i;
        const size_t at = c * ws + 2 * (k0 + 2 * p);
        if (next != nullptr) _mm_prefetch(next + at, _MM_HINT_T0);
        r[i] = c < cols ? _mm512_maskz_loadu_epi16(m, (const char*)w + at) : _mm512_setzero_si512();
      }
      transpose16(r);
      const int64_t n = kp - p < 16 ? kp - p : 16;
      for (int64_t j = 0; j < n; j++) _mm512_store_si512((void*)(panel + (p + j) * kNB + g * 16), r[j]);
    }
  }
#else
  (void)w, (void)ws, (void)cols, (void)k0, (void)kc, (void)panel, (void)next;
#endif
}

// Float32: columns [0, cols) of w, K values [k0, k0 + kc) -> panel [kc][kNB].
// The next panel is prefetched a cache line (64 bytes of a row) at a time.
template <class W>
void pack_float(const char* w, size_t ws, int64_t cols, int64_t k0, int64_t kc, float* panel,
                const char* next) {
#if CAKE_AVX512
  for (int g = 0; g < kNV; g++) {
    for (int64_t p = 0; p < kc; p += 16) {
      const __mmask16 m = mask16(kc - p);
      __m512i r[16];
      for (int i = 0; i < 16; i++) {
        const int64_t c = g * 16 + i;
        const size_t at = c * ws + W::kBytes * (k0 + p);
        if (next != nullptr && ((p * W::kBytes) & 63) == 0) _mm_prefetch(next + at, _MM_HINT_T0);
        r[i] = c < cols ? W::widen16(w + at, m) : _mm512_setzero_si512();
      }
      transpose16(r);
      const int64_t n = kc - p < 16 ? kc - p : 16;
      for (int64_t j = 0; j < n; j++) _mm512_store_si512((void*)(panel + (p + j) * kNB + g * 16), r[j]);
    }
  }
#else
  (void)next;
  for (int64_t c = 0; c < kNB; c++) {
    const char* row = w + c * ws + W::kBytes * k0;
    for (int64_t p = 0; p < kc; p++) panel[p * kNB + c] = c < cols ? W::one(row, p) : 0.0f;
  }
#endif
}

// MR rows of x (xs bytes apart, from K value k0) times the panel -> y (ys
// floats apart; columns [0, cols)): first (K's first chunk) y = product,
// else y += product; last: then y = residual + y.
template <int MR>
void micro_pairs(int64_t kc, const uint32_t* panel, const char* x, size_t xs, int64_t k0, float* y,
                 size_t ys, const float* res, int64_t cols, bool first, bool last) {
#if CAKE_AVX512 && defined(__AVX512BF16__)
  __m512 acc[MR][kNV];
  const uint32_t* xr[MR];
  for (int r = 0; r < MR; r++) {
    xr[r] = (const uint32_t*)(x + r * xs + 2 * k0);
    for (int v = 0; v < kNV; v++) acc[r][v] = _mm512_setzero_ps();
  }
  const int64_t kp = (kc + 1) / 2;
  for (int64_t p = 0; p < kp; p++) {
    const uint32_t* b = panel + p * kNB;
    __m512bh bv[kNV];
    for (int v = 0; v < kNV; v++) bv[v] = (__m512bh)_mm512_load_si512((const void*)(b + 16 * v));
    for (int r = 0; r < MR; r++) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32((int)xr[r][p]);
      for (int v = 0; v < kNV; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], bv[v], a);
    }
  }
  for (int r = 0; r < MR; r++)
    for (int v = 0; v < kNV; v++)
      if (16 * v < cols)
        store16(acc[r][v], y + r * ys + 16 * v, res != nullptr ? res + r * ys + 16 * v : nullptr, cols - 16 * v,
                first, last);
#else
  (void)kc, (void)panel, (void)x, (void)xs, (void)k0, (void)y, (void)ys, (void)res, (void)cols, (void)first, (void)last;
#endif
}

template <class X, int MR>
void micro_float(int64_t kc, const float* panel, const char* x, size_t xs, int64_t k0, float* y, size_t ys,
                 const float* res, int64_t cols, bool first, bool last) {
  const char* xr[MR];
  for (int r = 0; r < MR; r++) xr[r] = x + r * xs;
#if CAKE_AVX512
  __m512 acc[MR][kNV];
  for (int r = 0; r < MR; r++)
    for (int v = 0; v < kNV; v++) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kc; p++) {
    const float* b = panel + p * kNB;
    __m512 bv[kNV];
    for (int v = 0; v < kNV; v++) bv[v] = _mm512_load_ps(b + 16 * v);
    for (int r = 0; r < MR; r++) {
      const __m512 a = _mm512_set1_ps(X::one(xr[r], k0 + p));
      for (int v = 0; v < kNV; v++) acc[r][v] = _mm512_fmadd_ps(bv[v], a, acc[r][v]);
    }
  }
  for (int r = 0; r < MR; r++)
    for (int v = 0; v < kNV; v++)
      if (16 * v < cols)
        store16(acc[r][v], y + r * ys + 16 * v, res != nullptr ? res + r * ys + 16 * v : nullptr, cols - 16 * v,
                first, last);
#else
  float out[MR][kNB];
#if CAKE_AVX2
  __m256 acc[MR][kNV];
  for (int r = 0; r < MR; r++)
    for (int v = 0; v < kNV; v++) acc[r][v] = _mm256_setzero_ps();
  for (int64_t p = 0; p < kc; p++) {
    const float* b = panel + p * kNB;
    __m256 bv[kNV];
    for (int v = 0; v < kNV; v++) bv[v] = _mm256_loadu_ps(b + 8 * v);
    for (int r = 0; r < MR; r++) {
      const __m256 a = _mm256_set1_ps(X::one(xr[r], k0 + p));
      for (int v = 0; v < kNV; v++) acc[r][v] = _mm256_fmadd_ps(bv[v], a, acc[r][v]);
    }
  }
  for (int r = 0; r < MR; r++)
    for (int v = 0; v < kNV; v++) _mm256_storeu_ps(&out[r][8 * v], acc[r][v]);
#else
  for (int r = 0; r < MR; r++)
    for (int c = 0; c < kNB; c++) out[r][c] = 0.0f;
  for (int64_t p = 0; p < kc; p++) {
    const float* b = panel + p * kNB;
    for (int r = 0; r < MR; r++) {
      const float a = X::one(xr[r], k0 + p);
      for (int c = 0; c < kNB; c++) out[r][c] += b[c] * a;
    }
  }
#endif
  for (int r = 0; r < MR; r++)
    for (int64_t c = 0; c < cols; c++) {
      float* yp = y + r * ys + c;
      float v = first ? out[r][c] : *yp + out[r][c];
      if (last && res != nullptr) v = res[r * ys + c] + v;
      *yp = v;
    }
#endif
}

// Every one of the m rows, in tiles of kMR and one tile of the rest.
template <class Micro, int R = kMR>
void tail_rows(int rows, const Micro& mk) {
  if constexpr (R > 1)
    if (rows < R) return tail_rows<Micro, R - 1>(rows, mk);
  mk(std::integral_constant<int, R>{});
}

template <class W, class X>
void panel_gemm(int64_t k, const void* w, size_t ws, int64_t ncols, const void* x, size_t xs, int64_t m, float* y,
                size_t ys, const float* res) {
  const bool pairs = kPairs && std::is_same<W, WBF16>::value;
  const int64_t kc_max = k < kKC ? k : kKC;
  void* buf = panel_buffer((size_t)(kc_max + 1) * kNB * sizeof(float));
  for (int64_t c0 = 0; c0 < ncols; c0 += kNB) {
    const int64_t cols = ncols - c0 < kNB ? ncols - c0 : kNB;
    const char* wc = (const char*)w + c0 * ws;
    for (int64_t k0 = 0; k0 < k; k0 += kKC) {
      const int64_t kc = k - k0 < kKC ? k - k0 : kKC;
      const bool first = k0 == 0, last = k0 + kc == k;
      // the next panel's weights into the cache while this one is multiplied:
      // the packing's 16 rows at once (runs of 64 bytes) defeated the
      // hardware prefetcher. BF16, 30 SmolLM2 layers, 2 threads, M = 16:
      // 31 ms without, 13 with (two runs minutes apart on the noisy machine;
      // the dot kernels took 20 and 9 ms in the same two).
      const char* next = c0 + kNB < ncols ? wc + kNB * ws : nullptr;
      if (pairs)
        pack_pairs((const uint16_t*)wc, ws, cols, k0, kc, (uint32_t*)buf, next);
      else
        pack_float<W>(wc, ws, cols, k0, kc, (float*)buf, next);
      for (int64_t i = 0; i < m; i += kMR) {
        const char* xi = (const char*)x + i * xs;
        float* yi = y + i * ys + c0;
        const float* ri = res != nullptr ? res + i * ys + c0 : nullptr;
        tail_rows((int)(m - i < kMR ? m - i : kMR), [&](auto mr) {
          constexpr int MR = decltype(mr)::value;
          if (pairs)
            micro_pairs<MR>(kc, (const uint32_t*)buf, xi, xs, k0, yi, ys, ri, cols, first, last);
          else
            micro_float<X, MR>(kc, (const float*)buf, xi, xs, k0, yi, ys, ri, cols, first, last);
        });
      }
    }
  }
}

// ---- tiles stored at load: BF16P, F16P, F32P ---------------------------------
//
// The panel GEMM above repacks kNB weight rows per call, a second pass over
// the weights that only pays for itself from ~24-32 x rows; below that the
// dot kernels' structure (one weight row, <= 8 x rows, horizontal sums) is
// bound by its loads, and 8 rows took 1.7-2.3x the time of one (Zen 4, 2
// threads, 30 SmolLM2 layers). The P formats are the panels stored once, at
// load, in the matrix's own bytes: tiles of kTileCols weight rows (output
// columns), tile t holding rows [32 t, 32 t + 32):
//   BF16P: [K / 2][32] 32-bit words, word (p, c) = the pair of bfloat16 weights
//          (2p, 2p + 1) of row 32 t + c (2p in the low half); K even;
//   F16P:  [K][32] float16, (k, c) = weight k of row 32 t + c;
//   F32P:  [K][32] float32, likewise.
// So every row count runs the same microkernel straight from memory: per step
// kTileVecs vector loads of weights, one broadcast per x row, a multiply-add
// per (row, vector), and no horizontal sums; a decode step of 8 rows reads
// each weight once. 32 columns (2 vectors) rather than kNB: N = 4096, 14336
// and 11008 (Llama's widths) are multiples of 32, not of 48. The x rows are
// the dot kernels' (BF16: bfloat16 pairs; F16, F32: float32), so the products
// are the same sums in another order. AVX-512 only (BF16P: with AVX-512 BF16);
// elsewhere the formats are not listed and the weights stay as stored.
#if CAKE_AVX512
constexpr int64_t kTileCols = 32;
constexpr int kTileVecs = 2;
constexpr int kTileRowsX = 8;  // x rows per microkernel call: 16 accumulators
// Software prefetch this far ahead of the weights being multiplied. 30 SmolLM2
// layers, 2 threads, best of 7 interleaved rounds, M = 8 ms, none / 1 / 2 / 4
// KiB ahead: F16P 14.3 / 11.8 / 11.4 / 11.4 (M = 1: 7.8-8.9 throughout),
// again none / 2 / 3 KiB 17.0 / 13.1 / 13.4; BF16P and F32P within noise
// (9.3-11.3, 14.7-16.1).
constexpr int kAhead = 2048;
constexpr int kWidenRows = 16;  // F16P: from this many x rows on, widen each tile once

// Weight tiles as the microkernel reads them: W the stored unit, kPer K values
// per step, load(step row, vector), bcast(x row, step), madd.
struct TF32 {
  using W = float;
  using V = __m512;
  static constexpr int kPer = 1;
  static V load(const W* r, int v) { return _mm512_loadu_ps(r + 16 * v); }
  static V bcast(const char* x, int64_t s) { return _mm512_set1_ps(((const float*)x)[s]); }
  static __m512 madd(__m512 acc, V b, V a) { return _mm512_fmadd_ps(b, a, acc); }
  static float one(const W* tile, int64_t kk, int c) { return tile[kk * kTileCols + c]; }
  static void put(W* tile, int64_t kk, int c, const char* row) { tile[kk * kTileCols + c] = ((const float*)row)[kk]; }
};
struct TF16 {
  using W = uint16_t;
  using V = __m512;
  static constexpr int kPer = 1;
  static V load(const W* r, int v) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(r + 16 * v))); }
  static V bcast(const char* x, int64_t s) { return _mm512_set1_ps(((const float*)x)[s]); }
  static __m512 madd(__m512 acc, V b, V a) { return _mm512_fmadd_ps(b, a, acc); }
  static float one(const W* tile, int64_t kk, int c) { return cake_f16_to_f32(tile[kk * kTileCols + c]); }
  static void put(W* tile, int64_t kk, int c, const char* row) {
    tile[kk * kTileCols + c] = ((const uint16_t*)row)[kk];
  }
};
#if defined(__AVX512BF16__)
struct TBF16 {
  using W = uint32_t;
  using V = __m512bh;
  static constexpr int kPer = 2;
  static V load(const W* r, int v) { return (__m512bh)_mm512_loadu_si512((const void*)(r + 16 * v)); }
  static V bcast(const char* x, int64_t s) {
    int32_t pair;
    memcpy(&pair, x + 4 * s, 4);
    return (__m512bh)_mm512_set1_epi32(pair);
  }
  static __m512 madd(__m512 acc, V b, V a) { return _mm512_dpbf16_ps(acc, b, a); }
  static float one(const W* tile, int64_t kk, int c) {
    const uint32_t w = tile[kk / 2 * kTileCols + c];
    return bf16_f32((uint16_t)(kk % 2 ? w >> 16 : w & 0xffff));
  }
  static void put(W* tile, int64_t kk, int c, const char* row) {
    if (kk % 2) return;  // both halves at the even K value
    const uint16_t* r = (const uint16_t*)row;
    tile[kk / 2 * kTileCols + c] = (uint32_t)r[kk] | (uint32_t)r[kk + 1] << 16;
  }
};
#endif

// MR x rows (xs bytes apart) times one tile -> y (MR rows ys floats apart,
// kTileCols columns).
template <class T, int MR>
void tile_micro(int64_t k, const typename T::W* tile, const char* x, size_t xs, float* y, size_t ys) {
  __m512 acc[MR][kTileVecs];
  for (int r = 0; r < MR; r++)
    for (int v = 0; v < kTileVecs; v++) acc[r][v] = _mm512_setzero_ps();
  const int64_t steps = k / T::kPer;
  constexpr int kRowBytes = kTileCols * sizeof(typename T::W);
  for (int64_t s = 0; s < steps; s++) {
    const typename T::W* row = tile + s * kTileCols;
    // kAhead bytes down the stream (into the next tile past this one's end)
    for (int l = 0; l < kRowBytes; l += 64) _mm_prefetch((const char*)row + kAhead + l, _MM_HINT_T0);
    typename T::V b[kTileVecs];
    for (int v = 0; v < kTileVecs; v++) b[v] = T::load(row, v);
    for (int r = 0; r < MR; r++) {
      const typename T::V a = T::bcast(x + r * xs, s);
      for (int v = 0; v < kTileVecs; v++) acc[r][v] = T::madd(acc[r][v], b[v], a);
    }
  }
  for (int r = 0; r < MR; r++)
    for (int v = 0; v < kTileVecs; v++) _mm512_storeu_ps(y + r * ys + 16 * v, acc[r][v]);
}

// ntiles consecutive tiles times nrows x rows; each tile stays in L2 while
// every x row passes it.
template <class T>
void tile_gemm(int64_t k, const void* w, int64_t ntiles, const void* x, size_t xs, int nrows, float* y, size_t ys) {
  const typename T::W* tiles = (const typename T::W*)w;
  const int64_t tile_units = k / T::kPer * kTileCols;
  for (int64_t t = 0; t < ntiles; t++) {
    const typename T::W* tile = tiles + t * tile_units;
    if constexpr (std::is_same<T, TF16>::value) {
      // Many x rows: the tile widened once into float32 (exactly; the same
      // sums in the same order), not once per 8 rows. 30 SmolLM2 layers, 2
      // threads, M = 512: 732 ms widening per call of 8 rows, against 544 for
      // the panel GEMM of F16 as stored.
      if (nrows > kWidenRows) {
        float* wide = (float*)panel_buffer((size_t)k * kTileCols * sizeof(float));
        for (int64_t i = 0; i < k * kTileCols; i += 16)
          _mm512_storeu_ps(wide + i, TF16::load(tile + i, 0));
        cake_tiles::gemm<kTileRowsX>(nrows, x, xs, y + kTileCols * t, ys, [&](auto nr, const void* xt, float* yt) {
          tile_micro<TF32, decltype(nr)::value>(k, wide, (const char*)xt, xs, yt, ys);
        });
        continue;
      }
    }
    cake_tiles::gemm<kTileRowsX>(nrows, x, xs, y + kTileCols * t, ys, [&](auto nr, const void* xt, float* yt) {
      tile_micro<T, decltype(nr)::value>(k, tile, (const char*)xt, xs, yt, ys);
    });
  }
}

template <class T>
void tile_dequant(int64_t k, const void* w, float* out) {  // one tile -> out (32, k)
  const typename T::W* tile = (const typename T::W*)w;
  for (int c = 0; c < kTileCols; c++)
    for (int64_t kk = 0; kk < k; kk++) out[c * k + kk] = T::one(tile, kk, c);
}

template <class T>
void tile_repack(int64_t k, const void* w, size_t ws, void* out) {  // 32 rows -> one tile
  typename T::W* tile = (typename T::W*)out;
  for (int c = 0; c < kTileCols; c++) {
    const char* row = (const char*)w + c * ws;
    for (int64_t kk = 0; kk < k; kk++) T::put(tile, kk, c, row);
  }
}

template <class T>
constexpr cake_tile_kernels tile_kernels() {
  return {(int64_t)(kTileCols * sizeof(typename T::W) / T::kPer), 1.0f, tile_gemm<T>, tile_dequant<T>,
          tile_repack<T>, kTileCols, 1, T::kPer, 1};
}
const cake_tile_kernels kF32P = tile_kernels<TF32>(), kF16P = tile_kernels<TF16>();
#if defined(__AVX512BF16__)
const cake_tile_kernels kBF16P = tile_kernels<TBF16>();
#endif
#endif  // CAKE_AVX512

}  // namespace

int64_t cake_panel_cols(void) { return kNB; }

void cake_panel_bf16(int64_t k, const void* w, size_t ws, int64_t ncols, const void* x, size_t xs, int64_t m,
                     float* y, size_t ys, const float* res) {
  panel_gemm<WBF16, XBF16>(k, w, ws, ncols, x, xs, m, y, ys, res);
}

void cake_panel_f16(int64_t k, const void* w, size_t ws, int64_t ncols, const void* x, size_t xs, int64_t m,
                    float* y, size_t ys, const float* res) {
  panel_gemm<WF16, XF32>(k, w, ws, ncols, x, xs, m, y, ys, res);
}

void cake_panel_f32(int64_t k, const void* w, size_t ws, int64_t ncols, const void* x, size_t xs, int64_t m,
                    float* y, size_t ys, const float* res) {
  panel_gemm<WF32, XF32>(k, w, ws, ncols, x, xs, m, y, ys, res);
}

#if CAKE_AVX512
const cake_tile_kernels* const cake_tiles_f32 = &kF32P;
const cake_tile_kernels* const cake_tiles_f16 = &kF16P;
#else
const cake_tile_kernels* const cake_tiles_f32 = nullptr;
const cake_tile_kernels* const cake_tiles_f16 = nullptr;
#endif
#if CAKE_AVX512 && defined(__AVX512BF16__)
const cake_tile_kernels* const cake_tiles_bf16 = &kBF16P;
#else
const cake_tile_kernels* const cake_tiles_bf16 = nullptr;
#endif
