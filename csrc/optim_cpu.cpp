// Fused optimizer update on the CPU: one pass over each 256-value block (dequantize the state,
// update, write the parameter, requantize with the block's new absmax). See optim.h.
#include "optim.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "search_tree.h"

namespace lightllm {
namespace {

#define LL_INLINE inline __attribute__((always_inline))

template <typename T>
LL_INLINE void load_block(const void* src, int64_t start, int64_t n, float* out) {
  const T* x = static_cast<const T*>(src) + start;
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(x[i]);
}

LL_INLINE void load_floats(const void* src, FloatType type, int64_t start, int64_t n, float* out) {
  switch (type) {
    case FloatType::kFloat32: load_block<float>(src, start, n, out); break;
    case FloatType::kFloat16: load_block<c10::Half>(src, start, n, out); break;
    case FloatType::kBFloat16: load_block<c10::BFloat16>(src, start, n, out); break;
  }
}

template <typename T>
LL_INLINE void store_block(void* dst, int64_t start, int64_t n, const float* in) {
  T* x = static_cast<T*>(dst) + start;
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<T>(in[i]);
}

LL_INLINE void store_floats(void* dst, FloatType type, int64_t start, int64_t n, const float* in) {
  switch (type) {
    case FloatType::kFloat32: store_block<float>(dst, start, n, in); break;
    case FloatType::kFloat16: store_block<c10::Half>(dst, start, n, in); break;
    case FloatType::kBFloat16: store_block<c10::BFloat16>(dst, start, n, in); break;
  }
}

// Nearest-code search for the optimizer states: the shared CPU search of search_tree.h (bucket
// table, cached per map), plus what the step needs on top: the midpoints as an Eytzinger tree cut
// into its 8 levels (level L: 2^L nodes, left to right) for the AVX-512 search that keeps the tree
// in registers, and the index of the map's first value >= 0 (the momentum's sign rule).
struct StateCodec {
  float map[256];
  alignas(64) float level[8][128] = {};
  int first_nonnegative = 0;
  std::shared_ptr<const CodeSearch> search;

  explicit StateCodec(const float* m) : search(code_search_for(m)) {
    std::copy_n(m, 256, map);
    while (first_nonnegative < 256 && map[first_nonnegative] < 0.0f) ++first_nonnegative;
    for (int l = 0; l < 8; ++l)
      for (int p = 0; p < (1 << l); ++p) level[l][p] = map_midpoint(m, eytzinger_rank((1 << l) + p));
  }
};

// The codec of a map (two maps in practice: cached, compared bit for bit).
std::shared_ptr<const StateCodec> codec_for(const float* map) {
  static std::mutex mutex;
  static std::vector<std::pair<std::array<float, 256>, std::shared_ptr<const StateCodec>>> recent;
  std::lock_guard<std::mutex> lock(mutex);
  for (auto& entry : recent)
    if (std::memcmp(entry.first.data(), map, sizeof(float) * 256) == 0) return entry.second;
  std::array<float, 256> key;
  std::memcpy(key.data(), map, sizeof(key));
  recent.insert(recent.begin(), {key, std::make_shared<const StateCodec>(map)});
  if (recent.size() > 4) recent.pop_back();
  return recent.front().second;
}


// ---- AVX-512 paths for the 8-bit state (map and search tree held in registers) ---------------
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LL_HAVE_AVX512_PATH 1
const bool kHasAvx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");

// map[code] * absmax with the 256-value map in 16 registers: 8 two-register permutes (32 entries
// each, by the code's low 5 bits), then blends by bits 5, 6 and 7. No memory access for the map;
// cheaper here than a 16-lane gather.
__attribute__((target("avx512f,avx512bw"))) void decode_avx512(const uint8_t* codes, const float* map, float a,
                                                                 float* out, int64_t n) {
  __m512 t[16];
  for (int r = 0; r < 16; ++r) t[r] = _mm512_loadu_ps(map + 16 * r);
  const __m512 va = _mm512_set1_ps(a);
  const __m512i bit5 = _mm512_set1_epi32(32), bit6 = _mm512_set1_epi32(64), bit7 = _mm512_set1_epi32(128);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
    const __mmask16 b5 = _mm512_test_epi32_mask(idx, bit5), b6 = _mm512_test_epi32_mask(idx, bit6),
                    b7 = _mm512_test_epi32_mask(idx, bit7);
    __m512 s[4];
    for (int q = 0; q < 4; ++q)
      s[q] = _mm512_mask_blend_ps(b5, _mm512_permutex2var_ps(t[4 * q], idx, t[4 * q + 1]),
                                  _mm512_permutex2var_ps(t[4 * q + 2], idx, t[4 * q + 3]));
    const __m512 value = _mm512_mask_blend_ps(b7, _mm512_mask_blend_ps(b6, s[0], s[1]),
                                              _mm512_mask_blend_ps(b6, s[2], s[3]));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(value, va));
  }
  for (; i < n; ++i) out[i] = map[codes[i]] * a;
}

__attribute__((target("avx512f,avx512bw"))) float absmax_avx512(const float* x, int64_t n) {
  __m512 m = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
  float r = _mm512_reduce_max_ps(m);
  for (; i < n; ++i) r = std::max(r, std::fabs(x[i]));
  return r;
}

// Encode by walking the Eytzinger tree with the whole tree in 19 registers: the pivot of a lane at
// level L is level[L][pos], looked up with permutes (one register for L <= 4, two for L = 5, then
// blends of permutes), so the search costs no memory access at all; it replaced two gathers per 16
// values (bucket table + one midpoint), which were the step's largest cost.
__attribute__((target("avx512f,avx512bw"))) void encode_tree_avx512(const StateCodec& c, const float* values,
                                                                      float inv, bool keep_sign, uint8_t* codes,
                                                                      int64_t n) {
  __m512 small[5];
  for (int l = 0; l < 5; ++l) small[l] = _mm512_load_ps(c.level[l]);  // levels 0..4: <= 16 nodes, padded
  __m512 l5[2], l6[4], l7[8];
  for (int r = 0; r < 2; ++r) l5[r] = _mm512_load_ps(c.level[5] + 16 * r);
  for (int r = 0; r < 4; ++r) l6[r] = _mm512_load_ps(c.level[6] + 16 * r);
  for (int r = 0; r < 8; ++r) l7[r] = _mm512_load_ps(c.level[7] + 16 * r);
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512 zero = _mm512_setzero_ps();
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i bit5 = _mm512_set1_epi32(32), bit6 = _mm512_set1_epi32(64);
  const __m512i first_nonnegative = _mm512_set1_epi32(c.first_nonnegative);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(values + i);
    const __m512 v = _mm512_mul_ps(x, vinv);
    __m512i pos = _mm512_setzero_si512();
    // one level: go right (pos = 2 pos + 1) where the pivot is below v, else left (2 pos)
#define LL_DESCEND(pivot)                                                                  \
  do {                                                                                     \
    const __mmask16 right = _mm512_cmp_ps_mask((pivot), v, _CMP_LT_OQ);                   \
    const __m512i twice = _mm512_slli_epi32(pos, 1);                                       \
    pos = _mm512_mask_add_epi32(twice, right, twice, one);                                 \
  } while (0)
    for (int l = 0; l < 5; ++l) LL_DESCEND(_mm512_permutexvar_ps(pos, small[l]));
    LL_DESCEND(_mm512_permutex2var_ps(l5[0], pos, l5[1]));
    {
      const __mmask16 hi = _mm512_test_epi32_mask(pos, bit5);
      LL_DESCEND(_mm512_mask_blend_ps(hi, _mm512_permutex2var_ps(l6[0], pos, l6[1]),
                                      _mm512_permutex2var_ps(l6[2], pos, l6[3])));
    }
    {
      const __mmask16 b5 = _mm512_test_epi32_mask(pos, bit5), b6 = _mm512_test_epi32_mask(pos, bit6);
      const __m512 q0 = _mm512_mask_blend_ps(b5, _mm512_permutex2var_ps(l7[0], pos, l7[1]),
                                             _mm512_permutex2var_ps(l7[2], pos, l7[3]));
      const __m512 q1 = _mm512_mask_blend_ps(b5, _mm512_permutex2var_ps(l7[4], pos, l7[5]),
                                             _mm512_permutex2var_ps(l7[6], pos, l7[7]));
      LL_DESCEND(_mm512_mask_blend_ps(b6, q0, q1));
    }
#undef LL_DESCEND
    if (keep_sign) {
      const __mmask16 fix = _mm512_cmp_ps_mask(x, zero, _CMP_LT_OQ) & _mm512_cmpge_epi32_mask(pos, first_nonnegative);
      pos = _mm512_mask_sub_epi32(pos, fix, pos, one);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(pos));
  }
  for (; i < n; ++i) {  // the tail, by the same tree
    const float v = values[i] * inv;
    int pos = 0;
    for (int l = 0; l < 8; ++l) pos = 2 * pos + (c.level[l][pos] < v ? 1 : 0);
    pos -= (keep_sign && values[i] < 0.0f && pos >= c.first_nonnegative) ? 1 : 0;
    codes[i] = static_cast<uint8_t>(pos);
  }
}

#endif

// Decode: map[code] * absmax (8-bit) or a copy (32-bit).
LL_INLINE void load_state(const void* state, const float* absmax, const float* map, int64_t block, int64_t start,
                          int64_t n, float* out) {
  if (absmax == nullptr) {
    std::copy_n(static_cast<const float*>(state) + start, n, out);
    return;
  }
  const uint8_t* codes = static_cast<const uint8_t*>(state) + start;
  const float a = absmax[block];
#ifdef LL_HAVE_AVX512_PATH
  if (kHasAvx512) return decode_avx512(codes, map, a, out, n);
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = map[codes[i]] * a;
}

LL_INLINE void store_state(void* state, float* absmax, const StateCodec* codec, bool keep_sign, int64_t block,
                           int64_t start, int64_t n, const float* values) {
  if (absmax == nullptr) {
    std::copy_n(values, n, static_cast<float*>(state) + start);
    return;
  }
  float m = 0.0f;
#ifdef LL_HAVE_AVX512_PATH
  if (kHasAvx512) {
    m = absmax_avx512(values, n);
  } else
#endif
  {
    for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(values[i]));
  }
  absmax[block] = m;
  const float inv = m == 0.0f ? 0.0f : 1.0f / m;
  uint8_t* codes = static_cast<uint8_t*>(state) + start;
#ifdef LL_HAVE_AVX512_PATH
  if (kHasAvx512) return encode_tree_avx512(*codec, values, inv, keep_sign, codes, n);
#endif
  codec->search->encode(values, inv, codes, n);  // nearest codes (the shared CPU search)
  if (keep_sign) {  // a negative value keeps a negative code (bitsandbytes' rule for the momentum)
    for (int64_t i = 0; i < n; ++i) codes[i] -= (values[i] < 0.0f && codes[i] >= codec->first_nonnegative) ? 1 : 0;
  }
}

struct StepConstants {
  float step_size, bc2_sqrt, decay;
  bool first;
};

template <OptimAlgo ALGO>
LL_INLINE void update(const OptimHyper& h, const StepConstants& k, int64_t n, const float* g, float* p, float* m,
                      float* v) {
  if constexpr (ALGO == OptimAlgo::kAdam || ALGO == OptimAlgo::kAdamW) {
    for (int64_t i = 0; i < n; ++i) {
      float gi = g[i];
      float pi = p[i];
      if constexpr (ALGO == OptimAlgo::kAdamW) pi *= k.decay; else gi += h.weight_decay * pi;
      const float mi = h.beta1 * m[i] + h.one_minus_beta1 * gi;
      const float vi = h.beta2 * v[i] + h.one_minus_beta2 * gi * gi;
      const float denom = std::sqrt(vi) / k.bc2_sqrt + h.eps;
      p[i] = pi - k.step_size * mi / denom;
      m[i] = mi;
      v[i] = vi;
    }
  } else if constexpr (ALGO == OptimAlgo::kLion) {
    for (int64_t i = 0; i < n; ++i) {
      const float c = h.beta1 * m[i] + h.one_minus_beta1 * g[i];
      const float direction = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : 0.0f);
      p[i] = p[i] * k.decay - h.lr * direction;
      m[i] = h.beta2 * m[i] + h.one_minus_beta2 * g[i];
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float gi = g[i] + h.weight_decay * p[i];
      const float mi = k.first ? gi : h.beta1 * m[i] + gi;
      p[i] -= h.lr * (h.nesterov ? gi + h.beta1 * mi : mi);
      m[i] = mi;
    }
  }
}

template <OptimAlgo ALGO>
LL_INLINE void update_blocks(const OptimHyper& h, const StepConstants& k, const OptimTensor& t, const StateCodec* c1,
                             const StateCodec* c2, int64_t block_begin, int64_t block_end) {
  constexpr bool kTwoState = ALGO == OptimAlgo::kAdam || ALGO == OptimAlgo::kAdamW;
  alignas(64) float g[kOptimBlock], p[kOptimBlock], m[kOptimBlock], v[kOptimBlock];
  const bool transform = h.has_grad_scale || h.maximize;
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t start = b * kOptimBlock;
    const int64_t n = std::min(kOptimBlock, t.n - start);
    // float32 gradients and parameters are used in place; other dtypes go through the buffers
    const float* gp = g;
    if (t.grad_type == FloatType::kFloat32 && !transform) {
      gp = static_cast<const float*>(t.grad) + start;
    } else {
      load_floats(t.grad, t.grad_type, start, n, g);
      if (h.has_grad_scale)  // divided, as the reference does (not multiplied by a reciprocal)
        for (int64_t i = 0; i < n; ++i) g[i] = g[i] / h.grad_scale;
      if (h.maximize)
        for (int64_t i = 0; i < n; ++i) g[i] = -g[i];
    }
    const bool param_f32 = t.param_type == FloatType::kFloat32;
    float* pp = param_f32 ? static_cast<float*>(t.param) + start : p;
    if (!param_f32) load_floats(t.param, t.param_type, start, n, p);
    load_state(t.state1, t.absmax1, c1->map, b, start, n, m);
    if constexpr (kTwoState) load_state(t.state2, t.absmax2, c2->map, b, start, n, v);
    update<ALGO>(h, k, n, gp, pp, m, v);
    if (!param_f32) store_floats(t.param, t.param_type, start, n, p);
    store_state(t.state1, t.absmax1, c1, true, b, start, n, m);
    if constexpr (kTwoState) store_state(t.state2, t.absmax2, c2, false, b, start, n, v);
  }
}

// Compiled for AVX-512, AVX2 and baseline x86-64, chosen at load time (the build targets the
// baseline; the loops above vectorize, gathers included, where the wider ISAs exist).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LL_CLONES
#endif

LL_CLONES void update_range(const OptimHyper& h, const StepConstants& k, const OptimTensor& t, const StateCodec* c1,
                            const StateCodec* c2, int64_t block_begin, int64_t block_end) {
  switch (h.algo) {
    case OptimAlgo::kAdam: update_blocks<OptimAlgo::kAdam>(h, k, t, c1, c2, block_begin, block_end); break;
    case OptimAlgo::kAdamW: update_blocks<OptimAlgo::kAdamW>(h, k, t, c1, c2, block_begin, block_end); break;
    case OptimAlgo::kLion: update_blocks<OptimAlgo::kLion>(h, k, t, c1, c2, block_begin, block_end); break;
    case OptimAlgo::kSGD: update_blocks<OptimAlgo::kSGD>(h, k, t, c1, c2, block_begin, block_end); break;
  }
}

// Integer test of the exponent field (an all-ones exponent is inf or NaN): an OR-reduction, which
// vectorizes; a float reduction would not (without reassociation it is a serial chain).
LL_INLINE bool floats_finite(const float* x, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, sizeof(u));
    bad |= (u & 0x7F800000u) == 0x7F800000u;
  }
  return bad == 0;
}

LL_CLONES bool all_finite_range(const void* x, FloatType type, int64_t begin, int64_t end) {
  if (type == FloatType::kFloat32) return floats_finite(static_cast<const float*>(x) + begin, end - begin);
  constexpr int64_t kChunk = 1024;
  alignas(64) float buffer[kChunk];
  for (int64_t s = begin; s < end; s += kChunk) {
    const int64_t n = std::min(kChunk, end - s);
    load_floats(x, type, s, n, buffer);
    if (!floats_finite(buffer, n)) return false;
  }
  return true;
}

}  // namespace

bool all_finite_cpu(const void* x, FloatType type, int64_t begin, int64_t end) {
  return all_finite_range(x, type, begin, end);
}

void optimizer_update_cpu(const OptimHyper& h, const OptimTensor& t, float step, const float* qmap1,
                          const float* qmap2, int64_t block_begin, int64_t block_end) {
  // Bias corrections in double, as the reference computes them, then rounded once.
  StepConstants k;
  k.step_size = static_cast<float>(h.lr / (1.0 - std::pow(h.beta1_d, static_cast<double>(step))));
  k.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(h.beta2_d, static_cast<double>(step))));
  k.decay = static_cast<float>(1.0 - static_cast<double>(h.lr) * h.weight_decay_d);
  k.first = step == 1.0f;
  const auto c1 = codec_for(qmap1);
  const auto c2 = codec_for(qmap2);
  update_range(h, k, t, c1.get(), c2.get(), block_begin, block_end);
}

}  // namespace lightllm
