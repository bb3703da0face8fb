// The contract between the CPU matmul driver and the per-format dot kernels.
//
// y (M, N) = x (M, K) @ W^T, W (N, K) stored row by row exactly as in the GGUF
// file: each row is K / block_elems blocks of block_bytes (see the structs in
// gguf.quants / ggml-common.h). x is float32. For the quantized formats x is
// first quantized once per call, row by row, into the activation blocks below
// (as llama.cpp does); the dot kernels then use integer products.
//
// Activation quantization, the same for every row and format family, and what
// kernels/cpu/reference.py reproduces in NumPy:
//   d = max|x_blk| / 127 (d = 0 -> all q = 0), q = rint(x / d) (half to even,
//   like np.rint), |q| <= 127.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Activations for the 32-element formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).
typedef struct {
  float d;        // scale
  float s;        // d * sum(qs): what a block's min/bias multiplies
  int8_t qs[32];
} cake_q8_32;     // 40 bytes

// Activations for the 256-element K-quants (Q2_K ... Q6_K).
typedef struct {
  float d;
  int16_t bsums[16];  // sum of each run of 16 qs
  int8_t qs[256];
} cake_q8_256;        // 292 bytes

void cake_quantize_q8_32(const float* x, cake_q8_32* y, int64_t k);    // k % 32 == 0
void cake_quantize_q8_256(const float* x, cake_q8_256* y, int64_t k);  // k % 256 == 0

// One weight row against `nrows` activation rows:
//   out[r] = dot(W row w, activation row r), r < nrows,
// activation row r starting at (const char*)x + r * x_stride bytes.
// A kernel decodes each weight block once and reuses it for every row: that is
// what keeps a step for 8 sequences close to the cost of one.
// x is cake_q8_32 rows for the 32-element formats, cake_q8_256 rows for the
// K-quants, float32 rows for F16 and F32, bfloat16 rows (cake_round_bf16) for BF16.
typedef void (*cake_dot_fn)(int64_t k, const void* w, const void* x,
                            size_t x_stride, int nrows, float* out);

void cake_dot_q4_0(int64_t k, const void* w, const void* x, size_t x_stride, int nrows, float* out);
void cake_dot_q4_1(int64_t k, const void* w, const void* x, size_t x_stride, int nrows, float* out);
void cake_dot_q5_0(int64_t k, const void* w, const void* x, size_t x_stride, int nrows, float* out);
void cake_dot_q5_1(int64_t k, const void* w, const void* x, size_t x_stride, int nrows, float* out);
void cake_dot_q8_0(int64_t k, const void* w, const void* x, size_t x_stride, int nrows, float* out);
void cake_dot_q2_k(int64_t k, const void* w, const void* x, size_t x_stride, int nrows, float* out);
void cake_dot_q3_k(int64_t k, const void* w, const void* x, size_t x_stride, int nrows, float* out);
void cake_dot_q4_k(int64_t k, const void* w, const void* x, size_t x_stride, int nrows, float* out);
void cake_dot_q5_k(int64_t k, const void* w, const void* x, size_t x_stride, int nrows, float* out);
void cake_dot_q6_k(int64_t k, const void* w, const void* x, size_t x_stride, int nrows, float* out);
void cake_dot_f16(int64_t k, const void* w, const void* x, size_t x_stride, int nrows, float* out);
void cake_dot_bf16(int64_t k, const void* w, const void* x, size_t x_stride, int nrows, float* out);
void cake_dot_f32(int64_t k, const void* w, const void* x, size_t x_stride, int nrows, float* out);
// Two consecutive weight rows (w, w + w_stride bytes) against the same rows:
// out[r] for the first, out[nrows + r] for the second; each activation row is
// loaded once for both (BF16's and F32's 8-row products were bound by their loads).
typedef void (*cake_dot2_fn)(int64_t k, const void* w, size_t w_stride, const void* x, size_t x_stride,
                             int nrows, float* out);
void cake_dot2_bf16(int64_t k, const void* w, size_t w_stride, const void* x, size_t x_stride, int nrows,
                    float* out);
void cake_dot2_f32(int64_t k, const void* w, size_t w_stride, const void* x, size_t x_stride, int nrows,
                   float* out);

// 16-bit (and float32) weights times many activation rows (gemm16.cc): a register-blocked
// GEMM over panels of cake_panel_cols() weight rows repacked on the fly
// (per thread, in L2), for a long prefill where the dot kernels' structure
// (one weight row, <= 8 x rows, horizontal sums) is bound by its loads:
//   y[i * y_stride + c] = (residual ? residual[i * y_stride + c] : 0) + dot(W row c, x row i)
// for c < ncols (W row c at w + c * w_stride bytes), i < m; x rows x_stride
// bytes apart. BF16: bfloat16 x rows (cake_round_bf16) with x_stride a
// multiple of 4 and, for odd k, a zero bfloat16 at index k (read as a pair's
// second half). F16, F32: float32 x rows.
typedef void (*cake_panel_fn)(int64_t k, const void* w, size_t w_stride, int64_t ncols, const void* x,
                              size_t x_stride, int64_t m, float* y, size_t y_stride, const float* residual);
void cake_panel_bf16(int64_t k, const void* w, size_t w_stride, int64_t ncols, const void* x, size_t x_stride,
                     int64_t m, float* y, size_t y_stride, const float* residual);
void cake_panel_f16(int64_t k, const void* w, size_t w_stride, int64_t ncols, const void* x, size_t x_stride,
                    int64_t m, float* y, size_t y_stride, const float* residual);
void cake_panel_f32(int64_t k, const void* w, size_t w_stride, int64_t ncols, const void* x, size_t x_stride,
                    int64_t m, float* y, size_t y_stride, const float* residual);
int64_t cake_panel_cols(void);  // weight rows per panel: a block's best alignment

// One weight row dequantized to float32 (k elements): the prefill path may
// widen one matrix at a time into a scratch buffer and multiply in float.
typedef void (*cake_dequant_fn)(int64_t k, const void* w, float* out);

void cake_dequant_q4_0(int64_t k, const void* w, float* out);
void cake_dequant_q4_1(int64_t k, const void* w, float* out);
void cake_dequant_q5_0(int64_t k, const void* w, float* out);
void cake_dequant_q5_1(int64_t k, const void* w, float* out);
void cake_dequant_q8_0(int64_t k, const void* w, float* out);
void cake_dequant_q2_k(int64_t k, const void* w, float* out);
void cake_dequant_q3_k(int64_t k, const void* w, float* out);
void cake_dequant_q4_k(int64_t k, const void* w, float* out);
void cake_dequant_q5_k(int64_t k, const void* w, float* out);
void cake_dequant_q6_k(int64_t k, const void* w, float* out);
void cake_dequant_f16(int64_t k, const void* w, float* out);
void cake_dequant_bf16(int64_t k, const void* w, float* out);
void cake_dequant_f32(int64_t k, const void* w, float* out);  // a copy

// Repacked formats: tiles of `rows` weight rows stored interleaved at load, so
// that one product instruction serves several rows (layouts at the top of the
// files): the block formats' tiles of 8 rows (repack.cc; the K-quants'
// repack_k.cc, on cake_q8_256 activations, the others on cake_q8_32), and
// BF16P / F16P / F32P, tiles of 32 rows of 16-bit or float32 weights
// (gemm16.cc; null where not compiled in). A tile has the bytes of its plain rows.
typedef struct {
  int64_t group_bytes;  // one block (32 elements; K-quants 256; floats 1) of the tile's rows
  float s_scale;        // gemm wants each cake_q8_32.s multiplied by this first (others: 1)
  // ntiles consecutive tiles of a matrix, from a multiple of `align` (tile t's
  // bytes at w + t * (k / block) * group_bytes, interleaved as below):
  // y[i * y_stride + rows t + r] = dot(tile t's row r, activation row i), i < nrows, r < rows.
  // A kernel may take two adjacent tiles at once; each column's bits do not depend
  // on ntiles or nrows.
  void (*gemm)(int64_t k, const void* w, int64_t ntiles, const void* x, size_t x_stride, int nrows,
               float* y, size_t y_stride);
  // one tile, its groups one after another -> out (rows, k)
  void (*dequant)(int64_t k, const void* w, float* out);
  // `rows` plain rows, w_stride bytes apart -> one tile at out, its groups one after another
  void (*repack)(int64_t k, const void* w, size_t w_stride, void* out);
  int64_t rows;        // weight rows per tile
  int64_t align;       // blocks of work start on multiples of this many tiles (taken in pairs: 2)
  int64_t k_multiple;  // K must be a multiple of this (beyond the plain format's block)
  // 1: each tile's groups one after another. 2: tiles 2p and 2p + 1 stored as
  // one unit, group b of each in turn (2p's, then 2p + 1's, then b + 1); an
  // odd last tile alone (cake_repack and cake_dequantize move the groups).
  int64_t interleave;
  // null, or: gemm wants each quantized activation row (k elements) passed
  // through this first, in place (repack_k.cc's paired chunks)
  void (*arrange)(void* x, int64_t k);
} cake_tile_kernels;

extern const cake_tile_kernels cake_r8_q4_0, cake_r8_q4_1, cake_r8_q5_0, cake_r8_q5_1, cake_r8_q8_0;
extern const cake_tile_kernels cake_r8_q2_k, cake_r8_q3_k, cake_r8_q4_k, cake_r8_q5_k,
    cake_r8_q6_k;  // repack_k.cc
extern const cake_tile_kernels* const cake_tiles_bf16;  // gemm16.cc, null where not compiled in
extern const cake_tile_kernels* const cake_tiles_f16;
extern const cake_tile_kernels* const cake_tiles_f32;

// Runs fn(ctx, i, n) for i in [0, n) on the driver's thread pool, the caller
// being i = 0: n is the pool's size, or 1 (the caller alone) when max_threads
// <= 1. One call at a time across the library (matmul.cc holds the pool);
// fn shares out its work itself (e.g. from an atomic counter).
void cake_parallel(void (*fn)(void* ctx, int i, int n), void* ctx, int max_threads);

// float16 <-> float32 helpers every file may use (F16C where compiled in).
float cake_f16_to_f32(uint16_t h);
// BF16's activations: y[i] = x[i] rounded to bfloat16, to nearest even (NaN stays NaN).
void cake_round_bf16(const float* x, uint16_t* y, int64_t k);

#ifdef __cplusplus
}
#endif
