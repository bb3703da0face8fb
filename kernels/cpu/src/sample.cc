// One token drawn from softmax(z / T) over a row of logits, for the host-side
// sampler (cake/sampling.py): the same draw as its NumPy form (weights
// exp((z - max) / T), those under min_w times the top one's set to 0, the
// token where r * sum(weights) falls in their running sum, never one of weight
// 0), in two vector passes instead of ~10 NumPy calls over the row: 45-65 us
// for SmolLM2's 49k logits in NumPy, a few here. At 8 concurrent streams
// sampling took 13 % of a serving engine's step (py-spy).
//
// The weights come from cake_vmath::exp_nonpos (~1 ulp), so a draw can differ
// from NumPy's exp where r falls within rounding of a boundary; the same seed
// still gives the same tokens. Running sums: per block of 256 weights in
// float32 lanes, the blocks' in float64; inside the chosen block, float64 one
// by one (where the two disagree by rounding, the block's last non-zero weight).
#include <math.h>
#include <stdint.h>

#include <vector>

#include "simd.h"

#pragma GCC visibility push(default)
extern "C" {
// The token's index, or -1 when the row has no finite maximum (all -inf, or a
// NaN), or n < 1: the caller then draws another way.
int64_t cake_sample(const float* z, int64_t n, float inv_t, float min_w, double r);
}
#pragma GCC visibility pop

namespace {

constexpr int64_t kBlock = 256;

float row_max(const float* z, int64_t n) {
  int64_t i = 0;
  float m = -INFINITY;
#if CAKE_AVX512
  __m512 v = _mm512_set1_ps(-INFINITY);
  for (; i + 16 <= n; i += 16) v = _mm512_max_ps(v, _mm512_loadu_ps(z + i));
  m = _mm512_reduce_max_ps(v);
#elif CAKE_AVX2
  __m256 v = _mm256_set1_ps(-INFINITY);
  for (; i + 8 <= n; i += 8) v = _mm256_max_ps(v, _mm256_loadu_ps(z + i));
  float lanes[8];
  _mm256_storeu_ps(lanes, v);
  for (float x : lanes) m = x > m ? x : m;
#endif
  for (; i < n; i++) {
    if (z[i] != z[i]) return NAN;
    m = z[i] > m ? z[i] : m;
  }
  return m;
}

// Any NaN in z (max_ps drops them): then no draw here.
bool has_nan(const float* z, int64_t n) {
  int64_t i = 0;
#if CAKE_AVX512
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(z + i);
    if (_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q)) return true;
  }
#elif CAKE_AVX2
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(z + i);
    if (_mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q))) return true;
  }
#endif
  for (; i < n; i++)
    if (z[i] != z[i]) return true;
  return false;
}

// w[i] = exp((z[i] - m) * inv_t), 0 below min_w (and where it underflows),
// for len <= kBlock; returns their sum (float32 lanes).
float weights(const float* z, int64_t len, float m, float inv_t, float min_w, float* w) {
  int64_t i = 0;
  float s = 0.0f;
#if CAKE_AVX512
  const __m512 vm = _mm512_set1_ps(m), vt = _mm512_set1_ps(inv_t), lo = _mm512_set1_ps(-87.0f);
  const __m512 vmin = _mm512_set1_ps(min_w);
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= len; i += 16) {
    const __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(z + i), vm), vt);
    __m512 e = cake_vmath::exp_nonpos(d);
    const __mmask16 keep = _mm512_cmp_ps_mask(d, lo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(e, vmin, _CMP_GE_OQ);
    e = _mm512_maskz_mov_ps(keep, e);
    _mm512_storeu_ps(w + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  s = _mm512_reduce_add_ps(acc);
#elif CAKE_AVX2
  const __m256 vm = _mm256_set1_ps(m), vt = _mm256_set1_ps(inv_t), lo = _mm256_set1_ps(-87.0f);
  const __m256 vmin = _mm256_set1_ps(min_w);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= len; i += 8) {
    const __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(z + i), vm), vt);
    const __m256 e0 = cake_vmath::exp_nonpos(d);
    const __m256 keep = _mm256_and_ps(_mm256_cmp_ps(d, lo, _CMP_GE_OQ), _mm256_cmp_ps(e0, vmin, _CMP_GE_OQ));
    const __m256 e = _mm256_and_ps(keep, e0);
    _mm256_storeu_ps(w + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, acc);
  for (float x : lanes) s += x;
#endif
  for (; i < len; i++) {
    const float d = (z[i] - m) * inv_t;
    float e = d >= -87.0f ? expf(d) : 0.0f;
    if (!(e >= min_w)) e = 0.0f;
    w[i] = e;
    s += e;
  }
  return s;
}

}  // namespace

int64_t cake_sample(const float* z, int64_t n, float inv_t, float min_w, double r) {
  if (n < 1 || !(inv_t > 0.0f) || has_nan(z, n)) return -1;
  const float m = row_max(z, n);
  if (!(m > -INFINITY) || m == INFINITY) return -1;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  thread_local std::vector<double> cum;
  cum.resize((size_t)blocks);
  float w[kBlock];
  double total = 0.0;
  for (int64_t b = 0; b < blocks; b++) {
    const int64_t start = b * kBlock, len = n - start < kBlock ? n - start : kBlock;
    total += weights(z + start, len, m, inv_t, min_w, w);
    cum[(size_t)b] = total;
  }
  // the top weight is 1: total >= 1
  const double u = r * total;
  int64_t b = 0;
  while (b < blocks - 1 && cum[(size_t)b] <= u) b++;
  while (b > 0 && cum[(size_t)b] == cum[(size_t)b - 1]) b--;  // rounding put u in an empty block
  const int64_t start = b * kBlock, len = n - start < kBlock ? n - start : kBlock;
  weights(z + start, len, m, inv_t, min_w, w);
  const double before = b ? cum[(size_t)b - 1] : 0.0;
  double run = 0.0;
  int64_t last = -1;
  for (int64_t i = 0; i < len; i++) {
    if (w[i] == 0.0f) continue;
    run += w[i];
    last = i;
    if (before + run > u) return start + i;
  }
  return last >= 0 ? start + last : -1;
}

// The first index of the row's largest value (np.argmax's), or -1 where the
// row holds a NaN.
static int64_t row_argmax(const float* z, int64_t n) {
  if (n < 1 || has_nan(z, n)) return -1;
  const float m = row_max(z, n);
  for (int64_t i = 0; i < n; i++)
    if (z[i] == m) return i;
  return 0;  // not reached: m is one of the values
}

#if defined(CAKE_WITH_XLA_FFI)
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using F32_1 = ffi::Buffer<ffi::F32, 1>;
using F32_2 = ffi::Buffer<ffi::F32, 2>;
using S32_1 = ffi::Buffer<ffi::S32, 1>;
using S32_2 = ffi::Buffer<ffi::S32, 2>;

// A token for each row of a head's logits, inside the jitted step (the JAX
// stage's draw, backends/jax/draw.py): only the ids leave it. Per row: inv_t
// < 0 draws nothing (-1), 0 is greedy (row_argmax), > 0 is cake_sample with
// min_p and r, r given as the integer k of r = k / 2^53 (numpy's random() is
// such a k: the same double as the host sampler's, which JAX's float32
// arrays could not carry), split into its high and low 32 bits. -1 also where
// the row has no finite maximum or holds a NaN: no token can be drawn.
ffi::Error ffi_sample(F32_2 logits, F32_1 inv_t, F32_1 min_p, S32_2 r, ffi::Result<S32_1> out) {
  const int64_t B = logits.dimensions()[0], V = logits.dimensions()[1];
  if (inv_t.dimensions()[0] != B || min_p.dimensions()[0] != B || r.dimensions()[0] != B ||
      r.dimensions()[1] != 2 || out->dimensions()[0] != B)
    return ffi::Error::InvalidArgument("cake sample: inv_t, min_p (B,), r (B, 2), out (B,) for logits (B, V)");
  const float* z = logits.typed_data();
  const uint32_t* k = reinterpret_cast<const uint32_t*>(r.typed_data());
  int32_t* ids = out->typed_data();
  for (int64_t b = 0; b < B; b++) {
    const float t = inv_t.typed_data()[b];
    int64_t tok = -1;
    if (t == 0.0f) {
      tok = row_argmax(z + b * V, V);
    } else if (t > 0.0f) {
      const double rb = ((double)k[2 * b] * 4294967296.0 + (double)k[2 * b + 1]) * 0x1p-53;
      tok = cake_sample(z + b * V, V, t, min_p.typed_data()[b], rb);
    }
    ids[b] = (int32_t)tok;
  }
  return ffi::Error::Success();
}

}  // namespace

#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(cake_ffi_sample, ffi_sample,
                              ffi::Ffi::Bind()
                                  .Arg<F32_2>()  // logits (B, V)
                                  .Arg<F32_1>()  // inv_t (B,)
                                  .Arg<F32_1>()  // min_p (B,)
                                  .Arg<S32_2>()  // r as k's 32-bit halves (B, 2)
                                  .Ret<S32_1>());  // ids (B,)
#pragma GCC visibility pop
#endif
