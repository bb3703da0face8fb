// A whole Llama-style decoder layer as one XLA FFI call: the same library
// calls the layer makes one custom call each (backends/jax/llama.py, on the
// CPU kernel path), in the same order on the same buffers, so the results are
// the same bits; what changes is what XLA keeps per call. Each custom call of
// a compiled step costs ~15 KB resident (its HLO instruction, the proto copy
// XLA keeps, its thunk and call frame) and a dispatch: SmolLM2's decode step
// had 134 calls and 14 concatenates for 30 layers (5.5-7 MB a compiled step);
// one call per layer leaves 30.
//
//   x      (B, L, D) float32             the layer's input (the residual stream)
//   cos, sin (B, L, hd / 2)              rotary tables at each token's position
//   cache  (n_layers, 2, S, nkv, T, hd)  as for cake_attention; aliased by cache_out
//   slots, positions, lengths (B,) int32
//   ln1, ln2 (D,) float32                the attention's and the MLP's RMS norm weights
//   wq0..wq2  the q|k|v projection in up to 3 parts (of different formats),
//             outputs concatenated; an unused part is a zero-size buffer
//   wo        the attention output projection, (D, row)
//   wg0, wg1  gate|up in up to 2 parts, outputs concatenated (2 I in all)
//   wd        the down projection (D, row), from SwiGLU of gate|up
//   fmts      the 7 weights' formats, comma-separated (empty for unused parts)
//
//   h   = x + attention(rms(x) ln1 @ Wqkv) @ Wo
//   out = h + swiglu(rms(h) ln2 @ Wgu) @ Wd
//
// cake_ffi_layer_held is the same call with the layer's weights (ln1, ln2 and
// the 7 matrices) held here instead of passed: cake_layer_hold registers their
// pointers under a key, the call names the key (attr "weights"). A compiled
// step then has no weight parameters at all: each parameter of an XLA CPU
// executable keeps ~6 KB resident (its HLO instruction, buffer allocation and
// their protos), 9 a layer, per compiled step. The caller keeps the buffers
// alive and unchanged until cake_layer_release(key).
#include <stdint.h>
#include <string.h>

#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#pragma GCC visibility push(default)
extern "C" {
int cake_format_code(const char* name);
const char* cake_format_name(int code);
int cake_matmul_fused(int code, const float* x, int64_t m, int64_t k, const void* w, int64_t n, float* y,
                      int prologue, const float* norm, float eps, const float* residual);
int cake_attention(const float* qkv, const float* cos, const float* sin, void* cache, int kv_type,
                   const int32_t* slots, const int32_t* positions, const int32_t* lengths, int64_t B, int64_t L,
                   int64_t nh, int64_t nkv, int64_t hd, int64_t n_layers, int64_t S, int64_t T, int64_t layer,
                   int64_t window, float scale, float softcap, float* out);
}
#pragma GCC visibility pop

#if defined(CAKE_WITH_XLA_FFI)
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using F32_1 = ffi::Buffer<ffi::F32, 1>;
using F32_3 = ffi::Buffer<ffi::F32, 3>;
using S32_1 = ffi::Buffer<ffi::S32, 1>;

constexpr int kNone = 0, kRmsNorm = 1, kSwiGlu = 2;  // matmul.cc's Prologue
constexpr int kWeights = 7;                          // wq0 wq1 wq2 wo wg0 wg1 wd
constexpr size_t kKeptFloats = 1 << 18;              // 1 MB of scratch at most kept per thread

struct Part {
  int code = -1;
  const void* data = nullptr;
  int64_t n = 0;  // output columns
};

// y (m, sum of parts' n) = prologue(x) @ [W0 | W1 | ...], each part one call.
int parts_product(const std::vector<Part>& parts, const float* x, int64_t m, int64_t k, float* y,
                  int prologue, const float* norm, float eps, float* tmp) {
  if (parts.size() == 1)
    return cake_matmul_fused(parts[0].code, x, m, k, parts[0].data, parts[0].n, y, prologue, norm, eps, nullptr);
  int64_t width = 0;
  for (const Part& p : parts) width += p.n;
  int64_t off = 0;
  for (const Part& p : parts) {
    const int rc = cake_matmul_fused(p.code, x, m, k, p.data, p.n, tmp, prologue, norm, eps, nullptr);
    if (rc != 0) return rc;
    for (int64_t r = 0; r < m; r++) memcpy(y + r * width + off, tmp + r * p.n, sizeof(float) * p.n);
    off += p.n;
  }
  return 0;
}

// A layer's weights: ln1, ln2 (D,) float32 and the products' parts.
struct Weights {
  const float* ln1 = nullptr;
  const float* ln2 = nullptr;
  int64_t D = 0;
  std::vector<Part> qkv, gu;
  Part wo, wd;
};

// Checks the parts against each other and x's width D: "" or what is wrong.
std::string check_weights(const Weights& w, int64_t nkv, int64_t hd, int64_t* nh_out, int64_t* nq_out,
                          int64_t* ng_out) {
  if (w.qkv.empty() || w.gu.empty() || w.wo.code < 0 || w.wd.code < 0) return "wq0, wo, wg0 and wd are required";
  int64_t nq = 0, ng = 0;
  for (const Part& q : w.qkv) nq += q.n;
  for (const Part& g : w.gu) ng += g.n;
  if (hd <= 0 || nq % hd != 0 || nq / hd <= 2 * nkv) return "the q|k|v parts must give (nh + 2 nkv) hd columns";
  if (w.wo.n != w.D || w.wd.n != w.D || ng % 2 != 0) return "wo and wd must have D rows, gate|up an even width";
  *nh_out = nq / hd - 2 * nkv;
  *nq_out = nq;
  *ng_out = ng;
  return "";
}

// The layer on x (B, L, D) into out, the cache (n_layers, 2, S, nkv, T, hd) in place.
ffi::Error run_layer(const Weights& w, const float* xp, int64_t B, int64_t L, const float* cosp, const float* sinp,
                     void* kv, int kv_type, const int64_t cd[6], const int32_t* slots, const int32_t* positions,
                     const int32_t* lengths, float* outp, int64_t layer, int64_t window, float scale, float softcap,
                     float eps) {
  const int64_t D = w.D, M = B * L;
  const int64_t n_layers = cd[0], S = cd[2], nkv = cd[3], T = cd[4], hd = cd[5];
  int64_t nh = 0, nq = 0, ng = 0;
  const std::string bad = check_weights(w, nkv, hd, &nh, &nq, &ng);
  if (!bad.empty()) return ffi::Error::InvalidArgument("cake layer: " + bad);
  // scratch: q|k|v, attention's output, h, gate|up, one part's product. A
  // decode step's (4 KB to 264 KB for SmolLM2, 1 to 8 rows) is kept by the
  // thread; a prefill chunk's (MBs) is allocated for the call, not zeroed,
  // and freed after: kept, it would stay resident in every thread that ran one.
  int64_t widest = 0;
  for (const Part& q : w.qkv) widest = widest > q.n ? widest : q.n;
  for (const Part& g : w.gu) widest = widest > g.n ? widest : g.n;
  const size_t need = (size_t)(M * (nq + nh * hd + D + ng + widest));
  static thread_local std::vector<float> kept;
  std::unique_ptr<float[]> own;
  float* base;
  if (need <= kKeptFloats) {
    if (kept.size() < need) kept.resize(need);
    base = kept.data();
  } else {
    own.reset(new float[need]);
    base = own.get();
  }
  float* qkv = base;
  float* attn = qkv + M * nq;
  float* h = attn + M * nh * hd;
  float* gu = h + M * D;
  float* tmp = gu + M * ng;
  int rc = parts_product(w.qkv, xp, M, D, qkv, kRmsNorm, w.ln1, eps, tmp);
  if (rc != 0) return ffi::Error::InvalidArgument("cake layer: the q|k|v product failed (code " + std::to_string(rc) + ")");
  rc = cake_attention(qkv, cosp, sinp, kv, kv_type, slots, positions, lengths, B, L, nh, nkv, hd, n_layers, S, T,
                      layer, window, scale, softcap, attn);
  if (rc != 0) return ffi::Error::InvalidArgument("cake layer: attention failed (code " + std::to_string(rc) + ")");
  rc = cake_matmul_fused(w.wo.code, attn, M, nh * hd, w.wo.data, D, h, kNone, nullptr, 0.0f, xp);
  if (rc != 0) return ffi::Error::InvalidArgument("cake layer: the output projection failed (code " + std::to_string(rc) + ")");
  rc = parts_product(w.gu, h, M, D, gu, kRmsNorm, w.ln2, eps, tmp);
  if (rc != 0) return ffi::Error::InvalidArgument("cake layer: the gate|up product failed (code " + std::to_string(rc) + ")");
  rc = cake_matmul_fused(w.wd.code, gu, M, ng / 2, w.wd.data, D, outp, kSwiGlu, nullptr, 0.0f, h);
  if (rc != 0) return ffi::Error::InvalidArgument("cake layer: the down projection failed (code " + std::to_string(rc) + ")");
  return ffi::Error::Success();
}

// What both handlers check of the activations and the cache; the cache's
// kv_type and dims out. "" or what is wrong.
std::string check_activations(const F32_3& x, const F32_3& cos, const F32_3& sin, const ffi::AnyBuffer& cache,
                              const S32_1& slots, const S32_1& positions, const S32_1& lengths,
                              const ffi::AnyBuffer& cache_out, int* kv_type, int64_t cd[6]) {
  switch (cache.element_type()) {
    case ffi::DataType::F32: *kv_type = 0; break;
    case ffi::DataType::F16: *kv_type = 1; break;
    case ffi::DataType::BF16: *kv_type = 2; break;
    default: return "the cache must be float32, float16 or bfloat16";
  }
  const auto xd = x.dimensions(), dims = cache.dimensions();
  if (dims.size() != 6 || cache_out.dimensions().size() != 6 || cache_out.element_type() != cache.element_type() ||
      cache_out.size_bytes() != cache.size_bytes())
    return "cache and cache_out must be 6-D, of one type and shape";
  for (int i = 0; i < 6; i++) cd[i] = dims[i];
  const int64_t B = xd[0], L = xd[1];
  for (const auto* b : {&slots, &positions, &lengths})
    if (b->dimensions()[0] != B) return "slots, positions, lengths must be (B,)";
  for (const auto* t : {&cos, &sin}) {
    const auto d = t->dimensions();
    if (d[0] != B || d[1] != L || d[2] != cd[5] / 2) return "cos and sin must be (B, L, hd / 2)";
  }
  return "";
}

ffi::Error ffi_layer(F32_3 x, F32_3 cos, F32_3 sin,
                     ffi::AnyBuffer cache, S32_1 slots, S32_1 positions,
                     S32_1 lengths, F32_1 ln1, F32_1 ln2,
                     ffi::AnyBuffer wq0, ffi::AnyBuffer wq1, ffi::AnyBuffer wq2, ffi::AnyBuffer wo,
                     ffi::AnyBuffer wg0, ffi::AnyBuffer wg1, ffi::AnyBuffer wd, ffi::Result<F32_3> out,
                     ffi::Result<ffi::AnyBuffer> cache_out, std::string_view fmts, int64_t layer, int64_t window,
                     float scale, float softcap, float eps) {
  int kv_type;
  int64_t cd[6];
  std::string bad = check_activations(x, cos, sin, cache, slots, positions, lengths, *cache_out, &kv_type, cd);
  if (!bad.empty()) return ffi::Error::InvalidArgument("cake layer: " + bad);
  const int64_t D = x.dimensions()[2];
  if ((int64_t)ln1.element_count() != D || (int64_t)ln2.element_count() != D)
    return ffi::Error::InvalidArgument("cake layer: ln1 and ln2 must be (D,)");
  // the formats, one per weight operand
  std::string names[kWeights];
  {
    int i = 0;
    size_t start = 0;
    for (size_t j = 0; j <= fmts.size() && i < kWeights; j++)
      if (j == fmts.size() || fmts[j] == ',') {
        names[i++] = std::string(fmts.substr(start, j - start));
        start = j + 1;
      }
    if (i != kWeights) return ffi::Error::InvalidArgument("cake layer: fmts must name 7 weights");
  }
  const ffi::AnyBuffer* ws[kWeights] = {&wq0, &wq1, &wq2, &wo, &wg0, &wg1, &wd};
  Part p[kWeights];
  for (int i = 0; i < kWeights; i++) {
    if (names[i].empty() || ws[i]->element_count() == 0) continue;
    p[i].code = cake_format_code(names[i].c_str());
    if (p[i].code < 0) return ffi::Error::InvalidArgument("cake layer: format not compiled in: " + names[i]);
    if (ws[i]->dimensions().size() != 2) return ffi::Error::InvalidArgument("cake layer: weights must be 2-D (N, row)");
    p[i].data = ws[i]->untyped_data();
    p[i].n = ws[i]->dimensions()[0];
  }
  Weights w;
  w.ln1 = ln1.typed_data(), w.ln2 = ln2.typed_data(), w.D = D;
  for (int i = 0; i < 3; i++)
    if (p[i].code >= 0) w.qkv.push_back(p[i]);
  for (int i = 4; i < 6; i++)
    if (p[i].code >= 0) w.gu.push_back(p[i]);
  w.wo = p[3], w.wd = p[6];

  void* kv = cache_out->untyped_data();
  if ((const void*)kv != cache.untyped_data()) memcpy(kv, cache.untyped_data(), cache.size_bytes());
  return run_layer(w, x.typed_data(), x.dimensions()[0], x.dimensions()[1], cos.typed_data(),
                   sin.typed_data(), kv, kv_type, cd, slots.typed_data(), positions.typed_data(), lengths.typed_data(),
                   out->typed_data(), layer, window, scale, softcap, eps);
}

// ---- held weights -----------------------------------------------------------

std::shared_mutex g_held_mu;
std::unordered_map<int64_t, Weights>& held() {
  static auto* m = new std::unordered_map<int64_t, Weights>;  // never destroyed: calls may outlive exit's destructors
  return *m;
}

ffi::Error ffi_layer_held(F32_3 x, F32_3 cos, F32_3 sin, ffi::AnyBuffer cache, S32_1 slots, S32_1 positions,
                          S32_1 lengths, ffi::Result<F32_3> out, ffi::Result<ffi::AnyBuffer> cache_out,
                          int64_t weights, int64_t layer, int64_t window, float scale, float softcap, float eps) {
  int kv_type;
  int64_t cd[6];
  std::string bad = check_activations(x, cos, sin, cache, slots, positions, lengths, *cache_out, &kv_type, cd);
  if (!bad.empty()) return ffi::Error::InvalidArgument("cake layer: " + bad);
  std::shared_lock<std::shared_mutex> lk(g_held_mu);
  const auto it = held().find(weights);
  if (it == held().end())
    return ffi::Error::InvalidArgument("cake layer: no weights held under key " + std::to_string(weights) +
                                       " (released, or held in another process)");
  const Weights& w = it->second;
  if (w.D != x.dimensions()[2]) return ffi::Error::InvalidArgument("cake layer: x's width is not the held weights' D");
  void* kv = cache_out->untyped_data();
  if ((const void*)kv != cache.untyped_data()) memcpy(kv, cache.untyped_data(), cache.size_bytes());
  return run_layer(w, x.typed_data(), x.dimensions()[0], x.dimensions()[1], cos.typed_data(), sin.typed_data(), kv,
                   kv_type, cd, slots.typed_data(), positions.typed_data(), lengths.typed_data(), out->typed_data(),
                   layer, window, scale, softcap, eps);
}

}  // namespace

#pragma GCC visibility push(default)
extern "C" {
// Holds a layer's weights under `key` (replacing what it held): ln1, ln2 (D,)
// float32; 7 matrices in layer.cc's operand order (wq0 wq1 wq2 wo wg0 wg1 wd),
// codes[i] < 0 for an unused part, ns[i] its output columns (rows as stored).
// 0 on success; -1 a format code unknown; -2 the parts do not make a layer.
int cake_layer_hold(int64_t key, const float* ln1, const float* ln2, int64_t D, const int* codes,
                    const void* const* data, const int64_t* ns) {
  Weights w;
  w.ln1 = ln1, w.ln2 = ln2, w.D = D;
  Part p[kWeights];
  for (int i = 0; i < kWeights; i++) {
    if (codes[i] < 0) continue;
    if (cake_format_name(codes[i]) == nullptr || data[i] == nullptr || ns[i] <= 0) return -1;
    p[i].code = codes[i], p[i].data = data[i], p[i].n = ns[i];
  }
  for (int i = 0; i < 3; i++)
    if (p[i].code >= 0) w.qkv.push_back(p[i]);
  for (int i = 4; i < 6; i++)
    if (p[i].code >= 0) w.gu.push_back(p[i]);
  w.wo = p[3], w.wd = p[6];
  if (ln1 == nullptr || ln2 == nullptr || D <= 0 || w.qkv.empty() || w.gu.empty() || w.wo.code < 0 ||
      w.wd.code < 0 || w.wo.n != D || w.wd.n != D)
    return -2;
  std::unique_lock<std::shared_mutex> lk(g_held_mu);
  held()[key] = std::move(w);
  return 0;
}

// Forgets what `key` held (an unknown key: nothing); 1 if it held weights.
int cake_layer_release(int64_t key) {
  std::unique_lock<std::shared_mutex> lk(g_held_mu);
  return (int)held().erase(key);
}
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(cake_ffi_layer_held, ffi_layer_held,
                              ffi::Ffi::Bind()
                                  .Arg<F32_3>()  // x (B, L, D)
                                  .Arg<F32_3>()  // cos (B, L, hd / 2)
                                  .Arg<F32_3>()  // sin
                                  .Arg<ffi::AnyBuffer>()  // cache
                                  .Arg<S32_1>()  // slots
                                  .Arg<S32_1>()  // positions
                                  .Arg<S32_1>()  // lengths
                                  .Ret<F32_3>()  // out (B, L, D)
                                  .Ret<ffi::AnyBuffer>()  // cache_out: aliases cache
                                  .Attr<int64_t>("weights")
                                  .Attr<int64_t>("layer")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(cake_ffi_layer, ffi_layer,
                              ffi::Ffi::Bind()
                                  .Arg<F32_3>()  // x (B, L, D)
                                  .Arg<F32_3>()  // cos (B, L, hd / 2)
                                  .Arg<F32_3>()  // sin
                                  .Arg<ffi::AnyBuffer>()            // cache
                                  .Arg<S32_1>()  // slots
                                  .Arg<S32_1>()  // positions
                                  .Arg<S32_1>()  // lengths
                                  .Arg<F32_1>()  // ln1
                                  .Arg<F32_1>()  // ln2
                                  .Arg<ffi::AnyBuffer>()            // wq0
                                  .Arg<ffi::AnyBuffer>()            // wq1
                                  .Arg<ffi::AnyBuffer>()            // wq2
                                  .Arg<ffi::AnyBuffer>()            // wo
                                  .Arg<ffi::AnyBuffer>()            // wg0
                                  .Arg<ffi::AnyBuffer>()            // wg1
                                  .Arg<ffi::AnyBuffer>()            // wd
                                  .Ret<F32_3>()  // out (B, L, D)
                                  .Ret<ffi::AnyBuffer>()            // cache_out: aliases cache
                                  .Attr<std::string_view>("fmts")
                                  .Attr<int64_t>("layer")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<float>("eps"));
#pragma GCC visibility pop
#endif
