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
