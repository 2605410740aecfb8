// GPTQ on the CPU: the small-M GEMV (AVX-512, AVX2 or scalar, chosen at run time) and the
// dequantization (for larger M and the backward pass). See gptq.h. Torch-free: bindings.cpp checks
// the arguments and runs column ranges on torch's thread pool.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <new>
#include <utility>
#include <vector>

#include "gptq.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define LL_GPTQ_X86 1
#endif

namespace lightllm {
namespace {

#define LL_INLINE inline __attribute__((always_inline))

LL_INLINE float load_float(const void* p, FloatType t, int64_t i) {
  switch (t) {
    case FloatType::kFloat16: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    case FloatType::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

LL_INLINE void store_float(void* p, FloatType t, int64_t i, float v) {
  switch (t) {
    case FloatType::kFloat16: static_cast<c10::Half*>(p)[i] = static_cast<c10::Half>(v); break;
    case FloatType::kBFloat16: static_cast<c10::BFloat16*>(p)[i] = static_cast<c10::BFloat16>(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

// The bits-wide field at bit `bit` of a little-endian stream of 32-bit words `stride` ints apart.
LL_INLINE uint32_t stream_field(const int32_t* words, int64_t stride, int64_t bit, int bits) {
  const int64_t w = bit >> 5;
  const int sh = static_cast<int>(bit & 31);
  uint64_t v = static_cast<uint32_t>(words[w * stride]) >> sh;
  if (sh + bits > 32) v |= static_cast<uint64_t>(static_cast<uint32_t>(words[(w + 1) * stride])) << (32 - sh);
  return static_cast<uint32_t>(v) & ((1u << bits) - 1);
}

// The epilogue, once per output: products + rank-r term + bias, rounded once to y's dtype.
void write_rows(const GptqCpuGemv& p, const float* ybuf, int ld, int64_t row0, int rows, int64_t n0, int valid) {
  for (int r = 0; r < rows && row0 + r < p.m; ++r) {
    const int64_t m = row0 + r;
    for (int c = 0; c < valid; ++c) {
      const int64_t col = n0 + c;
      float v = ybuf[r * ld + c];
      if (p.addend != nullptr) v += p.addend[m * p.n + col];
      if (p.bias != nullptr) v += load_float(p.bias, p.bias_type, col);
      store_float(p.y, p.y_type, m * p.n + col, v);
    }
  }
}

// ---- scalar: any CPU; the same arithmetic as the vector paths -------------------------------
constexpr int kScalarMaxRows = 16;
constexpr int kScalarCols = 16;

void gemv_scalar(const GptqCpuGemv& p, const GptqCpuRowBlock& b, int64_t tile_begin, int64_t tile_end) {
  const int bits = p.bits;
  const float center = static_cast<float>(1 << (bits - 1));
  const int64_t zrow_words = p.n * bits / 32;
  float ybuf[kScalarMaxRows * kScalarCols];
  float acc[kScalarMaxRows * kScalarCols];
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t n0 = tile * kScalarCols;
    const int valid = static_cast<int>(std::min<int64_t>(kScalarCols, p.n - n0));
    std::fill_n(ybuf, b.rows * kScalarCols, 0.0f);
    if (p.per_k) {  // scattered g_idx: s * (q - z) per value, as the reference
      std::fill_n(acc, b.rows * kScalarCols, 0.0f);
      for (int64_t k = 0; k < p.k; ++k) {
        const int64_t g = p.g_idx[k];
        for (int c = 0; c < valid; ++c) {
          const float q = static_cast<float>(stream_field(p.qweight + n0 + c, p.n, bits * k, bits));
          const float z = static_cast<float>(stream_field(p.qzeros + g * zrow_words, 1, bits * (n0 + c), bits)) +
                          static_cast<float>(p.zero_offset);
          const float w = load_float(p.scales, p.scales_type, g * p.n + n0 + c) * (q - z);
          for (int r = 0; r < b.rows; ++r) acc[r * kScalarCols + c] += p.x[b.row0 * p.k + k * b.rows + r] * w;
        }
        if ((k + 1) % 32 == 0 || k + 1 == p.k) {  // two-level sums, as the vector paths
          for (int i = 0; i < b.rows * kScalarCols; ++i) ybuf[i] += acc[i];
          std::fill_n(acc, b.rows * kScalarCols, 0.0f);
        }
      }
      write_rows(p, ybuf, kScalarCols, b.row0, b.rows, n0, valid);
      continue;
    }
    for (int64_t seg = 0; seg < p.segments; ++seg) {
      std::fill_n(acc, b.rows * kScalarCols, 0.0f);
      for (int64_t k = p.seg_start[seg]; k < p.seg_start[seg + 1]; ++k) {
        for (int c = 0; c < valid; ++c) {
          const float q = static_cast<float>(stream_field(p.qweight + n0 + c, p.n, bits * k, bits)) - center;
          for (int r = 0; r < b.rows; ++r) acc[r * kScalarCols + c] += p.x[b.row0 * p.k + k * b.rows + r] * q;
        }
      }
      const int64_t g = p.seg_group[seg];
      for (int c = 0; c < valid; ++c) {
        const float s = load_float(p.scales, p.scales_type, g * p.n + n0 + c);
        const float z = static_cast<float>(stream_field(p.qzeros + g * zrow_words, 1, bits * (n0 + c), bits)) +
                        static_cast<float>(p.zero_offset) - center;
        for (int r = 0; r < b.rows; ++r) {
          float& y = ybuf[r * kScalarCols + c];
          y += s * acc[r * kScalarCols + c];
          y -= (s * z) * p.xsum[(b.row0 + r) * p.segments + seg];
        }
      }
    }
    write_rows(p, ybuf, kScalarCols, b.row0, b.rows, n0, valid);
  }
}

// ---- the bf16 path's pairs -----------------------------------------------------------------------
// Which two values of a chunk share a 32-bit lane, and where: value a's field at mantissa bit pa of
// the low bf16 (value 128 + q_a 2^pa), b's at pb of the high one, after shifting word `word` right by
// `shift` (left for a negative shift). A field must end within the 7-bit mantissa (p + bits <= 7), so
// two fields qualify when their bit positions differ by 16 + pb - pa; pairs that share a shift save
// it. word -1: 3 bits' values 10 and 21, which straddle words (two double-word shifts).
struct DpPair {
  int word, shift, a, pa, b, pb;
};
constexpr DpPair kDpPairs2[8] = {{0, 0, 0, 0, 8, 0},   {0, 0, 1, 2, 9, 2},   {0, 0, 2, 4, 10, 4},
                                 {0, 6, 3, 0, 11, 0},  {0, 6, 4, 2, 12, 2},  {0, 6, 5, 4, 13, 4},
                                 {0, 12, 6, 0, 14, 0}, {0, 12, 7, 2, 15, 2}};
// 3 bits: value j at stream bit 3j (word 0: j <= 9, word 1: 11..20 from bit 1, word 2: 22..31 from bit 2).
constexpr DpPair kDpPairs3[16] = {{0, -1, 0, 1, 5, 0},  {0, -1, 1, 4, 6, 3},  {0, 5, 2, 1, 7, 0},
                                  {0, 5, 3, 4, 8, 3},   {0, 11, 4, 1, 9, 0},  {1, 0, 11, 1, 16, 0},
                                  {1, 0, 12, 4, 17, 3}, {1, 6, 13, 1, 18, 0}, {1, 6, 14, 4, 19, 3},
                                  {1, 12, 15, 1, 20, 0}, {2, 1, 22, 1, 27, 0}, {2, 1, 23, 4, 28, 3},
                                  {2, 7, 24, 1, 29, 0}, {2, 7, 25, 4, 30, 3}, {2, 13, 26, 1, 31, 0},
                                  {-1, 0, 10, 0, 21, 0}};
constexpr DpPair kDpPairs4[4] = {{0, 0, 0, 0, 4, 0}, {0, 4, 1, 0, 5, 0}, {0, 8, 2, 0, 6, 0}, {0, 12, 3, 0, 7, 0}};

template <int BITS>
constexpr const DpPair* dp_pairs() {
  return BITS == 2 ? kDpPairs2 : BITS == 3 ? kDpPairs3 : kDpPairs4;
}
const DpPair* dp_pairs_rt(int bits) { return bits == 2 ? kDpPairs2 : bits == 3 ? kDpPairs3 : kDpPairs4; }

#ifdef LL_GPTQ_X86

// ---- AVX-512 (F, BW, VL, DQ): 16 columns per vector; the float32 path -----------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {
#include "gptq_cpu_avx512.inc"
#include "gptq_cpu_simd.inc"
}  // namespace avx512
#pragma GCC pop_options

// ---- AVX-512 + AVX512-BF16 + VBMI2: the bf16 dot-product path ------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi2,avx2,fma,f16c")
namespace avx512bf16 {
#define LL_GPTQ_DP 1
#include "gptq_cpu_avx512.inc"
#include "gptq_cpu_simd.inc"
#undef LL_GPTQ_DP
}  // namespace avx512bf16
#pragma GCC pop_options

// ---- AVX2 + FMA + F16C: 8 columns per vector ---------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

struct V {
  static constexpr int W = 8;
  static constexpr bool kLut16 = false;  // vpermps picks from 8 floats: the table serves 2 and 3 bits
  using I = __m256i;
  using F = __m256;
  using M = __m256i;  // lane mask for vpmaskmov
  static LL_INLINE I iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static LL_INLINE M mask(int valid) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), iota()); }
  static LL_INLINE I load_words(const int32_t* p, M m, bool full) {
    return full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)) : _mm256_maskload_epi32(p, m);
  }
  static LL_INLINE I load_words_n(const int32_t* p, int count) { return _mm256_maskload_epi32(p, mask(count)); }
  static LL_INLINE void prefetch(const int32_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
  static LL_INLINE F zero() { return _mm256_setzero_ps(); }
  static LL_INLINE F set1(float v) { return _mm256_set1_ps(v); }
  static LL_INLINE I set1i(int v) { return _mm256_set1_epi32(v); }
  static LL_INLINE F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static LL_INLINE F fnma(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static LL_INLINE F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static LL_INLINE F add(F a, F b) { return _mm256_add_ps(a, b); }
  static LL_INLINE I add(I a, I b) { return _mm256_add_epi32(a, b); }
  static LL_INLINE I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static LL_INLINE F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static LL_INLINE I mul_lo(I a, I b) { return _mm256_mullo_epi32(a, b); }
  static LL_INLINE I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static LL_INLINE I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static LL_INLINE I xor_(I a, I b) { return _mm256_xor_si256(a, b); }
  template <int S> static LL_INLINE I srli(I v) { return _mm256_srli_epi32(v, S); }
  template <int S> static LL_INLINE I slli(I v) { return _mm256_slli_epi32(v, S); }
  template <int S> static LL_INLINE I srai(I v) { return _mm256_srai_epi32(v, S); }
  static LL_INLINE I srl_rt(I v, int s) { return _mm256_srl_epi32(v, _mm_cvtsi32_si128(s)); }
  static LL_INLINE I sll_rt(I v, int s) { return _mm256_sll_epi32(v, _mm_cvtsi32_si128(s)); }
  static LL_INLINE I sra_rt(I v, int s) { return _mm256_sra_epi32(v, _mm_cvtsi32_si128(s)); }
  static LL_INLINE I srlv(I v, I s) { return _mm256_srlv_epi32(v, s); }
  static LL_INLINE I sllv(I v, I s) { return _mm256_sllv_epi32(v, s); }
  static LL_INLINE I perm(I idx, I v) { return _mm256_permutevar8x32_epi32(v, idx); }
  static LL_INLINE F cvt(I v) { return _mm256_cvtepi32_ps(v); }
  static LL_INLINE F table(const float* t) { return _mm256_loadu_ps(t); }
  static LL_INLINE F lut(I idx, F table) { return _mm256_permutevar8x32_ps(table, idx); }
  static LL_INLINE F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static LL_INLINE void storef(float* p, F v) { _mm256_storeu_ps(p, v); }
  static LL_INLINE F load_scales(const void* base, FloatType t, int64_t i, M m, int valid) {
    if (t == FloatType::kFloat32) return _mm256_maskload_ps(static_cast<const float*>(base) + i, m);
    // 16-bit scales: no masked 16-bit load in AVX2; a partial tile goes through a zeroed copy.
    const uint16_t* src = static_cast<const uint16_t*>(base) + i;
    alignas(16) uint16_t tmp[8] = {};
    if (valid < 8) {
      std::memcpy(tmp, src, sizeof(uint16_t) * std::max(valid, 0));
      src = tmp;
    }
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    if (t == FloatType::kFloat16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
};

constexpr int kMaxRows = 8;  // 16 registers: 8 accumulators at most
constexpr int tiles_for(int mb, int bits) {
  if (bits == 3) return mb == 1 ? 2 : 1;
  return mb <= 4 ? 2 : 1;
}

#include "gptq_cpu_simd.inc"

}  // namespace avx2
#pragma GCC pop_options

const bool kHasAvx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
const bool kHasAvx512Bf16 =
    kHasAvx512 && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi2");
const bool kHasAvx2 =
    __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
constexpr bool kHasAvx512 = false;
constexpr bool kHasAvx512Bf16 = false;
constexpr bool kHasAvx2 = false;
#endif

int max_rows(CpuIsa isa) {
#ifdef LL_GPTQ_X86
  if (isa == CpuIsa::kAvx512 || isa == CpuIsa::kAvx512Bf16) return avx512::kMaxRows;
  if (isa == CpuIsa::kAvx2) return avx2::kMaxRows;
#endif
  (void)isa;
  return kScalarMaxRows;
}

// ---- dequantization ---------------------------------------------------------------------------
// Compiled for AVX-512, AVX2 and baseline x86-64, chosen at load time: the inner loops run along
// N (contiguous in qweight) and vectorize.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LL_CLONES
#endif

constexpr int64_t kDequantizeRows = 64;  // k values per pass over a column block

// tmp [kb][cols] = s * (q - z) for k in [k0, k0 + kb) and columns [n0, n0 + cols).
LL_CLONES void dequantize_rows(const int32_t* qweight, const int32_t* g_idx, const float* sf, const float* zf, int64_t n,
                               int64_t n0, int cols, int64_t k0, int kb, int bits, float* tmp) {
  const uint32_t mask = (1u << bits) - 1;
  for (int kk = 0; kk < kb; ++kk) {
    const int64_t k = k0 + kk, bit = bits * k, row = bit >> 5;
    const int sh = static_cast<int>(bit & 31);
    const int64_t g = g_idx[k];
    const uint32_t* lo = reinterpret_cast<const uint32_t*>(qweight) + row * n + n0;
    const float* s = sf + g * cols;
    const float* z = zf + g * cols;
    float* out = tmp + kk * cols;
    if (sh + bits > 32) {  // 3 bits: the field straddles two rows of words
      const uint32_t* hi = lo + n;
      for (int c = 0; c < cols; ++c) out[c] = s[c] * (static_cast<float>(((lo[c] >> sh) | (hi[c] << (32 - sh))) & mask) - z[c]);
    } else {
      for (int c = 0; c < cols; ++c) out[c] = s[c] * (static_cast<float>((lo[c] >> sh) & mask) - z[c]);
    }
  }
}

#ifdef LL_GPTQ_X86
__attribute__((target("avx,f16c"))) void floats_to_half_f16c(const float* in, int64_t stride, c10::Half* out,
                                                             int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i].x = _cvtss_sh(in[i * stride], _MM_FROUND_TO_NEAREST_INT);
}
const bool kHasF16C = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
#endif

// out[col, k0 + kk] = tmp[kk][col] in out_type: one contiguous run of kb values per column.
void store_transposed(const float* tmp, int cols, int kb, void* out, FloatType out_type, int64_t k, int64_t n0,
                      int64_t k0) {
  for (int c = 0; c < cols; ++c) {
    const int64_t base = (n0 + c) * k + k0;
    switch (out_type) {
      case FloatType::kFloat32: {
        float* o = static_cast<float*>(out) + base;
        for (int kk = 0; kk < kb; ++kk) o[kk] = tmp[kk * cols + c];
        break;
      }
      case FloatType::kFloat16: {
        c10::Half* o = static_cast<c10::Half*>(out) + base;
#ifdef LL_GPTQ_X86
        if (kHasF16C) {
          floats_to_half_f16c(tmp + c, cols, o, kb);
          break;
        }
#endif
        for (int kk = 0; kk < kb; ++kk) o[kk] = static_cast<c10::Half>(tmp[kk * cols + c]);
        break;
      }
      case FloatType::kBFloat16: {
        c10::BFloat16* o = static_cast<c10::BFloat16*>(out) + base;
        for (int kk = 0; kk < kb; ++kk) o[kk] = static_cast<c10::BFloat16>(tmp[kk * cols + c]);
        break;
      }
    }
  }
}

}  // namespace

CpuIsa gptq_cpu_best_isa() {
  if (kHasAvx512Bf16) return CpuIsa::kAvx512Bf16;
  if (kHasAvx512) return CpuIsa::kAvx512;
  if (kHasAvx2) return CpuIsa::kAvx2;
  return CpuIsa::kScalar;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512Bf16: return "avx512bf16";
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

std::vector<GptqCpuRowBlock> gptq_cpu_row_blocks(int64_t m, CpuIsa isa) {
  // Row counts with a kernel; a block of r rows pads x up to the next of them (zero rows cost FMAs
  // but no extra pass over the weight).
  static constexpr int kSizes[] = {1, 2, 3, 4, 6, 8, 12, 16};
  const int most = isa == CpuIsa::kScalar ? kScalarMaxRows : max_rows(isa);
  std::vector<GptqCpuRowBlock> blocks;
  for (int64_t row0 = 0; row0 < m;) {
    const int64_t left = m - row0;
    int rows = most;
    if (left < most)
      for (int s : kSizes)
        if (s >= left) {
          rows = isa == CpuIsa::kScalar ? static_cast<int>(left) : s;
          break;
        }
    blocks.push_back({row0, rows});
    row0 += std::min<int64_t>(rows, left);
  }
  return blocks;
}

int64_t gptq_cpu_tile_cols(int rows, int bits, CpuIsa isa) {
#ifdef LL_GPTQ_X86
  if (isa == CpuIsa::kAvx512 || isa == CpuIsa::kAvx512Bf16) return avx512::tiles_for(rows, bits) * avx512::V::W;
  if (isa == CpuIsa::kAvx2) return avx2::tiles_for(rows, bits) * avx2::V::W;
#endif
  (void)rows;
  (void)bits;
  (void)isa;
  return kScalarCols;
}

void gptq_gemv_cpu(const GptqCpuGemv& p, const GptqCpuRowBlock& block, CpuIsa isa, int64_t tile_begin,
                   int64_t tile_end) {
#ifdef LL_GPTQ_X86
  if (isa == CpuIsa::kAvx512Bf16 && p.xparts > 0) return avx512bf16::gemv_dp(p, block, tile_begin, tile_end);
  if (isa == CpuIsa::kAvx512 || isa == CpuIsa::kAvx512Bf16) return avx512::gemv(p, block, tile_begin, tile_end);
  if (isa == CpuIsa::kAvx2) return avx2::gemv(p, block, tile_begin, tile_end);
#endif
  gemv_scalar(p, block, tile_begin, tile_end);
}

void gptq_cpu_interleave(const float* x, int64_t k, const std::vector<GptqCpuRowBlock>& blocks, float* out) {
  for (const GptqCpuRowBlock& b : blocks)
    for (int64_t i = 0; i < k; ++i)
      for (int r = 0; r < b.rows; ++r) out[b.row0 * k + i * b.rows + r] = x[(b.row0 + r) * k + i];
}

namespace {
// The bf16 part `part` of v (exact when v has at most 8 * parts significant bits): part 0 is v with
// the low 16 bits dropped, part 1 what that drop left, which then fits a bf16 exactly.
uint32_t bf16_part(float v, int part) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  if (part == 0) return u >> 16;
  float hi;
  const uint32_t hu = u & 0xFFFF0000u;
  std::memcpy(&hi, &hu, sizeof(hi));
  const float lo = v - hi;
  std::memcpy(&u, &lo, sizeof(u));
  return u >> 16;
}
}  // namespace

void gptq_cpu_prepare_dp(const float* x, int64_t k, const std::vector<GptqCpuRowBlock>& blocks, int bits, int parts,
                         const int32_t* seg_start, int64_t segments, uint32_t* xpairs, float* xoff) {
  const DpPair* pairs = dp_pairs_rt(bits);
  const int ck = bits == 3 ? 32 : 32 / bits, np = ck / 2;
  float scale[32];  // 2^-p of each position in a chunk
  for (int i = 0; i < np; ++i) {
    scale[pairs[i].a] = 1.0f / static_cast<float>(1 << pairs[i].pa);
    scale[pairs[i].b] = 1.0f / static_cast<float>(1 << pairs[i].pb);
  }
  for (const GptqCpuRowBlock& b : blocks) {
    uint32_t* out = xpairs + b.row0 * (k / 2) * parts;
    for (int64_t c = 0; c < k / ck; ++c)
      for (int i = 0; i < np; ++i)
        for (int part = 0; part < parts; ++part)
          for (int r = 0; r < b.rows; ++r) {
            const float* xr = x + (b.row0 + r) * k + c * ck;
            const DpPair& pr = pairs[i];
            out[((c * np + i) * parts + part) * b.rows + r] =
                bf16_part(xr[pr.a] * scale[pr.a], part) | (bf16_part(xr[pr.b] * scale[pr.b], part) << 16);
          }
  }
  // The chunks that the kernel runs on the pairs: the whole ones within a segment (the rest goes
  // through the float32 table, with no 128 term).
  const int64_t rows = blocks.back().row0 + blocks.back().rows;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t sgm = 0; sgm < segments; ++sgm) {
      double sum = 0.0;
      const int64_t k0 = seg_start[sgm], k1 = seg_start[sgm + 1];
      for (int64_t c = (k0 + ck - 1) / ck; (c + 1) * ck <= k1; ++c)
        for (int j = 0; j < ck; ++j) sum += 128.0 * static_cast<double>(x[r * k + c * ck + j]) * scale[j];
      xoff[r * segments + sgm] = static_cast<float>(sum);
    }
}

void gptq_cpu_segment_sums(const float* x, int64_t rows, int64_t k, const int32_t* seg_start, int64_t segments,
                           float* xsum) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t s = 0; s < segments; ++s) {
      double sum = 0.0;
      for (int64_t i = seg_start[s]; i < seg_start[s + 1]; ++i) sum += x[r * k + i];
      xsum[r * segments + s] = static_cast<float>(sum);
    }
}

void gptq_dequantize_cpu(const int32_t* qweight, const int32_t* qzeros, const void* scales, FloatType scales_type,
                         const int32_t* g_idx, int64_t groups, int64_t n, int64_t k, int bits, int zero_offset,
                         void* out, FloatType out_type, int64_t n_begin, int64_t n_end) {
  const int64_t zrow_words = n * bits / 32;
  const int cols_max = static_cast<int>(kGptqCpuDequantizeCols);
  // Per column block: every group's scale and zero point as floats, then K in runs of 64 values.
  std::vector<float> sf(groups * cols_max), zf(groups * cols_max), tmp(kDequantizeRows * cols_max);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += cols_max) {
    const int cols = static_cast<int>(std::min<int64_t>(cols_max, n_end - n0));
    for (int64_t g = 0; g < groups; ++g)
      for (int c = 0; c < cols; ++c) {
        sf[g * cols + c] = load_float(scales, scales_type, g * n + n0 + c);
        zf[g * cols + c] =
            static_cast<float>(static_cast<int>(stream_field(qzeros + g * zrow_words, 1, bits * (n0 + c), bits)) +
                               zero_offset);
      }
    for (int64_t k0 = 0; k0 < k; k0 += kDequantizeRows) {
      const int kb = static_cast<int>(std::min<int64_t>(kDequantizeRows, k - k0));
      dequantize_rows(qweight, g_idx, sf.data(), zf.data(), n, n0, cols, k0, kb, bits, tmp.data());
      store_transposed(tmp.data(), cols, kb, out, out_type, k, n0, k0);
    }
  }
}

}  // namespace lightllm
