// LLM.int8 (bitsandbytes' Linear8bitLt) forward on the CPU, bit for bit the reference
// (lightllm/ops/int8.py) where it is exact:
//   1. activations quantized per row from their float16 values: stats = max |x16| (outliers left out),
//      codes = round_half_even(x16 * ((1 / stats) * 127)), outlier columns' codes zeroed;
//   2. C = codes . CB exactly in int32;
//   3. y = ((float(C) * (row_stat * col_stat)) * 6.200124e-05) + bias, rounded to x's dtype, the same
//      float32 operations in the same order as the reference (this file is built with
//      -ffp-contract=off so that no multiply-add is fused);
//   4. threshold > 0: plus the outlier columns of x times the dequantized int8 weight's same columns.
//
// AVX-512 VNNI's vpdpbusd multiplies unsigned by signed bytes: the activation codes are stored
// offset by 128 (unsigned), and 128 * sum(CB row) - computed in the same pass with a vector of ones -
// is subtracted again, so the int32 result is exact.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "bnb_cpu.h"
#include "bnb_cpu_internal.h"

namespace lightllm {
namespace {

// The reference's constants, as float32 (Python floats the tensors' float32 arithmetic rounds).
const float kInv127Squared = static_cast<float>(6.200124e-05);
const float kInv127 = static_cast<float>(7.874015718698502e-3);

__attribute__((always_inline)) inline float load_as_float(const void* x, FloatType t, int64_t i) {
  switch (t) {
    case FloatType::kFloat16: return static_cast<float>(static_cast<const c10::Half*>(x)[i]);
    case FloatType::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(x)[i]);
    default: return static_cast<const float*>(x)[i];
  }
}

// v rounded to the output dtype, as float32 again.
__attribute__((always_inline)) inline float round_to(FloatType t, float v) {
  switch (t) {
    case FloatType::kFloat16: return static_cast<float>(static_cast<c10::Half>(v));
    case FloatType::kBFloat16: return static_cast<float>(static_cast<c10::BFloat16>(v));
    default: return v;
  }
}

__attribute__((always_inline)) inline void store_as(void* out, FloatType t, int64_t i, float v) {
  switch (t) {
    case FloatType::kFloat16: static_cast<c10::Half*>(out)[i] = static_cast<c10::Half>(v); break;
    case FloatType::kBFloat16: static_cast<c10::BFloat16*>(out)[i] = static_cast<c10::BFloat16>(v); break;
    default: static_cast<float*>(out)[i] = v;
  }
}

inline int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// Row stride of the activation codes: a multiple of 64, but not of 4096, so that the rows of x do not
// all fall into the same L1 sets.
inline int64_t padded_k(int64_t k) {
  const int64_t kp = round_up(std::max<int64_t>(k, 1), 64);
  return kp % 4096 == 0 ? kp + 64 : kp;
}

// Scratch layout (every part 64-byte aligned from a 64-byte aligned base).
struct ScratchLayout {
  int64_t codes_u8, codes, row_stats, outlier_cols, outlier_x, x16, total;
};

ScratchLayout scratch_layout(int64_t m, int64_t k) {
  const int64_t kp = padded_k(k);
  ScratchLayout l{};
  int64_t at = 0;
  auto take = [&](int64_t bytes) {
    const int64_t here = at;
    at += round_up(bytes, 64);
    return here;
  };
  l.codes_u8 = take(m * kp);
  l.codes = take(m * kp);
  l.row_stats = take(m * 4);
  l.outlier_cols = take(k * 8);
  l.outlier_x = take(m * k * 4);
  l.x16 = take(m * k * 4);
  l.total = at + 64;  // room to align the base
  return l;
}

// ---- the product and its epilogue --------------------------------------------------------------------

// Row n of the dequantized int8 weight at the outlier columns, rounded to x's dtype as the
// reference's int8_vectorwise_dequant(...).to(A.dtype) rounds it.
__attribute__((always_inline)) inline float outlier_weight(const Int8LinearArgs& a, int64_t n, int64_t j) {
  const Int8Activations& x = *a.acts;
  return round_to(a.out_type, (static_cast<float>(a.cb[n * x.k + x.outlier_cols[j]]) * a.scb[n]) * kInv127);
}

// One output value from the exact int32 product C of row m of x and row n of W. w_dq: that row's
// outlier_weight(n, j) for every j, precomputed (the GEMM epilogue), or null to compute them here.
// Always inlined: inside the AVX-512 kernel it must be compiled with VEX encodings too, as legacy SSE
// instructions after 512-bit ones (dirty upper state) stalled every call (the int8 GEMV at K = 64
// took 10x the portable loop's time, 4096 x 256 at M = 1: 305 -> see RESULTS).
__attribute__((always_inline)) inline void finish(const Int8LinearArgs& a, int64_t m, int64_t n, int32_t c,
                                                  const float* w_dq = nullptr) {
  const Int8Activations& x = *a.acts;
  const float scb = a.scb[n];
  float y = static_cast<float>(c) * (x.row_stats[m] * scb);
  y = y * kInv127Squared;
  if (a.bias) y = y + a.bias[n];
  if (x.n_outliers) {
    // the reference rounds the int8 part to x's dtype, then adds the outlier product (addmm)
    y = round_to(a.out_type, y);
    const float* xo = x.outlier_x + m * x.n_outliers;
    float extra = 0.0f;
    for (int64_t j = 0; j < x.n_outliers; ++j) extra += xo[j] * (w_dq ? w_dq[j] : outlier_weight(a, n, j));
    y = y + extra;
  }
  if (a.lora.addend) y = round_to(a.out_type, y) + a.lora.term(m, n);  // the reference adds it to the rounded layer
  store_as(a.out, a.out_type, m * a.n_rows + n, y);
}

void rows_portable(const Int8LinearArgs& a, int64_t n0, int64_t n1) {
  const Int8Activations& x = *a.acts;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = a.cb + n * x.k;
    for (int64_t m = 0; m < x.m; ++m) {
      const int8_t* c = x.codes + m * x.k_padded;
      int32_t acc = 0;
      for (int64_t i = 0; i < x.k; ++i) acc += static_cast<int32_t>(c[i]) * static_cast<int32_t>(w[i]);
      finish(a, m, n, acc);
    }
  }
}

#if defined(__x86_64__)
#define LL_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

inline __mmask64 first_bytes(int64_t count) {
  return count >= 64 ? ~static_cast<__mmask64>(0) : ((static_cast<__mmask64>(1) << count) - 1);
}

// Rows m0 .. m0 + MT - 1 of x against row n of W, two accumulators per row of x (vpdpbusd's
// latency would otherwise bound a single chain at small MT).
template <int MT>
LL_VNNI void dot_rows(const Int8LinearArgs& a, int64_t n, int64_t m0) {
  constexpr int kSets = 2;
  const Int8Activations& x = *a.acts;
  const int64_t k = x.k, kp = x.k_padded;
  const int8_t* w = a.cb + n * k;
  const uint8_t* xa = x.codes_u8 + m0 * kp;
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc[kSets][MT], wsum[kSets];
  for (int s = 0; s < kSets; ++s) {
    wsum[s] = _mm512_setzero_si512();
    for (int m = 0; m < MT; ++m) acc[s][m] = _mm512_setzero_si512();
  }
  int64_t i = 0;
  if constexpr (kSets == 2) {
    for (; i + 128 <= k; i += 128) {
      // software prefetch 2 KB ahead (the next rows follow contiguously): the hardware prefetcher
      // alone leaves the stream latency-bound once each 64 bytes carry a few rows' work
      _mm_prefetch(reinterpret_cast<const char*>(w + i) + 2048, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w + i) + 2048 + 64, _MM_HINT_T0);
      const __m512i w0 = _mm512_loadu_si512(w + i), w1 = _mm512_loadu_si512(w + i + 64);
      wsum[0] = _mm512_dpbusd_epi32(wsum[0], ones, w0);
      wsum[1] = _mm512_dpbusd_epi32(wsum[1], ones, w1);
      for (int m = 0; m < MT; ++m) {
        acc[0][m] = _mm512_dpbusd_epi32(acc[0][m], _mm512_loadu_si512(xa + m * kp + i), w0);
        acc[1][m] = _mm512_dpbusd_epi32(acc[1][m], _mm512_loadu_si512(xa + m * kp + i + 64), w1);
      }
    }
  }
  for (; i + 64 <= k; i += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(w + i) + 2048, _MM_HINT_T0);
    const __m512i w0 = _mm512_loadu_si512(w + i);
    wsum[0] = _mm512_dpbusd_epi32(wsum[0], ones, w0);
    for (int m = 0; m < MT; ++m) acc[0][m] = _mm512_dpbusd_epi32(acc[0][m], _mm512_loadu_si512(xa + m * kp + i), w0);
  }
  if (i < k) {  // a masked load (slow on some CPUs) only for the row's last bytes
    const __m512i w0 = _mm512_maskz_loadu_epi8(first_bytes(k - i), w + i);  // zero past the row's end
    wsum[0] = _mm512_dpbusd_epi32(wsum[0], ones, w0);
    for (int m = 0; m < MT; ++m) acc[0][m] = _mm512_dpbusd_epi32(acc[0][m], _mm512_loadu_si512(xa + m * kp + i), w0);
  }
  __m512i ws = wsum[0];
  if constexpr (kSets == 2) ws = _mm512_add_epi32(ws, wsum[1]);
  const int32_t offset = 128 * _mm512_reduce_add_epi32(ws);
  for (int m = 0; m < MT; ++m) {
    __m512i t = acc[0][m];
    if constexpr (kSets == 2) t = _mm512_add_epi32(t, acc[1][m]);
    finish(a, m0 + m, n, _mm512_reduce_add_epi32(t) - offset);
  }
}

using DotRows = void (*)(const Int8LinearArgs&, int64_t, int64_t);
constexpr DotRows kDotRows[9] = {nullptr,     dot_rows<1>, dot_rows<2>, dot_rows<3>, dot_rows<4>,
                                 dot_rows<5>, dot_rows<6>, dot_rows<7>, dot_rows<8>};

void rows_vnni(const Int8LinearArgs& a, int64_t n0, int64_t n1) {
  // Groups of at most 8 rows of x per row of W (two accumulators each, the W row stays in L1 for
  // the next group); tiles of 32 rows of W stay in L2 while the groups pass over them.
  const int64_t m_total = a.acts->m;
  constexpr int64_t kTile = 32;
  for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
    const int64_t t1 = std::min(n1, t0 + kTile);
    if (m_total <= 16) {
      for (int64_t n = t0; n < t1; ++n)
        for (int64_t m0 = 0; m0 < m_total; m0 += 8) kDotRows[std::min<int64_t>(8, m_total - m0)](a, n, m0);
      continue;
    }
    for (int64_t m0 = 0; m0 < m_total; m0 += 8) {
      const DotRows f = kDotRows[std::min<int64_t>(8, m_total - m0)];
      for (int64_t n = t0; n < t1; ++n) f(a, n, m0);
    }
  }
}
#endif

// ---- activation quantization (bitsandbytes' int8_vectorwise_quant on the float16 values) ------------

// absmax of |row| over the values kept (split: those below the threshold; else all, inf included);
// NaN anywhere makes it NaN, as torch's amax propagates it.
float row_absmax(const float* row, int64_t k, bool split, float thr) {
  float stat = 0.0f;
  bool nan = false;
  for (int64_t c = 0; c < k; ++c) {
    const float v = std::fabs(row[c]);
    if (std::isnan(v)) nan = true;
    else if ((!split || v < thr) && v > stat) stat = v;
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : stat;
}

// codes = round_half_even(row * scale) (NaN -> 0), and the same + 128 for vpdpbusd
void row_codes(const float* row, int64_t k, float scale, int8_t* codes, uint8_t* codes_u8) {
  for (int64_t c = 0; c < k; ++c) {
    const float v = std::nearbyint(row[c] * scale);  // torch.round: half to even
    // NaN: its row's outputs are NaN anyway; beyond int8: only in outlier columns, zeroed after
    const int32_t q = std::isnan(v) ? 0 : static_cast<int32_t>(std::clamp(v, -128.0f, 127.0f));
    codes[c] = static_cast<int8_t>(q);
    codes_u8[c] = static_cast<uint8_t>(q + 128);
  }
}

#if defined(__x86_64__)
#define LL_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c")))

LL_AVX512 inline __m512 load16_as_float(const void* x, FloatType t, int64_t i, __mmask16 mask) {
  switch (t) {
    case FloatType::kFloat16:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(x) + i));
    case FloatType::kBFloat16:
      return _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(x) + i)), 16));
    default: return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(x) + i);
  }
}

inline __mmask16 first16(int64_t count) { return count >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << count) - 1); }

// x16[i0 .. i1) = float(half(x)), round to nearest even as c10::Half
LL_AVX512 void to_half_avx512(const void* x, FloatType t, float* x16, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; i += 16) {
    const __mmask16 mask = first16(i1 - i);
    const __m512 v = load16_as_float(x, t, i, mask);
    const __m512 h = t == FloatType::kFloat16 ? v : _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    _mm512_mask_storeu_ps(x16 + i, mask, h);
  }
}

LL_AVX512 void mark_outliers_avx512(const float* row, int64_t k, float thr, uint8_t* is_outlier) {
  const __m512 t = _mm512_set1_ps(thr);
  const __m128i ones = _mm_set1_epi8(1);
  for (int64_t c = 0; c < k; c += 16) {
    const __mmask16 mask = first16(k - c);
    const __m512 v = _mm512_abs_ps(_mm512_maskz_loadu_ps(mask, row + c));
    const __mmask16 hit = _mm512_mask_cmp_ps_mask(mask, v, t, _CMP_GE_OQ);
    _mm_mask_storeu_epi8(is_outlier + c, hit, ones);
  }
}

LL_AVX512 float row_absmax_avx512(const float* row, int64_t k, bool split, float thr) {
  const __m512 t = _mm512_set1_ps(thr);
  __m512 best = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t c = 0; c < k; c += 16) {
    const __mmask16 mask = first16(k - c);
    const __m512 v = _mm512_abs_ps(_mm512_maskz_loadu_ps(mask, row + c));
    nan |= _mm512_mask_cmp_ps_mask(mask, v, v, _CMP_UNORD_Q);
    const __mmask16 keep = split ? _mm512_mask_cmp_ps_mask(mask, v, t, _CMP_LT_OQ) : mask;
    best = _mm512_mask_max_ps(best, keep, best, v);  // NaN lanes are counted in `nan` instead
  }
  if (nan) return std::numeric_limits<float>::quiet_NaN();
  return _mm512_reduce_max_ps(best);
}

LL_AVX512 void row_codes_avx512(const float* row, int64_t k, float scale, int8_t* codes, uint8_t* codes_u8) {
  const __m512 s = _mm512_set1_ps(scale);
  const __m512 lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
  const __m128i bias = _mm_set1_epi8(static_cast<char>(0x80));
  for (int64_t c = 0; c < k; c += 16) {
    const __mmask16 mask = first16(k - c);
    const __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, row + c), s),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __mmask16 number = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q);
    // clamped (max/min return the second operand for NaN: the NaN lanes are masked out below)
    const __m512i q = _mm512_maskz_cvtps_epi32(number, _mm512_min_ps(_mm512_max_ps(v, lo), hi));
    const __m128i q8 = _mm512_cvtepi32_epi8(q);
    _mm_mask_storeu_epi8(codes + c, mask, q8);
    _mm_mask_storeu_epi8(codes_u8 + c, mask, _mm_xor_si128(q8, bias));
  }
}
#endif

}  // namespace

int64_t int8_scratch_bytes(int64_t m, int64_t k) { return scratch_layout(m, k).total; }

void int8_prepare_activations(const void* xv, FloatType x_type, int64_t m, int64_t k, double threshold, void* scratch,
                              Int8Activations* acts, const RowRunner& run_rows) {
  const ScratchLayout l = scratch_layout(m, k);
  char* base = reinterpret_cast<char*>(round_up(reinterpret_cast<intptr_t>(scratch), 64));
  Int8Activations& x = *acts;
  x.m = m;
  x.k = k;
  x.k_padded = padded_k(k);
  x.codes_u8 = reinterpret_cast<uint8_t*>(base + l.codes_u8);
  x.codes = reinterpret_cast<int8_t*>(base + l.codes);
  x.row_stats = reinterpret_cast<float*>(base + l.row_stats);
  x.outlier_cols = reinterpret_cast<int64_t*>(base + l.outlier_cols);
  x.outlier_x = reinterpret_cast<float*>(base + l.outlier_x);
  float* x16 = reinterpret_cast<float*>(base + l.x16);
#if defined(__x86_64__)
  const bool simd = bnb_use_avx512();
#else
  const bool simd = false;
#endif
  auto serial = [](int64_t n, const std::function<void(int64_t, int64_t)>& body) { body(0, n); };
  const RowRunner& run = run_rows ? run_rows : RowRunner(serial);
  // 1. float16 values (bitsandbytes casts the activations to float16 first)
  run(m, [&](int64_t r0, int64_t r1) {
#if defined(__x86_64__)
    if (simd) return to_half_avx512(xv, x_type, x16, r0 * k, r1 * k);
#endif
    for (int64_t i = r0 * k; i < r1 * k; ++i) x16[i] = static_cast<float>(static_cast<c10::Half>(load_as_float(xv, x_type, i)));
  });
  // 2. Outliers: |x16| >= threshold, compared in float16 as torch compares a float16 tensor with a
  // Python float (the threshold rounded to float16).
  const bool split = threshold > 0.0;
  const float thr = split ? static_cast<float>(static_cast<c10::Half>(static_cast<float>(threshold)))
                          : std::numeric_limits<float>::infinity();
  x.n_outliers = 0;
  if (split) {
    std::vector<uint8_t> is_outlier(static_cast<size_t>(k), 0);
    for (int64_t r = 0; r < m; ++r) {
#if defined(__x86_64__)
      if (simd) {
        mark_outliers_avx512(x16 + r * k, k, thr, is_outlier.data());
        continue;
      }
#endif
      for (int64_t c = 0; c < k; ++c) is_outlier[c] |= std::fabs(x16[r * k + c]) >= thr;
    }
    for (int64_t c = 0; c < k; ++c)
      if (is_outlier[c]) x.outlier_cols[x.n_outliers++] = c;
  }
  // 3. per row: absmax of the values that are not outliers themselves (masked_fill before amax; at
  // threshold 0 every value counts, inf included), codes, outlier columns zeroed, outlier values kept
  run(m, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = x16 + r * k;
      int8_t* codes = x.codes + r * x.k_padded;
      uint8_t* codes_u8 = x.codes_u8 + r * x.k_padded;
      float stat;
#if defined(__x86_64__)
      if (simd) stat = row_absmax_avx512(row, k, split, thr);
      else
#endif
        stat = row_absmax(row, k, split, thr);
      x.row_stats[r] = stat;
      // 127 / stats is reciprocal(stats) * 127 in torch (Tensor.__rtruediv__): two roundings
      const float scale = stat == 0.0f ? 0.0f : (1.0f / stat) * 127.0f;
#if defined(__x86_64__)
      if (simd) row_codes_avx512(row, k, scale, codes, codes_u8);
      else
#endif
        row_codes(row, k, scale, codes, codes_u8);
      for (int64_t j = 0; j < x.n_outliers; ++j) {  // outlier columns: code 0 in every row
        codes[x.outlier_cols[j]] = 0;
        codes_u8[x.outlier_cols[j]] = 128;
        x.outlier_x[r * x.n_outliers + j] = load_as_float(xv, x_type, r * k + x.outlier_cols[j]);
      }
      std::memset(codes + k, 0, static_cast<size_t>(x.k_padded - k));
      std::memset(codes_u8 + k, 128, static_cast<size_t>(x.k_padded - k));
    }
  });
}

void int8_linear_epilogue_cpu(const Int8LinearArgs& a, const int32_t* c, int64_t n0, int64_t n1) {
  const Int8Activations& x = *a.acts;
  const int64_t n_outliers = x.n_outliers;
  // tiles of 64 output columns: their outlier weights are decoded once per tile, not once per row of x
  constexpr int64_t kTile = 64;
  std::vector<float> w_dq(static_cast<size_t>(kTile * n_outliers));
  for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
    const int64_t t1 = std::min(n1, t0 + kTile);
    for (int64_t n = t0; n < t1; ++n)
      for (int64_t j = 0; j < n_outliers; ++j) w_dq[(n - t0) * n_outliers + j] = outlier_weight(a, n, j);
    for (int64_t m = 0; m < x.m; ++m) {
      const int32_t* c_row = c + m * a.n_rows;
      for (int64_t n = t0; n < t1; ++n) finish(a, m, n, c_row[n], n_outliers ? w_dq.data() + (n - t0) * n_outliers : nullptr);
    }
  }
}

void int8_linear_cpu(const Int8LinearArgs& a, int64_t n0, int64_t n1) {
#if defined(__x86_64__)
  if (bnb_use_vnni()) return rows_vnni(a, n0, n1);
#endif
  rows_portable(a, n0, n1);
}

}  // namespace lightllm
