// The driver: y (M, N) = x (M, K) @ W^T for every format, on a persistent
// thread pool, as plain C entry points (ctypes) and XLA FFI handlers (jax).
//
// cake_matmul_fused also folds in what surrounds a product in a decoder
// layer, so that a decode step is a few library calls per layer rather than
// tens of small XLA ops (each of which cost ~5 us of dispatch on 2 cores):
// a prologue on x (RMS norm times a weight, or SwiGLU of x's two halves) and a
// residual added to y.
//
// x is quantized once per call into the activation blocks of qdot.h (a scratch
// buffer), then threads take blocks of weight rows from a shared counter and
// run the format's dot for tiles of up to kTileRows activation rows. The
// repacked formats (repack.cc; the K-quant ones, on cake_q8_256 activations,
// in repack_k.cc) are taken in tiles of 8 weight rows instead.
//
// The K-quant kernels live in kquants.cc, which may be absent or incomplete:
// on ELF systems their symbols are weak references (null when missing) and a
// format is listed only if both its dot and dequantize are present; elsewhere
// build.py passes -DCAKE_HAVE_KQUANTS when kquants.cc exists. The repacked
// K-quant tables (repack_k.cc) are weak on ELF as well: absent, they are null
// and those formats are not listed.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "counter.h"
#include "qdot.h"
#include "simd.h"

#if defined(__linux__)
#include <sched.h>
#endif
#include <unistd.h>

#if defined(__ELF__)
#pragma weak cake_dot_q2_k
#pragma weak cake_dot_q3_k
#pragma weak cake_dot_q4_k
#pragma weak cake_dot_q5_k
#pragma weak cake_dot_q6_k
#pragma weak cake_dequant_q2_k
#pragma weak cake_dequant_q3_k
#pragma weak cake_dequant_q4_k
#pragma weak cake_dequant_q5_k
#pragma weak cake_dequant_q6_k
#pragma weak cake_r8_q2_k
#pragma weak cake_r8_q3_k
#pragma weak cake_r8_q4_k
#pragma weak cake_r8_q5_k
#pragma weak cake_r8_q6_k
#define KQUANT(sym) sym
#elif defined(CAKE_HAVE_KQUANTS)
#define KQUANT(sym) sym
#else
#define KQUANT(sym) nullptr
#endif

// The library's interface (built with -fvisibility=hidden: only these are exported).
#pragma GCC visibility push(default)
extern "C" {
int cake_format_count(void);
const char* cake_format_name(int code);
int cake_format_interleave(int code);
int cake_format_code(const char* name);
int cake_num_threads(void);
void cake_set_num_threads(int n);
void cake_set_panel_rows(int64_t rows);
int cake_matmul(int code, const float* x, int64_t m, int64_t k, const void* w, int64_t n, float* y);
int cake_matmul_fused(int code, const float* x, int64_t m, int64_t k, const void* w, int64_t n,
                      float* y, int prologue, const float* norm, float eps, const float* residual);
int cake_matmul_grouped(int code, const float* x, int64_t m, int64_t k, const void* w, int64_t experts,
                        int64_t n, const int32_t* counts, float* y, int prologue);
int cake_dequantize(int code, const void* w, int64_t n, int64_t k, float* out);
int cake_repack(int code, const void* w, int64_t n, int64_t k, void* out);
}
#pragma GCC visibility pop

namespace {

// Activation rows per dot call: the legacy kernels' kMaxRows, chosen by
// measurement there (8 against 4, 12 and 16 rows).
constexpr int kTileRows = 8;
// Activation rows per pass over a block of weight rows, so that they stay in
// L2 next to it (64 rows of K = 1536 in q8_32: 120 KiB). Q4_0 3072 x 576 at
// M = 512, 2 threads: 12.0-12.9 ms per matrix in chunks of 16 or 64 rows,
// 14.1-14.4 ms in one pass of all 512.
constexpr int64_t kChunkRows = 64;

// What the activations become before a product: float32 rows (F16, F32), blocks of
// 8-bit integers (the integer formats, as llama.cpp), or bfloat16 rows rounded
// to nearest even (BF16, as llama.cpp: its products then run as bf16 x bf16
// pairs, vdpbf16ps where the CPU has it, two multiply-adds per lane).
enum Act { kF32, kQ8_32, kQ8_256, kBF16 };

struct Format {
  const char* name;
  int64_t block_elems, block_bytes;
  Act act;
  cake_dot_fn dot;
  cake_dequant_fn dequant;
  const cake_tile_kernels* tiled = nullptr;  // a repacked format: no dot, no dequant
  const char* plain = nullptr;          // ... of this one
  cake_dot2_fn dot2 = nullptr;          // two weight rows at once, where there is one
  cake_panel_fn panel = nullptr;        // the GEMM for many x rows (gemm16.cc), where there is one
  int64_t panel_rows = 0;               // ... from this many x rows on (kPanelRowsBF16 ...)
};

// From how many x rows the panel GEMM (gemm16.cc) beats the dot kernels: 30
// SmolLM2 layers (benchmarks/bench_kernels.py, 2 threads, best of 5-7, ms,
// the range of three runs on the noisy machine; dot -> panel): BF16 M = 16
// 9-21 -> 12-14, M = 32 21-37 -> 17-21, M = 64 40-60 -> 24-26; F16 (float32
// FMAs) M = 16 19-40 -> 22-23, M = 32 64-86 -> 29-30, M = 64 138-144 -> 46.
// F32 (float32 FMAs on weights as stored, dot2; 3-5 runs, 2026-12-03, the
// machine busy with another tenant's tests, ms) M = 16 30-40 -> 38-51, M = 20
// 39-55 -> 41-56, M = 24 43-74 -> 48-61, M = 32 60-94 -> 60-70, M = 48 96-117
// -> 52-80. Decode (M <= 8) stays on the dot kernels.
constexpr int64_t kPanelRowsBF16 = 32, kPanelRowsF16 = 24, kPanelRowsF32 = 24;

const Format kAll[] = {
    {"Q4_0", 32, 18, kQ8_32, cake_dot_q4_0, cake_dequant_q4_0},
    {"Q4_1", 32, 20, kQ8_32, cake_dot_q4_1, cake_dequant_q4_1},
    {"Q5_0", 32, 22, kQ8_32, cake_dot_q5_0, cake_dequant_q5_0},
    {"Q5_1", 32, 24, kQ8_32, cake_dot_q5_1, cake_dequant_q5_1},
    {"Q8_0", 32, 34, kQ8_32, cake_dot_q8_0, cake_dequant_q8_0},
    {"Q2_K", 256, 84, kQ8_256, KQUANT(cake_dot_q2_k), KQUANT(cake_dequant_q2_k)},
    {"Q3_K", 256, 110, kQ8_256, KQUANT(cake_dot_q3_k), KQUANT(cake_dequant_q3_k)},
    {"Q4_K", 256, 144, kQ8_256, KQUANT(cake_dot_q4_k), KQUANT(cake_dequant_q4_k)},
    {"Q5_K", 256, 176, kQ8_256, KQUANT(cake_dot_q5_k), KQUANT(cake_dequant_q5_k)},
    {"Q6_K", 256, 210, kQ8_256, KQUANT(cake_dot_q6_k), KQUANT(cake_dequant_q6_k)},
    {"F16", 1, 2, kF32, cake_dot_f16, cake_dequant_f16, nullptr, nullptr, nullptr, cake_panel_f16, kPanelRowsF16},
    {"BF16", 1, 2, kBF16, cake_dot_bf16, cake_dequant_bf16, nullptr, nullptr, cake_dot2_bf16, cake_panel_bf16, kPanelRowsBF16},
    {"F32", 1, 4, kF32, cake_dot_f32, cake_dequant_f32, nullptr, nullptr, cake_dot2_f32, cake_panel_f32, kPanelRowsF32},
    {"Q4_0R8", 32, 18, kQ8_32, nullptr, nullptr, &cake_r8_q4_0, "Q4_0"},
    {"Q4_1R8", 32, 20, kQ8_32, nullptr, nullptr, &cake_r8_q4_1, "Q4_1"},
    {"Q5_0R8", 32, 22, kQ8_32, nullptr, nullptr, &cake_r8_q5_0, "Q5_0"},
    {"Q5_1R8", 32, 24, kQ8_32, nullptr, nullptr, &cake_r8_q5_1, "Q5_1"},
    {"Q8_0R8", 32, 34, kQ8_32, nullptr, nullptr, &cake_r8_q8_0, "Q8_0"},
    {"Q2_KR8", 256, 84, kQ8_256, nullptr, nullptr, &cake_r8_q2_k, "Q2_K"},
    {"Q3_KR8", 256, 110, kQ8_256, nullptr, nullptr, &cake_r8_q3_k, "Q3_K"},
    {"Q4_KR8", 256, 144, kQ8_256, nullptr, nullptr, &cake_r8_q4_k, "Q4_K"},
    {"Q5_KR8", 256, 176, kQ8_256, nullptr, nullptr, &cake_r8_q5_k, "Q5_K"},
    {"Q6_KR8", 256, 210, kQ8_256, nullptr, nullptr, &cake_r8_q6_k, "Q6_K"},
    // tiles of 32 rows stored at load (gemm16.cc; null, so not listed, without AVX-512)
    {"F16P", 1, 2, kF32, nullptr, nullptr, cake_tiles_f16, "F16"},
    {"BF16P", 1, 2, kBF16, nullptr, nullptr, cake_tiles_bf16, "BF16"},
    {"F32P", 1, 4, kF32, nullptr, nullptr, cake_tiles_f32, "F32"},
};

// The formats whose kernels are linked in; a format's code is its index here.
const std::vector<const Format*>& formats() {
  static const std::vector<const Format*> v = [] {
    std::vector<const Format*> out;
    for (const Format& f : kAll)
      if ((f.dot != nullptr && f.dequant != nullptr) || f.tiled != nullptr) out.push_back(&f);
    return out;
  }();
  return v;
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// A fixed set of threads that run fn(ctx, i, n) for i in [0, n), the caller
// being i = 0. Idle workers spin for kSpin before sleeping: the matmuls of one
// decode step come microseconds apart, and a futex wake costs more than that;
// spinning longer takes the cores from XLA's own threads between the calls.
// 30 SmolLM2 layers of Q4_0 with XLA ops between the products, 2 threads, ms
// per step at M = 1 / M = 8 over 3 rounds: no spin 7.1-9.0 / 24-29; 50 us
// 5.8-6.6 / 14-16 (one 19 / 17); 200 us 4.9-10 / 14-15; 1 ms 8-22 / 57-350;
// OpenMP (libgomp's default wait policy) instead of this pool 6.6-10.5 / 23-30.
//
// Every fn takes its work from a shared counter (Counter below, attention's
// units, ...), so the caller alone can finish a call. A worker joins a call
// only while the caller is still at its own share; once that is done the call
// is closed, and the caller waits for the workers that joined, not for one
// the scheduler has not run yet. Waiting for every worker had made each call
// as slow as the slowest thread's wake-up: with another process (or XLA's
// compile) on the cores, SmolLM2 decode steps of 8-10 ms took up to 400-600
// ms (150 calls a step); with 1 thread the worst was 50-120 ms.
class Pool {
 public:
  using Fn = void (*)(void*, int, int);
  static constexpr std::chrono::microseconds kSpin{50};

  explicit Pool(int n) : n_(n < 1 ? 1 : n) {
    for (int i = 1; i < n_; i++) threads_.emplace_back([this, i] { loop(i); });
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_.store(true);
      epoch_.fetch_add(1);
    }
    wake_.notify_all();
    for (std::thread& t : threads_) t.join();
  }

  int size() const { return n_; }

  void run(Fn fn, void* ctx) {
    if (n_ == 1) return fn(ctx, 0, 1);
    fn_ = fn;
    ctx_ = ctx;
    finished_.store(0);
    const uint64_t e = epoch_.load() + 1;
    gate_.store(e << kJoinBits);  // open: workers may join this call
    epoch_.store(e);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lk(mu_);
      wake_.notify_all();
    }
    fn(ctx, 0, n_);
    const int joined = (int)(gate_.exchange(0) & kJoinMask);  // closed
    if (!spin_until([&] { return finished_.load() == joined; })) {
      std::unique_lock<std::mutex> lk(mu_);
      caller_waiting_.store(true);
      done_.wait(lk, [&] { return finished_.load() == joined; });
      caller_waiting_.store(false);
    }
  }

 private:
  static constexpr int kJoinBits = 16;
  static constexpr uint64_t kJoinMask = (1u << kJoinBits) - 1;

  // Past the first ~microsecond the spin yields: on a busy machine the thread
  // waited for may be queued behind us on the same core.
  template <class P>
  static bool spin_until(P ready) {
    for (int i = 0; i < 256; i++) {
      if (ready()) return true;
      cpu_relax();
    }
    const auto until = std::chrono::steady_clock::now() + kSpin;
    for (;;) {
      if (ready()) return true;
      std::this_thread::yield();
      if (std::chrono::steady_clock::now() > until) return false;
    }
  }

  // Whether this worker got into call e (still open): gate_ holds the open
  // call's epoch above kJoinBits and how many joined it below.
  bool join(uint64_t e) {
    uint64_t g = gate_.load();
    while ((g >> kJoinBits) == e)
      if (gate_.compare_exchange_weak(g, g + 1)) return true;
    return false;
  }

  void loop(int i) {
    uint64_t seen = 0;
    for (;;) {
      if (!spin_until([&] { return epoch_.load() != seen; })) {
        std::unique_lock<std::mutex> lk(mu_);
        sleepers_.fetch_add(1);
        wake_.wait(lk, [&] { return epoch_.load() != seen; });
        sleepers_.fetch_sub(1);
      }
      seen = epoch_.load();
      if (stop_) return;
      if (!join(seen)) continue;  // that call is over: wait for the next
      fn_(ctx_, i, n_);
      finished_.fetch_add(1);
      if (caller_waiting_.load()) {
        std::lock_guard<std::mutex> lk(mu_);
        done_.notify_one();
      }
    }
  }

  const int n_;
  std::vector<std::thread> threads_;
  // seq_cst throughout: sleepers_/epoch_ and caller_waiting_/finished_ are
  // each a Dekker pair (a wake-up must not be lost between check and sleep);
  // fn_ and ctx_ are written before gate_ opens and read after a join.
  std::atomic<uint64_t> epoch_{0};
  std::atomic<uint64_t> gate_{0};
  std::atomic<int> finished_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> caller_waiting_{false};
  std::mutex mu_;
  std::condition_variable wake_, done_;
  Fn fn_ = nullptr;
  void* ctx_ = nullptr;
  std::atomic<bool> stop_{false};
};

int default_threads() {
  if (const char* env = std::getenv("CAKE_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
#endif
  const unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? (int)n : 1;
}

// One call at a time (XLA may run two custom calls concurrently; they would
// share the same cores anyway): g_mu guards the pool and the scratch buffer.
std::mutex g_mu;
Pool* g_pool = nullptr;  // never deleted at exit: workers may be asleep in it
pid_t g_pool_pid = 0;
int g_threads = 0;
std::vector<char> g_scratch;

Pool& pool() {
  if (g_threads == 0) g_threads = default_threads();
  if (g_pool == nullptr || g_pool_pid != getpid()) {  // a forked child has no workers
    if (g_pool != nullptr && g_pool_pid == getpid()) delete g_pool;
    g_pool = new Pool(g_threads);
    g_pool_pid = getpid();
  }
  return *g_pool;
}

// What x's rows go through before the product (cake_matmul_fused's prologue).
enum Prologue { kNone = 0, kRmsNorm = 1, kSwiGlu = 2 };

struct QuantizeJob {
  const Format* f;
  const float* x;
  int64_t k;
  char* xa;
  size_t xs;
  Counter rows;
  Prologue pro = kNone;
  const float* norm = nullptr;  // kRmsNorm: (k,) weight
  float eps = 0.0f;
};

// Row r of the product's input: x's row, or (prologue) it transformed into tmp.
//   kRmsNorm: x_r * (1 / sqrt(mean(x_r^2) + eps)) * norm, as llama.py's rms();
//   kSwiGlu:  x is (M, 2k): silu(x_r[:k]) * x_r[k:], silu(g) = g / (1 + exp(-g)).
// out = silu(g) * u, silu(g) = g sigmoid(g), sigmoid from t = exp(-|g|) (never
// overflows): 1 / (1 + t) for g >= 0, t / (1 + t) below. In vectors: libm's
// scalar expf took 16 us of a 53 us down projection at M = 8 (K = 1536).
void silu_mul(const float* g, const float* u, float* out, int64_t k) {
  int64_t i = 0;
#if CAKE_AVX512
  const __m512 one = _mm512_set1_ps(1.0f), sign = _mm512_set1_ps(-0.0f);
  for (; i + 16 <= k; i += 16) {
    const __m512 x = _mm512_loadu_ps(g + i);
    const __m512 t = cake_vmath::exp_nonpos(_mm512_or_ps(x, sign));  // exp(-|x|)
    const __m512 r = _mm512_div_ps(one, _mm512_add_ps(one, t));
    const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 sig = _mm512_mask_mul_ps(r, neg, r, t);
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mul_ps(x, sig), _mm512_loadu_ps(u + i)));
  }
#elif CAKE_AVX2
  const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  for (; i + 8 <= k; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    const __m256 t = cake_vmath::exp_nonpos(_mm256_or_ps(x, sign));
    const __m256 r = _mm256_div_ps(one, _mm256_add_ps(one, t));
    const __m256 neg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
    const __m256 sig = _mm256_blendv_ps(r, _mm256_mul_ps(r, t), neg);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(x, sig), _mm256_loadu_ps(u + i)));
  }
#endif
  for (; i < k; i++) {
    const float t = std::exp(-std::fabs(g[i])), r = 1.0f / (1.0f + t);
    out[i] = g[i] * (g[i] < 0.0f ? r * t : r) * u[i];
  }
}

// sum of x[i]^2 in 16 (AVX-512) or 8 lanes, then the lanes' sum: one dependent
// add per element took ~1 us a row of 576
float sum_squares(const float* x, int64_t k) {
  int64_t i = 0;
  float ss = 0.0f;
#if CAKE_AVX512
  __m512 a = _mm512_setzero_ps();
  for (; i + 16 <= k; i += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(x + i), a);
  ss = _mm512_reduce_add_ps(a);
#elif CAKE_AVX2
  __m256 a = _mm256_setzero_ps();
  for (; i + 8 <= k; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(x + i), a);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  ss = _mm_cvtss_f32(h);
#endif
  for (; i < k; i++) ss += x[i] * x[i];
  return ss;
}

const float* input_row(const QuantizeJob& j, int64_t r, float* tmp) {
  const int64_t k = j.k;
  if (j.pro == kSwiGlu) {
    const float* g = j.x + r * 2 * k;
    silu_mul(g, g + k, tmp, k);
    return tmp;
  }
  const float* row = j.x + r * k;
  if (j.pro == kNone) return row;
  const float inv = 1.0f / std::sqrt(sum_squares(row, k) / (float)k + j.eps);
  for (int64_t i = 0; i < k; i++) tmp[i] = row[i] * inv * j.norm[i];
  return tmp;
}

void quantize_work(void* p, int thread, int) {
  QuantizeJob& j = *(QuantizeJob*)p;
  thread_local std::vector<float> tmp;
  if (j.pro != kNone && tmp.size() < (size_t)j.k) tmp.resize((size_t)j.k);
  int64_t b, e;
  while (j.rows.take(thread, &b, &e))
    for (int64_t r = b; r < e; r++) {
      const float* x = input_row(j, r, tmp.data());
      if (j.f->act == kF32) {  // F16, F32 multiply float rows: keep the transformed row
        std::memcpy(j.xa + r * j.xs, x, (size_t)j.k * sizeof(float));
      } else if (j.f->act == kBF16) {
        uint16_t* row = (uint16_t*)(j.xa + r * j.xs);
        cake_round_bf16(x, row, j.k);
        if (j.xs > (size_t)j.k * sizeof(uint16_t)) row[j.k] = 0;  // the panel GEMM's pad (odd K)
      } else if (j.f->act == kQ8_32) {
        cake_q8_32* y = (cake_q8_32*)(j.xa + r * j.xs);
        cake_quantize_q8_32(x, y, j.k);
        if (j.f->tiled != nullptr && j.f->tiled->s_scale != 1.0f)
          for (int64_t i = 0; i < j.k / 32; i++) y[i].s *= j.f->tiled->s_scale;
      } else {
        cake_quantize_q8_256(x, (cake_q8_256*)(j.xa + r * j.xs), j.k);
      }
      if (j.f->tiled != nullptr && j.f->tiled->arrange != nullptr) j.f->tiled->arrange(j.xa + r * j.xs, j.k);
    }
}

struct MatmulJob {
  const Format* f;
  const char* xa;  // activation rows, xs bytes apart
  size_t xs;
  int64_t m, k, n;
  const char* w;
  size_t wrow;  // bytes per weight row
  float* y;
  Counter rows;                    // weight rows
  const float* residual = nullptr;  // (M, N) added to y, or none
};

void matmul_work(void* p, int thread, int) {
  MatmulJob& j = *(MatmulJob*)p;
  float out[2 * kTileRows];
  int64_t b, e;
  while (j.rows.take(thread, &b, &e))
    for (int64_t m0 = 0; m0 < j.m; m0 += kChunkRows) {
      const int64_t m1 = m0 + kChunkRows < j.m ? m0 + kChunkRows : j.m;
      for (int64_t row = b; row < e;) {
        const char* wr = j.w + row * j.wrow;
        // weight rows this pass: two where that saves loads (several activation rows)
        const int two = j.f->dot2 != nullptr && row + 1 < e && m1 - m0 > 1 ? 2 : 1;
        for (int64_t t = m0; t < m1; t += kTileRows) {
          const int r = (int)(m1 - t < kTileRows ? m1 - t : kTileRows);
          if (two == 2)
            j.f->dot2(j.k, wr, j.wrow, j.xa + t * j.xs, j.xs, r, out);
          else
            j.f->dot(j.k, wr, j.xa + t * j.xs, j.xs, r, out);
          for (int w = 0; w < two; w++)
            for (int i = 0; i < r; i++) {
              const int64_t at = (t + i) * j.n + row + w;
              j.y[at] = (j.residual != nullptr ? j.residual[at] : 0.0f) + out[w * r + i];
            }
        }
        row += two;
      }
    }
}

// The panel GEMM (16-bit formats, many x rows): a block of weight rows
// (output columns) against all of x.
void panel_work(void* p, int thread, int) {
  MatmulJob& j = *(MatmulJob*)p;
  int64_t b, e;
  while (j.rows.take(thread, &b, &e))
    j.f->panel(j.k, j.w + b * j.wrow, j.wrow, e - b, j.xa, j.xs, j.m, j.y + b, (size_t)j.n,
               j.residual != nullptr ? j.residual + b : nullptr);
}

// The repacked formats: rows counts tiles (of tiled->rows weight rows), wrow is
// a tile's bytes. A block of tiles goes to the kernel whole, so that it may take
// them in pairs (repack.cc); blocks start on multiples of tiled->align tiles.
void gemm_work(void* p, int thread, int) {
  MatmulJob& j = *(MatmulJob*)p;
  int64_t b, e;
  while (j.rows.take(thread, &b, &e))
    for (int64_t m0 = 0; m0 < j.m; m0 += kChunkRows) {
      const int64_t m1 = m0 + kChunkRows < j.m ? m0 + kChunkRows : j.m;
      const int64_t rows = j.f->tiled->rows;
      j.f->tiled->gemm(j.k, j.w + b * j.wrow, e - b, j.xa + m0 * j.xs, j.xs, (int)(m1 - m0),
                       j.y + m0 * j.n + b * rows, (size_t)j.n);
      if (j.residual != nullptr)
        for (int64_t i = m0; i < m1; i++)
          for (int64_t c = b * rows; c < e * rows; c++) j.y[i * j.n + c] += j.residual[i * j.n + c];
    }
}

struct DequantJob {
  const Format* f;
  const char* w;
  size_t wrow;
  int64_t k;
  float* out;
  Counter rows;
};

// Tile t of a tiled matrix of ntiles tiles of tile_bytes each (qdot.h,
// interleave): where its first group lies, and the bytes from one of its
// groups to the next.
struct TilePlace {
  size_t offset, stride;
};

TilePlace tile_place(const cake_tile_kernels* tk, int64_t ntiles, size_t tile_bytes, int64_t t) {
  const size_t g = (size_t)tk->group_bytes;
  if (tk->interleave != 2 || (t | 1) >= ntiles) return {(size_t)t * tile_bytes, g};
  return {(size_t)(t & ~(int64_t)1) * tile_bytes + (size_t)(t & 1) * g, 2 * g};
}

void dequant_work(void* p, int thread, int) {
  DequantJob& j = *(DequantJob*)p;
  thread_local std::vector<char> tile;  // a tile's groups, gathered one after another
  int64_t b, e;
  while (j.rows.take(thread, &b, &e))
    for (int64_t r = b; r < e; r++) {
      const cake_tile_kernels* tk = j.f->tiled;
      if (tk == nullptr) {
        j.f->dequant(j.k, j.w + r * j.wrow, j.out + r * j.k);
        continue;
      }
      const TilePlace at = tile_place(tk, j.rows.count, j.wrow, r);
      const char* src = j.w + at.offset;
      if (at.stride != (size_t)tk->group_bytes) {
        if (tile.size() < j.wrow) tile.resize(j.wrow);
        for (size_t g = 0; g * tk->group_bytes < j.wrow; g++)
          std::memcpy(tile.data() + g * tk->group_bytes, src + g * at.stride, (size_t)tk->group_bytes);
        src = tile.data();
      }
      tk->dequant(j.k, src, j.out + r * tk->rows * j.k);
    }
}

// Format::panel_rows, unless cake_set_panel_rows set another count for all
// (to measure either path, benchmarks/bench_kernels.py).
std::atomic<int64_t> g_panel_rows{0};

int64_t panel_rows(const Format* f) {
  const int64_t rows = g_panel_rows.load(std::memory_order_relaxed);
  return rows > 0 ? rows : f->panel_rows;
}

// Weight rows per work item: a tiled format's tile, else one.
int64_t tile_rows(const Format* f) { return f->tiled != nullptr ? f->tiled->rows : 1; }

// Whether an n x k matrix can be in f: a tiled format needs whole tiles (and
// BF16P an even K).
bool fits_tiles(const Format* f, int64_t n, int64_t k) {
  return f->tiled == nullptr || (n % f->tiled->rows == 0 && k % f->tiled->k_multiple == 0);
}

// Too little work to be worth waking the other threads.
bool small(int64_t elems) { return elems < (1 << 15); }

}  // namespace

int cake_format_count(void) { return (int)formats().size(); }

const char* cake_format_name(int code) {
  return code >= 0 && code < cake_format_count() ? formats()[code]->name : nullptr;
}

// How many tiles a unit of the format's repacked layout holds (qdot.h,
// interleave): 2 where this build stores them two by two, else 1 (also for
// formats that are not tiled); 0 for an unknown code.
int cake_format_interleave(int code) {
  if (code < 0 || code >= cake_format_count()) return 0;
  const cake_tile_kernels* tk = formats()[code]->tiled;
  return tk != nullptr && tk->interleave == 2 ? 2 : 1;
}

int cake_format_code(const char* name) {
  for (int i = 0; i < cake_format_count(); i++)
    if (std::strcmp(formats()[i]->name, name) == 0) return i;
  return -1;
}

int cake_num_threads(void) {
  std::lock_guard<std::mutex> lk(g_mu);
  return pool().size();
}

void cake_set_num_threads(int n) {
  std::lock_guard<std::mutex> lk(g_mu);
  g_threads = n > 0 ? n : default_threads();
  if (g_pool != nullptr && g_pool_pid == getpid()) delete g_pool;
  g_pool = nullptr;
}

// From `rows` x rows on (<= 0: each format's default, kPanelRowsBF16 ...) the
// 16-bit formats take the panel GEMM.
void cake_set_panel_rows(int64_t rows) { g_panel_rows.store(rows > 0 ? rows : 0); }

void cake_parallel(void (*fn)(void*, int, int), void* ctx, int max_threads) {
  std::lock_guard<std::mutex> lk(g_mu);
  Pool& threads = pool();
  if (max_threads <= 1 || threads.size() == 1)
    fn(ctx, 0, 1);
  else
    threads.run(fn, ctx);
}

// 0 on success; -1 unknown format code; -2 k not a positive multiple of the
// block; -3 a repacked format's n not in whole tiles (8 or 32 rows; BF16P: or k odd); -4 an
// unknown prologue, or kRmsNorm without its weight.
//
// prologue (enum Prologue) transforms x first: kRmsNorm with norm (k,) and
// eps; kSwiGlu reads x as (m, 2k). residual (m, n), when not null, is added to y.
int cake_matmul_fused(int code, const float* x, int64_t m, int64_t k, const void* w, int64_t n,
                      float* y, int prologue, const float* norm, float eps, const float* residual) {
  if (code < 0 || code >= cake_format_count()) return -1;
  const Format* f = formats()[code];
  if (k <= 0 || k % (f->act == kQ8_256 ? 256 : f->block_elems) != 0) return -2;
  if (!fits_tiles(f, n, k)) return -3;
  if (prologue < kNone || prologue > kSwiGlu || (prologue == kRmsNorm && norm == nullptr)) return -4;
  if (m <= 0 || n <= 0) return 0;
  std::lock_guard<std::mutex> lk(g_mu);
  Pool& threads = pool();
  const bool one = small(m * n * k);

  MatmulJob job{f, (const char*)x, (size_t)k * sizeof(float), m, k, n, (const char*)w,
                (size_t)(k / f->block_elems * f->block_bytes), y, {}, residual};
  const bool by_panel = f->panel != nullptr && m >= panel_rows(f);
  if (f->act != kF32 || prologue != kNone) {
    if (f->act == kQ8_32)
      job.xs = (size_t)(k / 32) * sizeof(cake_q8_32);
    else if (f->act == kQ8_256)
      job.xs = (size_t)(k / 256) * sizeof(cake_q8_256);
    else if (f->act == kBF16)  // the panel GEMM reads pairs: an even stride
      job.xs = (size_t)(by_panel ? (k + 1) / 2 * 2 : k) * sizeof(uint16_t);
    if (g_scratch.size() < (size_t)m * job.xs) g_scratch.resize((size_t)m * job.xs);
    QuantizeJob q{f, x, k, g_scratch.data(), job.xs, {}, (Prologue)prologue, norm, eps};
    q.rows.split(m, threads.size(), 1);
    if (one || m < 4)
      quantize_work(&q, 0, 1);
    else
      threads.run(quantize_work, &q);
    job.xa = g_scratch.data();
  }
  Pool::Fn work = matmul_work;
  if (f->tiled != nullptr) {
    work = gemm_work;
    job.wrow *= f->tiled->rows;
    job.rows.split(n / f->tiled->rows, threads.size(), f->tiled->align);
  } else if (by_panel) {
    work = panel_work;
    job.rows.split(n, threads.size(), cake_panel_cols());
  } else {
    job.rows.split(n, threads.size(), 16);  // 16 floats: one cache line of y
  }
  if (one)
    work(&job, 0, 1);
  else
    threads.run(work, &job);
  return 0;
}

int cake_matmul(int code, const float* x, int64_t m, int64_t k, const void* w, int64_t n, float* y) {
  return cake_matmul_fused(code, x, m, k, w, n, y, kNone, nullptr, 0.0f, nullptr);
}

namespace {

// Every expert's product of one grouped call, drained in turn by each thread:
// one wake of the pool for the layer's experts, not one per expert.
struct GroupJob {
  std::vector<std::unique_ptr<MatmulJob>> jobs;
  Pool::Fn work;
};

void group_work(void* p, int a, int b) {
  GroupJob& g = *(GroupJob*)p;
  for (auto& j : g.jobs) g.work(j.get(), a, b);
}

}  // namespace

// A mixture of experts' products in one call: x (m, k) (or (m, 2k) with
// kSwiGlu) holds the rows routed to expert 0, then those of expert 1, ...
// (counts[e] of them, summing to at most m); w (experts, n, row bytes) in
// `code`; y (m, n): each group of rows times its expert's matrix, rows past the
// groups zero. Each row is multiplied as cake_matmul_fused would multiply it
// alone (activations quantized once per row), so a token's numbers do not
// depend on the others routed with it. 0 on success, the codes of
// cake_matmul_fused, -5 a negative count or counts summing past m.
int cake_matmul_grouped(int code, const float* x, int64_t m, int64_t k, const void* w, int64_t experts,
                        int64_t n, const int32_t* counts, float* y, int prologue) {
  if (code < 0 || code >= cake_format_count()) return -1;
  const Format* f = formats()[code];
  if (k <= 0 || k % (f->act == kQ8_256 ? 256 : f->block_elems) != 0) return -2;
  if (!fits_tiles(f, n, k)) return -3;
  if (prologue != kNone && prologue != kSwiGlu) return -4;
  int64_t used = 0;
  for (int64_t e = 0; e < experts; e++) {
    if (counts[e] < 0) return -5;
    used += counts[e];
  }
  if (used > m) return -5;
  if (m > used) std::memset(y + used * n, 0, sizeof(float) * (size_t)((m - used) * n));
  if (used == 0 || n <= 0) return 0;
  std::lock_guard<std::mutex> lk(g_mu);
  Pool& threads = pool();
  const size_t wbytes = (size_t)(k / f->block_elems * f->block_bytes);  // one weight row
  size_t xs = (size_t)k * sizeof(float);
  const char* xa = (const char*)x;
  if (f->act != kF32 || prologue != kNone) {
    if (f->act == kQ8_32)
      xs = (size_t)(k / 32) * sizeof(cake_q8_32);
    else if (f->act == kQ8_256)
      xs = (size_t)(k / 256) * sizeof(cake_q8_256);
    else if (f->act == kBF16)
      xs = (size_t)k * sizeof(uint16_t);
    if (g_scratch.size() < (size_t)used * xs) g_scratch.resize((size_t)used * xs);
    QuantizeJob q{f, x, k, g_scratch.data(), xs, {}, (Prologue)prologue, nullptr, 0.0f};
    q.rows.split(used, threads.size(), 1);
    if (small(used * k * 8) || used < 4)
      quantize_work(&q, 0, 1);
    else
      threads.run(quantize_work, &q);
    xa = g_scratch.data();
  }
  GroupJob g;
  g.work = f->tiled != nullptr ? gemm_work : matmul_work;
  int64_t off = 0, work = 0;
  for (int64_t e = 0; e < experts; e++) {
    const int64_t c = counts[e];
    if (c == 0) continue;
    auto j = std::make_unique<MatmulJob>();
    j->f = f, j->xa = xa + off * xs, j->xs = xs, j->m = c, j->k = k, j->n = n;
    j->w = (const char*)w + e * n * wbytes, j->wrow = wbytes, j->y = y + off * n;
    if (f->tiled != nullptr) {
      j->wrow *= f->tiled->rows;
      j->rows.split(n / f->tiled->rows, threads.size(), f->tiled->align);
    } else {
      j->rows.split(n, threads.size(), 16);
    }
    g.jobs.push_back(std::move(j));
    off += c;
    work += c * n * k;
  }
  if (small(work))
    group_work(&g, 0, 1);
  else
    threads.run(group_work, &g);
  return 0;
}

// out (n, k) float32. Same return codes as cake_matmul.
int cake_dequantize(int code, const void* w, int64_t n, int64_t k, float* out) {
  if (code < 0 || code >= cake_format_count()) return -1;
  const Format* f = formats()[code];
  if (k <= 0 || k % f->block_elems != 0) return -2;
  if (!fits_tiles(f, n, k)) return -3;
  if (n <= 0) return 0;
  std::lock_guard<std::mutex> lk(g_mu);
  Pool& threads = pool();
  const int64_t tile = tile_rows(f);  // rows per work item
  DequantJob job{f, (const char*)w, (size_t)(k / f->block_elems * f->block_bytes * tile), k, out, {}};
  job.rows.split(n / tile, threads.size(), 1);
  if (small(n * k))
    dequant_work(&job, 0, 1);
  else
    threads.run(dequant_work, &job);
  return 0;
}

// The plain-format matrix w (n, k) (code: its format) as the repacked format
// whose code is returned, into out (as many bytes); -1 no repacked form of
// that format; -2 k not a positive multiple of the block; -3 n not in whole tiles (or, BF16P, k odd).
int cake_repack(int code, const void* w, int64_t n, int64_t k, void* out) {
  if (code < 0 || code >= cake_format_count()) return -1;
  const Format* f = formats()[code];
  int to = -1;
  for (int i = 0; i < cake_format_count(); i++)
    if (formats()[i]->plain != nullptr && std::strcmp(formats()[i]->plain, f->name) == 0) to = i;
  if (to < 0) return -1;
  if (k <= 0 || k % f->block_elems != 0) return -2;
  const Format* r = formats()[to];
  if (!fits_tiles(r, n, k)) return -3;
  const size_t row = (size_t)(k / f->block_elems * f->block_bytes);
  const cake_tile_kernels* tk = r->tiled;
  const int64_t rows = tk->rows, ntiles = n / rows;
  const size_t tile_bytes = (size_t)rows * row, g = (size_t)tk->group_bytes;
  std::vector<char> tile;
  for (int64_t t = 0; t < ntiles; t++) {
    const TilePlace at = tile_place(tk, ntiles, tile_bytes, t);
    char* dst = (char*)out + at.offset;
    if (at.stride == g) {
      tk->repack(k, (const char*)w + t * tile_bytes, row, dst);
      continue;
    }
    tile.resize(tile_bytes);  // repacked alone, then its groups spread over the unit
    tk->repack(k, (const char*)w + t * tile_bytes, row, tile.data());
    for (size_t i = 0; i * g < tile_bytes; i++) std::memcpy(dst + i * at.stride, tile.data() + i * g, g);
  }
  return to;
}

#if defined(CAKE_WITH_XLA_FFI)
#include <string>
#include <string_view>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

int code_of(std::string_view name) {
  for (int i = 0; i < cake_format_count(); i++)
    if (name == formats()[i]->name) return i;
  return -1;
}

// Whether a weight row of row_bytes holds K values of f.
ffi::Error check_row(const Format* f, int64_t row_bytes, int64_t k) {
  if (k % f->block_elems != 0 || row_bytes != k / f->block_elems * f->block_bytes)
    return ffi::Error::InvalidArgument(std::string("cake: weight rows do not hold K values of ") + f->name);
  return ffi::Error::Success();
}

// w: (N, row bytes) uint8 for the block formats, (N, K) float16 / bfloat16.
ffi::Error check_weights(const Format* f, const ffi::AnyBuffer& w, int64_t k, int64_t* n) {
  const auto dims = w.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("cake: weights must be 2-D (N, row)");
  *n = dims[0];
  return check_row(f, dims[1] * (int64_t)ffi::ByteWidth(w.element_type()), k);
}

ffi::Error matmul_call(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                       std::string_view fmt, int prologue, const ffi::AnyBuffer* norm, float eps,
                       const ffi::AnyBuffer* residual) {
  const int code = code_of(fmt);
  if (code < 0) return ffi::Error::InvalidArgument("cake: format not compiled in: " + std::string(fmt));
  if (x.element_type() != ffi::DataType::F32 || y->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("cake: x and y must be float32");
  const auto xd = x.dimensions();
  if (xd.size() < 1 || xd.back() <= 0) return ffi::Error::InvalidArgument("cake: x must be (..., K), K > 0");
  const int64_t k = prologue == kSwiGlu ? xd.back() / 2 : xd.back();
  if (prologue == kSwiGlu && xd.back() % 2 != 0)
    return ffi::Error::InvalidArgument("cake: a SwiGLU prologue needs x (..., 2K)");
  const int64_t m = (int64_t)x.element_count() / xd.back();
  int64_t n;
  if (ffi::Error e = check_weights(formats()[code], w, k, &n); e.failure()) return e;
  if ((int64_t)y->element_count() != m * n) return ffi::Error::InvalidArgument("cake: y must be (..., N)");
  const float* norm_p = nullptr;
  if (norm != nullptr && norm->element_count() > 0) {
    if (norm->element_type() != ffi::DataType::F32 || (int64_t)norm->element_count() != k)
      return ffi::Error::InvalidArgument("cake: the norm weight must be float32 (K,)");
    norm_p = (const float*)norm->untyped_data();
  }
  const float* res_p = nullptr;
  if (residual != nullptr && residual->element_count() > 0) {
    if (residual->element_type() != ffi::DataType::F32 || (int64_t)residual->element_count() != m * n)
      return ffi::Error::InvalidArgument("cake: the residual must be float32 (..., N) like y");
    res_p = (const float*)residual->untyped_data();
  }
  const int rc = cake_matmul_fused(code, (const float*)x.untyped_data(), m, k, w.untyped_data(), n,
                                   (float*)y->untyped_data(), prologue, norm_p, eps, res_p);
  if (rc == -3) return ffi::Error::InvalidArgument("cake: a repacked format needs N in whole tiles (8 or 32 rows) and, BF16P, an even K");
  if (rc == -4) return ffi::Error::InvalidArgument("cake: unknown prologue, or an RMS norm without its weight");
  if (rc != 0) return ffi::Error::InvalidArgument("cake: K is not a multiple of the format's block");
  return ffi::Error::Success();
}

ffi::Error ffi_matmul(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y, std::string_view fmt) {
  return matmul_call(x, w, y, fmt, kNone, nullptr, 0.0f, nullptr);
}

// norm / residual: zero-size buffers when absent.
ffi::Error ffi_matmul_fused(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer norm, ffi::AnyBuffer residual,
                            ffi::Result<ffi::AnyBuffer> y, std::string_view fmt, int64_t prologue, float eps) {
  return matmul_call(x, w, y, fmt, (int)prologue, &norm, eps, &residual);
}

ffi::Error ffi_matmul_grouped(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer counts,
                              ffi::Result<ffi::AnyBuffer> y, std::string_view fmt, int64_t prologue) {
  const int code = code_of(fmt);
  if (code < 0) return ffi::Error::InvalidArgument("cake: format not compiled in: " + std::string(fmt));
  if (x.element_type() != ffi::DataType::F32 || y->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("cake: x and y must be float32");
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3) return ffi::Error::InvalidArgument("cake: x must be (M, K), w (E, N, row)");
  if (counts.element_type() != ffi::DataType::S32 || (int64_t)counts.element_count() != wd[0])
    return ffi::Error::InvalidArgument("cake: counts must be int32 (E,)");
  const int64_t k = prologue == kSwiGlu ? xd[1] / 2 : xd[1];
  if (ffi::Error e = check_row(formats()[code], wd[2] * (int64_t)ffi::ByteWidth(w.element_type()), k); e.failure())
    return e;
  if ((int64_t)y->element_count() != xd[0] * wd[1]) return ffi::Error::InvalidArgument("cake: y must be (M, N)");
  const int rc = cake_matmul_grouped(code, (const float*)x.untyped_data(), xd[0], k, w.untyped_data(), wd[0], wd[1],
                                     (const int32_t*)counts.untyped_data(), (float*)y->untyped_data(), (int)prologue);
  if (rc == -5) return ffi::Error::InvalidArgument("cake: expert row counts negative or past M");
  if (rc != 0) return ffi::Error::InvalidArgument("cake: grouped product failed (code " + std::to_string(rc) + ")");
  return ffi::Error::Success();
}

// `after` is not read: it only makes XLA schedule the widening once that
// buffer exists (see cake.kernels.cpu.dequantize).
ffi::Error ffi_dequantize(ffi::AnyBuffer w, ffi::AnyBuffer /*after*/, ffi::Result<ffi::AnyBuffer> out,
                          std::string_view fmt) {
  const int code = code_of(fmt);
  if (code < 0) return ffi::Error::InvalidArgument("cake: format not compiled in: " + std::string(fmt));
  const auto od = out->dimensions();
  if (out->element_type() != ffi::DataType::F32 || od.size() != 2)
    return ffi::Error::InvalidArgument("cake: out must be float32 (N, K)");
  int64_t n;
  if (ffi::Error e = check_weights(formats()[code], w, od[1], &n); e.failure()) return e;
  if (n != od[0]) return ffi::Error::InvalidArgument("cake: out must have the weights' N rows");
  if (cake_dequantize(code, w.untyped_data(), n, od[1], (float*)out->untyped_data()) == -3)
    return ffi::Error::InvalidArgument("cake: a repacked format needs N in whole tiles (8 or 32 rows) and, BF16P, an even K");
  return ffi::Error::Success();
}

}  // namespace

#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(cake_ffi_matmul, ffi_matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x (..., K) float32
                                  .Arg<ffi::AnyBuffer>()  // w (N, row)
                                  .Ret<ffi::AnyBuffer>()  // y (..., N) float32
                                  .Attr<std::string_view>("fmt"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(cake_ffi_matmul_fused, ffi_matmul_fused,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x (..., K) or (..., 2K) float32
                                  .Arg<ffi::AnyBuffer>()  // w (N, row)
                                  .Arg<ffi::AnyBuffer>()  // norm (K,) float32 or (0,)
                                  .Arg<ffi::AnyBuffer>()  // residual (..., N) float32 or (0,)
                                  .Ret<ffi::AnyBuffer>()  // y (..., N) float32
                                  .Attr<std::string_view>("fmt")
                                  .Attr<int64_t>("prologue")
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(cake_ffi_matmul_grouped, ffi_matmul_grouped,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x (M, K) or (M, 2K) float32, rows by expert
                                  .Arg<ffi::AnyBuffer>()  // w (E, N, row)
                                  .Arg<ffi::AnyBuffer>()  // counts (E,) int32: rows of each expert
                                  .Ret<ffi::AnyBuffer>()  // y (M, N) float32
                                  .Attr<std::string_view>("fmt")
                                  .Attr<int64_t>("prologue"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(cake_ffi_dequantize, ffi_dequantize,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // w (N, row)
                                  .Arg<ffi::AnyBuffer>()  // after: unread, an ordering edge
                                  .Ret<ffi::AnyBuffer>()  // out (N, K) float32
                                  .Attr<std::string_view>("fmt"));
#pragma GCC visibility pop
#endif
