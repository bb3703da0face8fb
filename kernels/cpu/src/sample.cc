// One token drawn from softmax(z / T) over a row of logits, for the host-side
// sampler (cake/sampling.py): the same draw as its NumPy form (weights
// exp((z - max) / T), those under min_w times the top one's set to 0, the
// token where r * sum(weights) falls in their running sum, never one of weight
// 0), in two vector passes instead of ~10 NumPy calls over the row: 45-65 us
// for SmolLM2's 49k logits in NumPy, a few here. At 8 concurrent streams
// sampling took 13 % of a serving engine's step (py-spy).
//
// With top-k or top-p the tokens are filtered before the draw, as the NumPy
// form does: top-k keeps the tokens whose logit is at least the k-th largest
// (ties kept); top-p then keeps the largest weights, ties by the lower token
// id first, up to the first whose running sum reaches top_p times the total
// of those top-k kept; min-p last. Neither sorts the row. Top-k partitions
// only the logits at least a threshold read off a strided sample of the row,
// then draws from the short list it keeps (~11 us for 49k logits, k = 40).
// Top-p alone brackets its cut between thresholds on the weights (the mass at
// least each, 16 at a time in one vector pass: octaves, then sixteenths of
// the one the cut is in) and sorts the weights of that bracket only (~55 us
// more than a plain draw; NumPy's form, a partition and a sort of the 1024
// largest or of the whole row where those fall short: 150-4000 us). AVX2
// builds: top-k 12.5 us, top-p alone ~83; plain C++: 55 and 480-740.
//
// The weights come from cake_vmath::exp_nonpos (~1 ulp), so a draw can differ
// from NumPy's exp where r falls within rounding of a boundary; the same seed
// still gives the same tokens. Running sums: per block of 256 weights in
// float32 lanes, the blocks' in float64; inside the chosen block, float64 one
// by one (where the two disagree by rounding, the block's last non-zero weight).
#include <math.h>
#include <stdint.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "simd.h"

#pragma GCC visibility push(default)
extern "C" {
// The token's index, or -1 when the row has no finite maximum (all -inf, or a
// NaN), or n < 1: the caller then draws another way.
int64_t cake_sample(const float* z, int64_t n, float inv_t, float min_w, double r,
                    int64_t top_k, float top_p);
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

// The sum of len <= kBlock weights in float32 lanes (as weights() sums them).
float block_sum(const float* w, int64_t len) {
  int64_t i = 0;
  float s = 0.0f;
#if CAKE_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= len; i += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(w + i));
  s = _mm512_reduce_add_ps(acc);
#elif CAKE_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= len; i += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(w + i));
  float lanes[8];
  _mm256_storeu_ps(lanes, acc);
  for (float x : lanes) s += x;
#endif
  for (; i < len; i++) s += w[i];
  return s;
}

// The draw over stored weights w (n > 0, some non-zero), as cake_sample's own
// running sums: float32 lanes per block of kBlock, float64 across blocks and
// one by one inside the chosen block.
int64_t pick(const float* w, int64_t n, double r) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  thread_local std::vector<double> cum;
  cum.resize((size_t)blocks);
  double total = 0.0;
  for (int64_t b = 0; b < blocks; b++) {
    const int64_t start = b * kBlock, len = n - start < kBlock ? n - start : kBlock;
    total += block_sum(w + start, len);
    cum[(size_t)b] = total;
  }
  const double u = r * total;
  int64_t b = 0;
  while (b < blocks - 1 && cum[(size_t)b] <= u) b++;
  while (b > 0 && cum[(size_t)b] == cum[(size_t)b - 1]) b--;
  const int64_t start = b * kBlock, len = n - start < kBlock ? n - start : kBlock;
  const double before = b ? cum[(size_t)b - 1] : 0.0;
  double run = 0.0;
  int64_t last = -1;
  for (int64_t i = 0; i < len; i++) {
    if (w[start + i] == 0.0f) continue;
    run += w[start + i];
    last = i;
    if (before + run > u) return start + i;
  }
  return last >= 0 ? start + last : -1;
}

// The indices i with z[i] >= thr, in index order, into idx (room for n);
// their count.
int64_t at_least(const float* z, int64_t n, float thr, int32_t* idx) {
  int64_t c = 0, i = 0;
#if CAKE_AVX512
  const __m512 t = _mm512_set1_ps(thr);
  __m512i iv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i sixteen = _mm512_set1_epi32(16);
  for (; i + 16 <= n; i += 16) {
    const __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(z + i), t, _CMP_GE_OQ);
    _mm512_mask_compressstoreu_epi32(idx + c, m, iv);
    c += __builtin_popcount((unsigned)m);
    iv = _mm512_add_epi32(iv, sixteen);
  }
#elif CAKE_AVX2
  const __m256 t = _mm256_set1_ps(thr);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(z + i);
    for (unsigned m = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(x, t, _CMP_GE_OQ)); m; m &= m - 1)
      idx[c++] = (int32_t)(i + __builtin_ctz(m));
  }
#endif
  for (; i < n; i++) {
    idx[c] = (int32_t)i;
    c += z[i] >= thr;
  }
  return c;
}

// The k-th largest logit (0 < k < n, no NaN in z); idx gets the indices of
// the logits at least a threshold read off a strided sample of the row (its
// quantile 2k/n, with room to spare; the whole row where that holds fewer
// than k), so that only those are partitioned; their count.
float kth_largest(const float* z, int64_t n, int64_t k, int32_t* idx, int64_t* count) {
  thread_local std::vector<float> vals;
  const int64_t stride = n > 1024 ? n / 1024 : 1;
  vals.clear();
  for (int64_t i = 0; i < n; i += stride) vals.push_back(z[i]);
  const int64_t ns = (int64_t)vals.size();
  const int64_t q = std::min(ns - 1, 2 * k * ns / n + 8);
  std::nth_element(vals.begin(), vals.begin() + q, vals.end(), std::greater<float>());
  int64_t c = at_least(z, n, vals[(size_t)q], idx);
  if (c < k) c = at_least(z, n, -INFINITY, idx);
  vals.resize((size_t)c);
  for (int64_t j = 0; j < c; j++) vals[(size_t)j] = z[idx[j]];
  std::nth_element(vals.begin(), vals.begin() + (k - 1), vals.end(), std::greater<float>());
  *count = c;
  return vals[(size_t)(k - 1)];
}

// For each of nt <= 16 thresholds, the sum of the weights at least it
// (float32 lanes, then float64).
void masses_at_least(const float* w, int64_t n, const float* thr, int nt, double* out) {
  int64_t i = 0;
  for (int j = 0; j < nt; j++) out[j] = 0.0;
#if CAKE_AVX512
  __m512 acc[16], t[16];
  for (int j = 0; j < nt; j++) {
    acc[j] = _mm512_setzero_ps();
    t[j] = _mm512_set1_ps(thr[j]);
  }
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(w + i);
    for (int j = 0; j < nt; j++)
      acc[j] = _mm512_mask_add_ps(acc[j], _mm512_cmp_ps_mask(x, t[j], _CMP_GE_OQ), acc[j], x);
  }
  for (int j = 0; j < nt; j++) out[j] = _mm512_reduce_add_ps(acc[j]);
#elif CAKE_AVX2
  // 8 thresholds a sweep: 8 sums and 8 thresholds fill the 16 registers
  const int64_t end = n - n % 8;
  for (int j0 = 0; j0 < nt; j0 += 8) {
    const int nj = nt - j0 < 8 ? nt - j0 : 8;
    __m256 acc[8], t[8];
    for (int j = 0; j < nj; j++) {
      acc[j] = _mm256_setzero_ps();
      t[j] = _mm256_set1_ps(thr[j0 + j]);
    }
    for (int64_t k = 0; k < end; k += 8) {
      const __m256 x = _mm256_loadu_ps(w + k);
      for (int j = 0; j < nj; j++)
        acc[j] = _mm256_add_ps(acc[j], _mm256_and_ps(_mm256_cmp_ps(x, t[j], _CMP_GE_OQ), x));
    }
    for (int j = 0; j < nj; j++) {
      float lanes[8];
      _mm256_storeu_ps(lanes, acc[j]);
      for (float v : lanes) out[j0 + j] += v;
    }
  }
  i = end;
#endif
  for (; i < n; i++)
    for (int j = 0; j < nt; j++)
      if (w[i] >= thr[j]) out[j] += w[i];
}

// One pass of top-p's bracketing: the first of the 16 falling thresholds
// whose mass reaches target becomes lo, the one before it hi (with its mass,
// above); where none does, hi and above move to the last, lo stays 0.
void narrow(const float* w, int64_t n, const float* thr, double target, float* lo, float* hi,
            double* above) {
  double mass[16];
  masses_at_least(w, n, thr, 16, mass);
  for (int j = 0; j < 16; j++) {
    if (mass[j] >= target) {
      *lo = thr[j];
      if (j > 0) *hi = thr[j - 1], *above = mass[j - 1];
      return;
    }
  }
  *hi = thr[15], *above = mass[15];
}

// Top-p over a row's weights w (n > 0, the top one 1): keeps the largest, ties
// by the lower index first, up to the first whose running sum reaches top_p
// of the total; sets the others to 0, and those under min_w. The cut is
// bracketed by thresholds on the weights (the mass at least each, in two
// passes of 16, an octave apart and then a sixteenth of one), and only the
// weights in the last bracket are sorted: their running sum starts at the
// mass above it (where it falls short by rounding, the whole bracket is kept).
void keep_top_p(int64_t n, float top_p, float min_w, float* w) {
  double total = 0.0;
  for (int64_t start = 0; start < n; start += kBlock)
    total += block_sum(w + start, n - start < kBlock ? n - start : kBlock);
  const double target = (double)top_p * total;
  float hi = INFINITY, lo = 0.0f;  // the cut's weight is in [lo, hi)
  double above = 0.0;              // the mass at least hi
  float thr[16];
  for (float top = 1.0f; top > 0.0f && lo == 0.0f;) {  // octaves below top
    for (int j = 0; j < 16; j++) thr[j] = ldexpf(top, -(j + 1));
    narrow(w, n, thr, target, &lo, &hi, &above);
    if (lo == 0.0f) {
      top = thr[15];  // narrow() left hi there, and above its mass
      if (top < 1e-37f) break;  // below every weight weights() keeps: lo = 0
    }
  }
  if (lo > 0.0f && hi != INFINITY) {  // a sixteenth of the octave [lo, hi)
    for (int j = 0; j < 16; j++) thr[j] = hi * exp2f(-(float)(j + 1) / 16.0f);
    thr[15] = lo;
    narrow(w, n, thr, target, &lo, &hi, &above);
  }
  thread_local std::vector<int32_t> cand;
  cand.resize((size_t)n);
  int64_t nc = 0, i = 0;
#if CAKE_AVX512
  {
    const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi), zero = _mm512_setzero_ps();
    __m512i iv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; i + 16 <= n; i += 16) {
      const __m512 x = _mm512_loadu_ps(w + i);
      const __mmask16 m = _mm512_cmp_ps_mask(x, vlo, _CMP_GE_OQ) &
                          _mm512_cmp_ps_mask(x, vhi, _CMP_LT_OQ) &
                          _mm512_cmp_ps_mask(x, zero, _CMP_GT_OQ);
      _mm512_mask_compressstoreu_epi32(cand.data() + nc, m, iv);
      nc += __builtin_popcount((unsigned)m);
      iv = _mm512_add_epi32(iv, _mm512_set1_epi32(16));
    }
  }
#elif CAKE_AVX2
  {
    const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi), zero = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
      const __m256 x = _mm256_loadu_ps(w + i);
      const __m256 in = _mm256_and_ps(
          _mm256_and_ps(_mm256_cmp_ps(x, vlo, _CMP_GE_OQ), _mm256_cmp_ps(x, vhi, _CMP_LT_OQ)),
          _mm256_cmp_ps(x, zero, _CMP_GT_OQ));
      for (unsigned m = (unsigned)_mm256_movemask_ps(in); m; m &= m - 1)
        cand[(size_t)nc++] = (int32_t)(i + __builtin_ctz(m));
    }
  }
#endif
  for (; i < n; i++) {
    cand[(size_t)nc] = (int32_t)i;
    nc += (w[i] >= lo) & (w[i] < hi) & (w[i] > 0.0f);
  }
  cand.resize((size_t)nc);
  std::sort(cand.begin(), cand.end(), [w](int32_t x, int32_t y) {
    return w[x] > w[y] || (w[x] == w[y] && x < y);
  });
  float wc = 0.0f;
  int64_t ic = n;  // none in the bracket: keep every weight >= hi
  double run = above;
  for (size_t j = 0; j < cand.size(); j++) {
    run += w[cand[j]];
    wc = w[cand[j]], ic = cand[j];
    if (run >= target) break;
  }
  if (cand.empty()) wc = hi;
  i = 0;
#if CAKE_AVX512
  {
    const __m512 vc = _mm512_set1_ps(wc), vmin = _mm512_set1_ps(min_w);
    const __m512i vic = _mm512_set1_epi32((int32_t)(ic < n ? ic : n));
    __m512i iv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; i + 16 <= n; i += 16) {
      const __m512 x = _mm512_loadu_ps(w + i);
      const __mmask16 keep =
          (_mm512_cmp_ps_mask(x, vc, _CMP_GT_OQ) |
           (_mm512_cmp_ps_mask(x, vc, _CMP_EQ_OQ) & _mm512_cmple_epi32_mask(iv, vic))) &
          _mm512_cmp_ps_mask(x, vmin, _CMP_GE_OQ);
      _mm512_storeu_ps(w + i, _mm512_maskz_mov_ps(keep, x));
      iv = _mm512_add_epi32(iv, _mm512_set1_epi32(16));
    }
  }
#elif CAKE_AVX2
  {
    const __m256 vc = _mm256_set1_ps(wc), vmin = _mm256_set1_ps(min_w);
    const __m256i vic = _mm256_set1_epi32((int32_t)(ic < n ? ic : n));
    __m256i iv = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (; i + 8 <= n; i += 8) {
      const __m256 x = _mm256_loadu_ps(w + i);
      const __m256 le = _mm256_castsi256_ps(_mm256_xor_si256(
          _mm256_cmpgt_epi32(iv, vic), _mm256_set1_epi32(-1)));  // i <= ic
      const __m256 keep = _mm256_and_ps(
          _mm256_or_ps(_mm256_cmp_ps(x, vc, _CMP_GT_OQ),
                       _mm256_and_ps(_mm256_cmp_ps(x, vc, _CMP_EQ_OQ), le)),
          _mm256_cmp_ps(x, vmin, _CMP_GE_OQ));
      _mm256_storeu_ps(w + i, _mm256_and_ps(keep, x));
      iv = _mm256_add_epi32(iv, _mm256_set1_epi32(8));
    }
  }
#endif
  for (; i < n; i++) {
    const float x = w[i];
    w[i] = ((x > wc || (x == wc && i <= ic)) && x >= min_w) ? x : 0.0f;
  }
}

// cake_sample with top-k or top-p (see the top of the file).
int64_t sample_filtered(const float* z, int64_t n, float m, float inv_t, float min_w,
                        double r, int64_t top_k, float top_p) {
  thread_local std::vector<int32_t> idx;
  thread_local std::vector<float> buf;
  idx.resize((size_t)n);
  if (top_k > 0 && top_k < n) {
    // top-k first: a short list of tokens, in index order, and their weights
    int64_t c = 0;
    const float zk = kth_largest(z, n, top_k, idx.data(), &c);
    int64_t kept = 0;
    for (int64_t j = 0; j < c; j++)
      if (z[idx[j]] >= zk) idx[kept++] = idx[j];
    buf.resize((size_t)kept);
    float* w = buf.data();
    for (int64_t j = 0; j < kept; j++) {
      const float d = (z[idx[j]] - m) * inv_t;
      w[j] = d >= -87.0f ? expf(d) : 0.0f;
    }
    if (top_p < 1.0f) {
      thread_local std::vector<int32_t> order;
      order.resize((size_t)kept);
      double total = 0.0;
      for (int64_t j = 0; j < kept; j++) order[(size_t)j] = (int32_t)j, total += w[j];
      std::sort(order.begin(), order.end(), [w](int32_t x, int32_t y) {
        return w[x] > w[y] || (w[x] == w[y] && x < y);  // x < y: lower id
      });
      const double target = (double)top_p * total;
      double run = 0.0;
      size_t cut = order.size() - 1;
      for (size_t j = 0; j < order.size(); j++) {
        run += w[order[j]];
        if (run >= target) {
          cut = j;
          break;
        }
      }
      for (size_t j = cut + 1; j < order.size(); j++) w[order[j]] = 0.0f;
    }
    // the draw over the list: float64 running sum in index order
    double total = 0.0;
    for (int64_t j = 0; j < kept; j++)
      if (w[j] >= min_w) total += w[j];
    const double u = r * total;
    double run = 0.0;
    int64_t last = -1;
    for (int64_t j = 0; j < kept; j++) {
      if (!(w[j] >= min_w) || w[j] == 0.0f) continue;
      run += w[j];
      last = idx[j];
      if (run > u) return idx[j];
    }
    return last;
  }
  buf.resize((size_t)n);
  float* w = buf.data();
  for (int64_t start = 0; start < n; start += kBlock)
    weights(z + start, n - start < kBlock ? n - start : kBlock, m, inv_t, 0.0f, w + start);
  keep_top_p(n, top_p, min_w, w);
  return pick(w, n, r);
}

}  // namespace

int64_t cake_sample(const float* z, int64_t n, float inv_t, float min_w, double r,
                    int64_t top_k, float top_p) {
  if (n < 1 || !(inv_t > 0.0f) || has_nan(z, n)) return -1;
  const float m = row_max(z, n);
  if (!(m > -INFINITY) || m == INFINITY) return -1;
  if ((top_k > 0 && top_k < n) || top_p < 1.0f)
    return sample_filtered(z, n, m, inv_t, min_w, r, top_k, top_p);
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
// min_p, r, top_k and top_p, r given as the integer k of r = k / 2^53 (numpy's random() is
// such a k: the same double as the host sampler's, which JAX's float32
// arrays could not carry), split into its high and low 32 bits. -1 also where
// the row has no finite maximum or holds a NaN: no token can be drawn.
ffi::Error ffi_sample(F32_2 logits, F32_1 inv_t, F32_1 min_p, S32_2 r, S32_1 top_k, F32_1 top_p,
                      ffi::Result<S32_1> out) {
  const int64_t B = logits.dimensions()[0], V = logits.dimensions()[1];
  if (inv_t.dimensions()[0] != B || min_p.dimensions()[0] != B || r.dimensions()[0] != B ||
      r.dimensions()[1] != 2 || top_k.dimensions()[0] != B || top_p.dimensions()[0] != B ||
      out->dimensions()[0] != B)
    return ffi::Error::InvalidArgument(
        "cake sample: inv_t, min_p, top_k, top_p (B,), r (B, 2), out (B,) for logits (B, V)");
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
      tok = cake_sample(z + b * V, V, t, min_p.typed_data()[b], rb, top_k.typed_data()[b],
                        top_p.typed_data()[b]);
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
                                  .Arg<S32_1>()  // top_k (B,), 0: off
                                  .Arg<F32_1>()  // top_p (B,), 1: off
                                  .Ret<S32_1>());  // ids (B,)
#pragma GCC visibility pop
#endif
