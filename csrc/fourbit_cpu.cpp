// bitsandbytes' 4-bit NF4 / FP4 format on the CPU: quantize, dequantize and the decode GEMV.
// Every kernel has an AVX-512 path (chosen at run time) and a portable scalar one that computes the
// same bits (quantize, dequantize) or the same sums in another order (GEMV).
//
// The code lookup is a register table: _mm512_permutexvar_ps indexes 16 floats by the low 4 bits of
// each 32-bit lane, so 16 packed bytes widened to 16 lanes give the 16 odd values (low nibbles)
// directly and, after one shift, the 16 even values (high nibbles). Scaling the table by the block's
// absmax once per block makes each looked-up value code * absmax, bit for bit what the reference
// multiplies by.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "bnb_cpu.h"
#include "bnb_cpu_internal.h"

namespace lightllm {

// ---- instruction set choice ----------------------------------------------------------------------

namespace {
std::atomic<bool> g_force_portable{false};
#if defined(__x86_64__)
const bool kCpuAvx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
const bool kCpuVnni = kCpuAvx512 && __builtin_cpu_supports("avx512vnni");
const bool kCpuBf16 = kCpuAvx512 && __builtin_cpu_supports("avx512bf16");
#else
constexpr bool kCpuAvx512 = false;
constexpr bool kCpuVnni = false;
constexpr bool kCpuBf16 = false;
#endif
}  // namespace

bool bnb_use_avx512() { return kCpuAvx512 && !g_force_portable.load(std::memory_order_relaxed); }
bool bnb_use_vnni() { return kCpuVnni && !g_force_portable.load(std::memory_order_relaxed); }
bool bnb_use_avx512_bf16() { return kCpuBf16 && !g_force_portable.load(std::memory_order_relaxed); }
const char* bnb_cpu_isa() { return bnb_use_vnni() ? "avx512-vnni" : bnb_use_avx512() ? "avx512" : "portable"; }
void bnb_cpu_force_portable(bool on) { g_force_portable.store(on); }

namespace {

constexpr float kMinAbsmax = 1e-38f;  // the reference's clamp(min=1e-38), a float32 subnormal

// torch.clamp(min=...) keeps NaN.
inline float clamp_absmax(float a) { return a < kMinAbsmax ? kMinAbsmax : a; }

template <typename T>
inline float load_float(const T* p, int64_t i) { return static_cast<float>(p[i]); }

inline void store_as(void* out, FloatType t, int64_t i, float v) {
  switch (t) {
    case FloatType::kFloat16: static_cast<c10::Half*>(out)[i] = static_cast<c10::Half>(v); break;
    case FloatType::kBFloat16: static_cast<c10::BFloat16*>(out)[i] = static_cast<c10::BFloat16>(v); break;
    default: static_cast<float*>(out)[i] = v;
  }
}

inline float load_as_float(const void* x, FloatType t, int64_t i) {
  switch (t) {
    case FloatType::kFloat16: return static_cast<float>(static_cast<const c10::Half*>(x)[i]);
    case FloatType::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(x)[i]);
    default: return static_cast<const float*>(x)[i];
  }
}

// Position of v among the sorted codes: the number of midpoints b with !(v <= b), i.e. b < v for a
// number and all 15 for NaN, which is what torch.bucketize returns.
inline int sorted_position(const FourBitSearch& s, float v) {
  int pos = 0;
  for (int step = 8; step >= 1; step >>= 1)
    if (!(v <= s.bounds[pos + step - 1])) pos += step;
  return pos;
}

inline uint8_t code_of(const FourBitSearch& s, float v) { return static_cast<uint8_t>(s.order[sorted_position(s, v)]); }

// ---- portable kernels -----------------------------------------------------------------------------

template <typename T>
void quantize_range_portable(const T* x, const FourBitSearch& s, uint8_t* packed, float* absmax, int64_t n,
                             int64_t blocksize, int64_t b0, int64_t b1) {
  const uint8_t pad = code_of(s, 0.0f);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * blocksize;
    const int64_t len = std::min(blocksize, n - start);
    float m = 0.0f;
    bool nan = false;
    for (int64_t i = 0; i < len; ++i) {
      const float v = std::fabs(load_float(x, start + i));
      if (std::isnan(v)) nan = true;
      m = v > m ? v : m;
    }
    if (nan) m = std::numeric_limits<float>::quiet_NaN();
    absmax[b] = m;
    const float a = clamp_absmax(m);
    const bool full = len == blocksize;  // a short last block divides, as bitsandbytes does
    const float inv = 1.0f / a;
    for (int64_t i = 0; i < len; i += 2) {
      const float v0 = load_float(x, start + i);
      const uint8_t c0 = code_of(s, full ? v0 * inv : v0 / a);
      uint8_t c1 = pad;
      if (i + 1 < len) {
        const float v1 = load_float(x, start + i + 1);
        c1 = code_of(s, full ? v1 * inv : v1 / a);
      }
      packed[(start + i) / 2] = static_cast<uint8_t>((c0 << 4) | c1);
    }
  }
}

// Values [v0, v1) of the flat tensor (v0 even), as float32 into dst[0 .. v1 - v0).
void decode_values_portable(const uint8_t* packed, const float* absmax, const float* code, int64_t blocksize,
                            int64_t v0, int64_t v1, float* dst) {
  for (int64_t v = v0; v < v1; ++v) {
    const uint8_t byte = packed[v >> 1];
    const int c = (v & 1) ? (byte & 15) : (byte >> 4);
    dst[v - v0] = code[c] * absmax[v / blocksize];
  }
}

void dequantize_portable(const uint8_t* packed, const float* absmax, const float* code, int64_t n,
                         int64_t blocksize, void* out, FloatType t, int64_t c0, int64_t c1) {
  float buf[32];
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t v0 = 32 * c, v1 = std::min(n, v0 + 32);
    if (v0 >= v1) break;
    decode_values_portable(packed, absmax, code, blocksize, v0, v1, buf);
    for (int64_t v = v0; v < v1; ++v) store_as(out, t, v, buf[v - v0]);
  }
}

// Output column n for every row of x: bias and the LoRA term added in float32, one rounding (one
// value per row of x, N apart in the output).
inline void store_gemv_outputs(const Gemv4Args& a, int64_t n, const float* sums) {
  for (int64_t m = 0; m < a.m; ++m) {
    float v = a.bias ? sums[m] + a.bias[n] : sums[m];
    if (a.lora.addend) v += a.lora.term(m, n);
    store_as(a.out, a.out_type, m * a.n_rows + n, v);
  }
}

void gemv_portable(const Gemv4Args& a, int64_t n0, int64_t n1) {
  const int64_t k = a.k;
  std::vector<float> row(static_cast<size_t>(k));
  float sums[16];
  for (int64_t n = n0; n < n1; ++n) {
    decode_values_portable(a.packed, a.absmax, a.code, a.blocksize, n * k, n * k + k, row.data());
    for (int64_t m = 0; m < a.m; ++m) {
      // 16 running sums within each 512 values, then the sum of those: the rounding error grows
      // with K / 512 + 32 additions instead of K / 16
      const float* xm = static_cast<const float*>(a.x) + m * k;
      float total = 0.0f;
      for (int64_t i0 = 0; i0 < k; i0 += 512) {
        const int64_t i1 = std::min(k, i0 + 512);
        float acc[16] = {};
        int64_t i = i0;
        for (; i + 16 <= i1; i += 16)
          for (int l = 0; l < 16; ++l) acc[l] += row[i + l] * xm[i + l];
        for (; i < i1; ++i) acc[0] += row[i] * xm[i];
        float s = 0.0f;
        for (int l = 0; l < 16; ++l) s += acc[l];
        total += s;
      }
      sums[m] = total;
    }
    store_gemv_outputs(a, n, sums);
  }
}

// ---- AVX-512 kernels -------------------------------------------------------------------------------
#if defined(__x86_64__)
#define LL_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")))

LL_AVX512 inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
LL_AVX512 inline __m512 load16(const c10::Half* p, __mmask16 k) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}
LL_AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 k) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}

inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1u);
}

// float32 -> bfloat16 with round-to-nearest-even on the bits (c10's rule; NaN -> 0x7FC0). Not
// VCVTNEPS2BF16: it flushes subnormal inputs to zero.
LL_AVX512 inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

LL_AVX512 inline void store16(void* out, FloatType t, int64_t i, __m512 v, __mmask16 k) {
  switch (t) {
    case FloatType::kFloat16:
      _mm256_mask_storeu_epi16(static_cast<c10::Half*>(out) + i, k, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
      break;
    case FloatType::kBFloat16:
      _mm256_mask_storeu_epi16(static_cast<c10::BFloat16*>(out) + i, k, to_bf16(v));
      break;
    default: _mm512_mask_storeu_ps(static_cast<float*>(out) + i, k, v);
  }
}

// 16 values -> 16 codes (int32 lanes) by a 4-step branch-free search over the midpoints.
LL_AVX512 inline __m512i encode16(__m512 v, __m512 bounds, __m512i order) {
  __m512i pos = _mm512_setzero_si512();
  for (int step = 8; step >= 1; step >>= 1) {
    const __m512 probe = _mm512_permutexvar_ps(_mm512_add_epi32(pos, _mm512_set1_epi32(step - 1)), bounds);
    const __mmask16 above = _mm512_cmp_ps_mask(v, probe, _CMP_NLE_UQ);  // true for NaN, as bucketize
    pos = _mm512_mask_add_epi32(pos, above, pos, _mm512_set1_epi32(step));
  }
  return _mm512_permutexvar_epi32(pos, order);
}

// 16 codes -> 8 bytes, the even value in the high nibble.
LL_AVX512 inline __m128i pack16(__m512i codes) {
  const __m512i pair = _mm512_or_si512(_mm512_slli_epi64(codes, 4), _mm512_srli_epi64(codes, 32));
  return _mm512_cvtepi64_epi8(pair);  // low byte of each 64-bit lane
}

template <typename T>
LL_AVX512 void quantize_range_avx512(const T* x, const FourBitSearch& s, uint8_t* packed, float* absmax, int64_t n,
                                     int64_t blocksize, int64_t b0, int64_t b1) {
  const __m512 bounds = _mm512_loadu_ps(s.bounds);
  const __m512i order = _mm512_loadu_si512(s.order);
  const __m512i pad = _mm512_set1_epi32(code_of(s, 0.0f));
  const __m512 sign_off = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * blocksize;
    const int64_t len = std::min(blocksize, n - start);
    const T* xb = x + start;
    // absmax: four running maxima, NaN tracked apart (vmaxps drops a NaN operand)
    __m512 m0 = _mm512_setzero_ps(), m1 = m0, m2 = m0, m3 = m0;
    __mmask16 nan = 0;
    int64_t i = 0;
    for (; i + 64 <= len; i += 64) {
      const __m512 a0 = _mm512_and_ps(load16(xb + i, 0xFFFF), sign_off);
      const __m512 a1 = _mm512_and_ps(load16(xb + i + 16, 0xFFFF), sign_off);
      const __m512 a2 = _mm512_and_ps(load16(xb + i + 32, 0xFFFF), sign_off);
      const __m512 a3 = _mm512_and_ps(load16(xb + i + 48, 0xFFFF), sign_off);
      nan |= _mm512_cmp_ps_mask(a0, a1, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(a2, a3, _CMP_UNORD_Q);
      m0 = _mm512_max_ps(m0, a0);
      m1 = _mm512_max_ps(m1, a1);
      m2 = _mm512_max_ps(m2, a2);
      m3 = _mm512_max_ps(m3, a3);
    }
    for (; i < len; i += 16) {
      const __m512 a0 = _mm512_and_ps(load16(xb + i, first_lanes(len - i)), sign_off);
      nan |= _mm512_cmp_ps_mask(a0, a0, _CMP_UNORD_Q);
      m0 = _mm512_max_ps(m0, a0);
    }
    float m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
    if (nan) m = std::numeric_limits<float>::quiet_NaN();
    absmax[b] = m;
    const float a = clamp_absmax(m);
    const bool full = len == blocksize;
    const __m512 inv = _mm512_set1_ps(1.0f / a), av = _mm512_set1_ps(a);
    uint8_t* pb = packed + start / 2;
    for (i = 0; i < len; i += 16) {
      const int64_t count = std::min<int64_t>(16, len - i);
      const __mmask16 valid = first_lanes(count);
      const __m512 v = load16(xb + i, valid);
      __m512i codes = encode16(full ? _mm512_mul_ps(v, inv) : _mm512_div_ps(v, av), bounds, order);
      const __m128i bytes = pack16(_mm512_mask_blend_epi32(valid, pad, codes));  // pad: the code of 0.0
      _mm_mask_storeu_epi8(pb + i / 2, static_cast<__mmask16>((1u << ((count + 1) / 2)) - 1u), bytes);
    }
  }
}

struct DecodeTables {
  __m512i lo_idx, hi_idx;  // interleave even / odd values back into order
};

LL_AVX512 inline DecodeTables decode_tables() {
  return {_mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23),
          _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31)};
}

// Chunk c (values 32c .. 32c + 31, all present) as two vectors in value order.
LL_AVX512 inline void decode_chunk(const uint8_t* packed, __m512 lut, const DecodeTables& t, int64_t c, __m512* v0,
                                   __m512* v1) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + 16 * c)));
  const __m512 even = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), lut);
  const __m512 odd = _mm512_permutexvar_ps(bytes, lut);  // only the low 4 bits index
  *v0 = _mm512_permutex2var_ps(even, t.lo_idx, odd);
  *v1 = _mm512_permutex2var_ps(even, t.hi_idx, odd);
}

LL_AVX512 void dequantize_avx512(const uint8_t* packed, const float* absmax, const float* code, int64_t n,
                                 int64_t blocksize, void* out, FloatType t, int64_t c0, int64_t c1) {
  const __m512 table = _mm512_loadu_ps(code);
  const DecodeTables tabs = decode_tables();
  const int64_t chunks_per_block = blocksize / 32;
  int64_t c = c0;
  while (c < c1) {
    const int64_t b = c / chunks_per_block;
    const int64_t c_end = std::min(c1, (b + 1) * chunks_per_block);
    const __m512 lut = _mm512_mul_ps(table, _mm512_set1_ps(absmax[b]));
    for (; c < c_end; ++c) {
      const int64_t v0 = 32 * c;
      if (v0 + 32 > n) {  // the last, partial chunk (its bytes may end early too)
        if (v0 < n) dequantize_portable(packed, absmax, code, n, blocksize, out, t, c, c + 1);
        continue;
      }
      __m512 lo, hi;
      decode_chunk(packed, lut, tabs, c, &lo, &hi);
      store16(out, t, v0, lo, 0xFFFF);
      store16(out, t, v0 + 16, hi, 0xFFFF);
    }
  }
}

// Values [v0, v1) of the flat weight as float32 into dst (dst[0] is value v0). Decodes whole
// 32-value chunks into a staging area when v0 is not chunk-aligned.
LL_AVX512 void decode_values_avx512(const uint8_t* packed, const float* absmax, const float* code, int64_t blocksize,
                                    int64_t n_total, int64_t v0, int64_t v1, float* staging) {
  // staging holds (v1 - v0) + 64 floats; the values land at staging + (v0 % 32)
  const __m512 table = _mm512_loadu_ps(code);
  const DecodeTables tabs = decode_tables();
  const int64_t c_first = v0 / 32, c_last = (v1 + 31) / 32;  // chunks [c_first, c_last)
  for (int64_t c = c_first; c < c_last; ++c) {
    float* dst = staging + 32 * (c - c_first);
    if (32 * c + 32 > n_total) {
      decode_values_portable(packed, absmax, code, blocksize, 32 * c, n_total, dst);
      continue;
    }
    const __m512 lut = _mm512_mul_ps(table, _mm512_set1_ps(absmax[(32 * c) / blocksize]));
    __m512 lo, hi;
    decode_chunk(packed, lut, tabs, c, &lo, &hi);
    _mm512_storeu_ps(dst, lo);
    _mm512_storeu_ps(dst + 16, hi);
  }
}

// Software prefetch along the packed weight (absmax runs 8x slower). Streaming a row after the other,
// the hardware prefetcher alone left the fused GEMV at ~12 GB/s of a ~29 GB/s read bandwidth on a
// 2-core EPYC; 2 KB ahead into L1 brought it to ~19 GB/s. With K tiles (gemv_avx512) the rows are
// visited in blocks, each block tile by tile: the prefetch then brings the next block into L2 (same
// offset, one block of rows ahead), so that memory is still read in long contiguous runs.
constexpr int64_t kPrefetchBytes = 2048;  // 1-8 KB measured alike on the 2-core EPYC; 1 KB slower

struct Prefetch {
  int64_t weight_bytes, absmax_bytes;  // into L1
  int64_t l2_weight_bytes, l2_absmax_bytes;  // into L2, 0: none
};

LL_AVX512 inline void prefetch_weights(const uint8_t* w, const float* am, const Prefetch& p) {
  _mm_prefetch(reinterpret_cast<const char*>(w) + p.weight_bytes, _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(am) + p.absmax_bytes, _MM_HINT_T0);
  if (p.l2_weight_bytes) {
    _mm_prefetch(reinterpret_cast<const char*>(w) + p.l2_weight_bytes, _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(am) + p.l2_absmax_bytes, _MM_HINT_T1);
  }
}

// The float32 GEMV for K % blocksize == 0 (each row of W is whole blocks; K is then a multiple of 32).
// Groups of 128 values: one 64-byte load, and vector s = (q >> 4s) of its 16 dwords indexes, by its low
// 4 bits, nibble s of each dword, i.e. value 8i + kNibbleValue[s] in lane i; x is laid out in that order
// (gemv4_prepare_x). The table is the unscaled code values; each group's sum is scaled by a vector of
// the absmax of each lane's block (lanes 8i.. of a group can belong to 1, 2 or 4 blocks). At M = 1 the
// loop is bound by the FMA / shuffle pipes (Zen 4 runs one 512-bit FMA per cycle): 2.6 cycles per 32
// weights in an L2-resident microbenchmark, against 3.1 with byte-to-dword widening per 16 bytes
// (vpmovzxbd + shift + 2 vpermps + 2 FMA) and a table scaled per block. A K that is not a multiple of 128 ends with 32-value chunks
// (high and low nibbles from one widened load, x de-interleaved, the table scaled per block).
template <int MT>
LL_AVX512 void rows_f32(const Gemv4Args& a, int64_t n, int64_t m0, int64_t k0, int64_t k1, const Prefetch& pf,
                        float* sums) {
  constexpr bool kPair = MT <= 4;  // two partial sums per row of x: a chain of 8 FMAs is too long for few rows
  const int64_t k = a.k, bs = a.blocksize;
  // values [k0, k1) of the row: whole groups of 128, and the 32-value chunks after the last group
  // when the range ends the row
  const int64_t g_end = k1 / 128, chunks_end = k1 == k ? k / 32 : 4 * g_end;
  const uint8_t* w = a.packed + n * (k / 2);
  const float* am = a.absmax + n * (k / bs);
  // x of this K tile: [M][ld] from value k0 on (gemv4_prepare_x)
  const int64_t ld = k1 - k0;
  const float* x = static_cast<const float*>(a.x) + a.m * k0 + m0 * ld;
  const __m512 table = _mm512_loadu_ps(a.code);
  const int log_bs = __builtin_ctzll(static_cast<uint64_t>(bs));  // no integer division in the loops
  // lane i of a group holds values 8i..8i+7: block (8i) / bs within the group when bs < 128
  const int64_t blocks_per_group = bs < 128 ? 128 / bs : 0;
  const __m512i block_of_lane = _mm512_srli_epi32(_mm512_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88,
                                                                    96, 104, 112, 120),
                                                  log_bs);
  const __mmask16 group_blocks = static_cast<__mmask16>((1u << blocks_per_group) - 1u);
  __m512 tot[MT];
  for (int m = 0; m < MT; ++m) tot[m] = _mm512_setzero_ps();
  for (int64_t g = k0 / 128; g < g_end; ++g) {
    const uint8_t* wg = w + 64 * g;
    prefetch_weights(wg, am + ((128 * g) >> log_bs), pf);
    const __m512i q = _mm512_loadu_si512(wg);
    const __m512 av = blocks_per_group
                          ? _mm512_permutexvar_ps(block_of_lane, _mm512_maskz_loadu_ps(group_blocks,
                                                                                        am + g * blocks_per_group))
                          : _mm512_set1_ps(am[(128 * g) >> log_bs]);
    const float* xg = x + (128 * g - k0);
    __m512 s0[MT], s1[MT];
    {
      const __m512 v0 = _mm512_permutexvar_ps(q, table);
      const __m512 v1 = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table);
      for (int m = 0; m < MT; ++m) {
        s0[m] = _mm512_mul_ps(v0, _mm512_loadu_ps(xg + m * ld));
        if constexpr (kPair) s1[m] = _mm512_mul_ps(v1, _mm512_loadu_ps(xg + m * ld + 16));
        else s0[m] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(xg + m * ld + 16), s0[m]);
      }
    }
#define LL_NIBBLE_STEP(shift, j)                                                          \
  {                                                                                       \
    const __m512 v = _mm512_permutexvar_ps(_mm512_srli_epi32(q, shift), table);           \
    for (int m = 0; m < MT; ++m) {                                                        \
      if constexpr (kPair && (j & 1)) s1[m] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xg + m * ld + 16 * j), s1[m]); \
      else s0[m] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xg + m * ld + 16 * j), s0[m]);      \
    }                                                                                     \
  }
    LL_NIBBLE_STEP(8, 2)
    LL_NIBBLE_STEP(12, 3)
    LL_NIBBLE_STEP(16, 4)
    LL_NIBBLE_STEP(20, 5)
    LL_NIBBLE_STEP(24, 6)
    LL_NIBBLE_STEP(28, 7)
#undef LL_NIBBLE_STEP
    for (int m = 0; m < MT; ++m) {
      const __m512 s = kPair ? _mm512_add_ps(s0[m], s1[m]) : s0[m];
      tot[m] = _mm512_fmadd_ps(s, av, tot[m]);
    }
  }
  for (int64_t c = 4 * g_end; c < chunks_end; ++c) {
    const __m512 lut = _mm512_mul_ps(table, _mm512_set1_ps(am[(32 * c) >> log_bs]));
    const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16 * c)));
    const __m512 e0 = _mm512_permutexvar_ps(_mm512_srli_epi32(b0, 4), lut);
    const __m512 o0 = _mm512_permutexvar_ps(b0, lut);
    for (int m = 0; m < MT; ++m) {
      const float* xc = x + m * ld + (32 * c - k0);
      tot[m] = _mm512_fmadd_ps(e0, _mm512_loadu_ps(xc), tot[m]);
      tot[m] = _mm512_fmadd_ps(o0, _mm512_loadu_ps(xc + 16), tot[m]);
    }
  }
  for (int m = 0; m < MT; ++m) sums[m0 + m] += _mm512_reduce_add_ps(tot[m]);
}

// The bfloat16 GEMV (x bfloat16, blocksize >= 64, K % blocksize == 0): the weight as the reference
// multiplies it, bf16(code * absmax), from a 32-entry word table (the 16 values twice, so that
// vpermw's 5-bit index may carry one bit of the neighbouring nibble), and vdpbf16ps: exact products,
// float32 sums, 32 multiply-adds per instruction where an fp32 FMA does 16. Per 64 values: one
// widening load (32 bytes -> 32 words), one shift, two vpermw, two vdpbf16ps; x de-interleaved per
// 64 values (evens, then odds) so that word pairs line up.
#define LL_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c,fma")))
template <int MT>
LL_AVX512_BF16 void rows_bf16(const Gemv4Args& a, int64_t n, int64_t m0, int64_t k0, int64_t k1, const Prefetch& pf,
                              float* sums) {
  constexpr bool kPair = MT <= 2;
  const int64_t k = a.k, bs = a.blocksize;
  const uint8_t* w = a.packed + n * (k / 2);
  const float* am = a.absmax + n * (k / bs);
  const int64_t ld = k1 - k0;  // x of this K tile: [M][ld] from value k0 on
  const uint16_t* x = static_cast<const uint16_t*>(a.x) + a.m * k0 + m0 * ld;
  const __m512 table = _mm512_loadu_ps(a.code);
  __m512 acc0[MT], acc1[MT];
  for (int m = 0; m < MT; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
  __m512i lut = _mm512_setzero_si512();
  const int log_bs = __builtin_ctzll(static_cast<uint64_t>(bs));  // no integer division in the loop
  for (int64_t c = k0 / 64; c < k1 / 64; ++c) {
    const int64_t b = (64 * c) >> log_bs;
    if (c == k0 / 64 || ((64 * c) & (bs - 1)) == 0) {  // a new block: its table, bf16(code * absmax)
      const __m512 lutf = _mm512_mul_ps(table, _mm512_set1_ps(am[b]));
      lut = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(lutf, lutf));
    }
    prefetch_weights(w + 32 * c, am + b, pf);
    const __m512i q = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * c)));
    const __m512bh even = reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(_mm512_srli_epi16(q, 4), lut));
    const __m512bh odd = reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(q, lut));
    for (int m = 0; m < MT; ++m) {
      const uint16_t* xc = x + m * ld + (64 * c - k0);
      acc0[m] = _mm512_dpbf16_ps(acc0[m], even, reinterpret_cast<__m512bh>(_mm512_loadu_si512(xc)));
      if constexpr (kPair) acc1[m] = _mm512_dpbf16_ps(acc1[m], odd, reinterpret_cast<__m512bh>(_mm512_loadu_si512(xc + 32)));
      else acc0[m] = _mm512_dpbf16_ps(acc0[m], odd, reinterpret_cast<__m512bh>(_mm512_loadu_si512(xc + 32)));
    }
  }
  for (int m = 0; m < MT; ++m) sums[m0 + m] += _mm512_reduce_add_ps(kPair ? _mm512_add_ps(acc0[m], acc1[m]) : acc0[m]);
}

using FastRows = void (*)(const Gemv4Args&, int64_t, int64_t, int64_t, int64_t, const Prefetch&, float*);
constexpr FastRows kRowsF32[9] = {nullptr,     rows_f32<1>, rows_f32<2>, rows_f32<3>, rows_f32<4>,
                                  rows_f32<5>, rows_f32<6>, rows_f32<7>, rows_f32<8>};
constexpr FastRows kRowsBf16[9] = {nullptr,      rows_bf16<1>, rows_bf16<2>, rows_bf16<3>, rows_bf16<4>,
                                   rows_bf16<5>, rows_bf16<6>, rows_bf16<7>, rows_bf16<8>};

LL_AVX512 void store_outputs(const Gemv4Args& a, int64_t n, const float* sums) { store_gemv_outputs(a, n, sums); }

LL_AVX512 void gemv_avx512(const Gemv4Args& a, int64_t n0, int64_t n1) {
  float sums[16];
  if (a.layout != Gemv4Layout::kGeneral) {
    // x is re-read for every row of W: it must stay in L1. Past L1 (M * K * 4 bytes > 32 KB) the
    // FMAs wait on L2 (3.3 instead of 2.1 cycles per 32 weights and row of x at M = 8, K = 4096, in a
    // cache-resident microbenchmark), so K is cut into tiles of x that fit (gemv4_tile; each tile of
    // x contiguous, as rows 16 KB apart would fight over the same L1 sets): all rows of a block for
    // one tile, then the next tile, with the partial sums kept per row. One thread, 4096 x 4096,
    // float32 x: M = 4 3.5 -> 2.1 ms, M = 16 12.0 -> 10.4 ms.
    const bool bf16 = a.layout == Gemv4Layout::kBFloat16;
    const FastRows* rows = bf16 ? kRowsBf16 : kRowsF32;
    const int64_t tile = a.tile;
    if (tile >= a.k) {
      const Prefetch pf{kPrefetchBytes, kPrefetchBytes / 8, 0, 0};
      for (int64_t n = n0; n < n1; ++n) {
        std::fill(sums, sums + a.m, 0.0f);
        // groups of at most 8 rows of x; the weight row (K / 2 bytes) stays in L1 for the next group
        for (int64_t m0 = 0; m0 < a.m; m0 += 8) rows[std::min<int64_t>(8, a.m - m0)](a, n, m0, 0, a.k, pf, sums);
        store_outputs(a, n, sums);
      }
      return;
    }
    // blocks of rows of ~64 KB of packed weight, which stay in L2 while the tiles pass over them
    const int64_t block_rows = std::max<int64_t>(1, 131072 / a.k);
    // into L1: the same tile of the row after next; into L2: the same place one block of rows ahead
    const Prefetch pf{2 * (a.k / 2), 2 * (a.k / a.blocksize) * 4, block_rows * (a.k / 2),
                      block_rows * (a.k / a.blocksize) * 4};
    std::vector<float> partial(static_cast<size_t>(block_rows * a.m));
    for (int64_t r0 = n0; r0 < n1; r0 += block_rows) {
      const int64_t r1 = std::min(n1, r0 + block_rows);
      std::fill(partial.begin(), partial.end(), 0.0f);
      for (int64_t k0 = 0; k0 < a.k; k0 += tile) {
        const int64_t k1 = k0 + tile >= a.k ? a.k : k0 + tile;
        for (int64_t n = r0; n < r1; ++n) {
          float* sp = partial.data() + (n - r0) * a.m;
          for (int64_t m0 = 0; m0 < a.m; m0 += 8) rows[std::min<int64_t>(8, a.m - m0)](a, n, m0, k0, k1, pf, sp);
        }
      }
      for (int64_t n = r0; n < r1; ++n) store_outputs(a, n, partial.data() + (n - r0) * a.m);
    }
    return;
  }
  // K not a multiple of the blocksize: blocks straddle rows. Decode the row (whole 32-value chunks
  // of the flat weight) into L1, then one dot product per row of x.
  const int64_t k = a.k, n_total = a.n_rows * k;
  const float* xf = static_cast<const float*>(a.x);
  std::vector<float> staging(static_cast<size_t>(k + 64));
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t v0 = n * k;
    decode_values_avx512(a.packed, a.absmax, a.code, a.blocksize, n_total, v0, v0 + k, staging.data());
    const float* row = staging.data() + (v0 % 32);
    for (int64_t m = 0; m < a.m; ++m) {
      const float* xm = xf + m * k;
      __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
      int64_t i = 0;
      for (; i + 64 <= k; i += 64) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(row + i), _mm512_loadu_ps(xm + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(row + i + 16), _mm512_loadu_ps(xm + i + 16), s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(row + i + 32), _mm512_loadu_ps(xm + i + 32), s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(row + i + 48), _mm512_loadu_ps(xm + i + 48), s3);
      }
      for (; i < k; i += 16) {
        const __mmask16 valid = first_lanes(k - i);
        s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(valid, row + i), _mm512_maskz_loadu_ps(valid, xm + i), s0);
      }
      sums[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
    }
    store_outputs(a, n, sums);
  }
}
#endif  // __x86_64__

}  // namespace

// ---- entry points ------------------------------------------------------------------------------------

FourBitSearch make_fourbit_search(const float* code) {
  int32_t idx[16];
  std::iota(idx, idx + 16, 0);
  // stable, like torch.argsort(stable=True): FP4's 0.0 (pattern 0) sorts before its -0.0 (pattern 8)
  std::stable_sort(idx, idx + 16, [&](int32_t l, int32_t r) { return code[l] < code[r]; });
  FourBitSearch s{};
  for (int i = 0; i < 16; ++i) s.order[i] = idx[i];
  for (int i = 0; i < 15; ++i) s.bounds[i] = (code[idx[i]] + code[idx[i + 1]]) / 2.0f;
  s.bounds[15] = std::numeric_limits<float>::infinity();
  return s;
}

void quantize_4bit_cpu(const void* x, FloatType x_type, const FourBitSearch& s, uint8_t* packed, float* absmax,
                       int64_t n, int64_t blocksize, int64_t b0, int64_t b1) {
#if defined(__x86_64__)
  if (bnb_use_avx512()) {
    switch (x_type) {
      case FloatType::kFloat16:
        return quantize_range_avx512(static_cast<const c10::Half*>(x), s, packed, absmax, n, blocksize, b0, b1);
      case FloatType::kBFloat16:
        return quantize_range_avx512(static_cast<const c10::BFloat16*>(x), s, packed, absmax, n, blocksize, b0, b1);
      default:
        return quantize_range_avx512(static_cast<const float*>(x), s, packed, absmax, n, blocksize, b0, b1);
    }
  }
#endif
  switch (x_type) {
    case FloatType::kFloat16:
      return quantize_range_portable(static_cast<const c10::Half*>(x), s, packed, absmax, n, blocksize, b0, b1);
    case FloatType::kBFloat16:
      return quantize_range_portable(static_cast<const c10::BFloat16*>(x), s, packed, absmax, n, blocksize, b0, b1);
    default:
      return quantize_range_portable(static_cast<const float*>(x), s, packed, absmax, n, blocksize, b0, b1);
  }
}

void dequantize_4bit_cpu(const uint8_t* packed, const float* absmax, const float* code, int64_t n,
                         int64_t blocksize, void* out, FloatType out_type, int64_t c0, int64_t c1) {
#if defined(__x86_64__)
  if (bnb_use_avx512()) return dequantize_avx512(packed, absmax, code, n, blocksize, out, out_type, c0, c1);
#endif
  dequantize_portable(packed, absmax, code, n, blocksize, out, out_type, c0, c1);
}

namespace {
// Rows of bfloat16 x from which the vdpbf16ps kernel runs; below, x is widened to float32 for the
// float32 kernel (exact: every bfloat16 is a float32; the sum is then of code * x, scaled once per
// block, instead of bf16(code * absmax) * x). On a 2-core AMD EPYC (Zen 4) the bf16 kernel was the
// faster from one row (425 vs 526 us on 4096 x 4096, cache flushed); on a 2-core Intel Xeon (Sapphire
// Rapids class) the float32 one is at 1 and 2 rows (weights from memory, one row, 4096 x 4096 and
// 11008 x 4096: 625 vs 779 us and 1309 vs 1791 us), level at 4, behind from 8 (benchmarks/RESULTS.md).
std::atomic<int64_t> g_bf16_kernel_min_rows{-1};  // -1: by CPU vendor, as measured

int64_t bf16_kernel_min_rows() {
  const int64_t forced = g_bf16_kernel_min_rows.load(std::memory_order_relaxed);
  if (forced >= 0) return forced;
#if defined(__x86_64__)
  static const bool intel = __builtin_cpu_is("intel");
  return intel ? 3 : 1;
#else
  return 1;
#endif
}
}  // namespace

int64_t bnb_cpu_set_bf16_kernel_min_rows(int64_t rows) { return g_bf16_kernel_min_rows.exchange(rows); }

Gemv4Layout gemv4_layout(FloatType x_type, int64_t m, int64_t k, int64_t blocksize) {
  if (!bnb_use_avx512() || k % blocksize != 0) return Gemv4Layout::kGeneral;
  if (x_type == FloatType::kBFloat16 && blocksize >= 64 && bnb_use_avx512_bf16() && m >= bf16_kernel_min_rows())
    return Gemv4Layout::kBFloat16;
  return Gemv4Layout::kFloat32;
}

int64_t gemv4_x_bytes(Gemv4Layout layout, int64_t m, int64_t k) {
  return m * k * (layout == Gemv4Layout::kBFloat16 ? 2 : 4);
}

namespace {
// Value order of the float32 fast layout within a group of 128: lane i of vector s is value
// 8 i + kNibbleValue[s] (vector s reads nibble s of each 32-bit lane; the low nibble of a byte is
// the odd value).
constexpr int kNibbleValue[8] = {1, 0, 3, 2, 5, 4, 7, 6};
}  // namespace

int64_t gemv4_tile(Gemv4Layout layout, int64_t m, int64_t k) {
  if (layout == Gemv4Layout::kGeneral) return k;
  const int64_t step = layout == Gemv4Layout::kBFloat16 ? 64 : 128;
  const int64_t elem = layout == Gemv4Layout::kBFloat16 ? 2 : 4;
  // 32 KB of x per tile (L1D): measured best of 8-128 KB at M = 2..16 on 4096 x 4096 (one thread);
  // smaller tiles cost more per-row overhead than they save
  const int64_t tile = std::max<int64_t>(step, (32768 / (elem * m)) / step * step);
  return tile >= k ? k : tile;
}

namespace {
template <typename T>
void prepare_x_typed(const T* x, int64_t m, int64_t k, Gemv4Layout layout, int64_t tile, void* out) {
  const bool bf16 = layout == Gemv4Layout::kBFloat16;
  std::vector<float> rowf(layout == Gemv4Layout::kFloat32 ? k : 0);
  std::vector<uint16_t> rowh(bf16 ? k : 0);
  for (int64_t r = 0; r < m; ++r) {
    const T* xr = x + r * k;
    if (layout == Gemv4Layout::kGeneral) {
      float* o = static_cast<float*>(out) + r * k;
      for (int64_t i = 0; i < k; ++i) o[i] = static_cast<float>(xr[i]);
      continue;
    }
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (bf16) {
        // per 64 values: the 32 even ones, then the 32 odd ones
        for (int64_t c = 0; c < k; c += 64)
          for (int i = 0; i < 32; ++i) {
            rowh[c + i] = xr[c + 2 * i].x;
            rowh[c + 32 + i] = xr[c + 2 * i + 1].x;
          }
      }
    }
    if (!bf16) {
      const int64_t grouped = k / 128 * 128;
      for (int64_t g = 0; g < grouped; g += 128)
        for (int s = 0; s < 8; ++s)
          for (int i = 0; i < 16; ++i) rowf[g + 16 * s + i] = static_cast<float>(xr[g + 8 * i + kNibbleValue[s]]);
      // the tail of 32-value chunks: the 16 even values, then the 16 odd ones
      for (int64_t c = grouped; c < k; c += 32)
        for (int i = 0; i < 16; ++i) {
          rowf[c + i] = static_cast<float>(xr[c + 2 * i]);
          rowf[c + 16 + i] = static_cast<float>(xr[c + 2 * i + 1]);
        }
    }
    // tile by tile: [tile][row][tile length], each tile of x contiguous
    for (int64_t k0 = 0; k0 < k; k0 += tile) {
      const int64_t len = std::min(tile, k - k0), at = m * k0 + r * len;
      if (bf16) std::memcpy(static_cast<uint16_t*>(out) + at, rowh.data() + k0, sizeof(uint16_t) * len);
      else std::memcpy(static_cast<float*>(out) + at, rowf.data() + k0, sizeof(float) * len);
    }
  }
}
}  // namespace

void gemv4_prepare_x(const void* x, FloatType x_type, int64_t m, int64_t k, Gemv4Layout layout, int64_t tile,
                     void* out) {
  switch (x_type) {
    case FloatType::kFloat16:
      return prepare_x_typed(static_cast<const c10::Half*>(x), m, k, layout, tile, out);
    case FloatType::kBFloat16:
      return prepare_x_typed(static_cast<const c10::BFloat16*>(x), m, k, layout, tile, out);
    default:
      return prepare_x_typed(static_cast<const float*>(x), m, k, layout, tile, out);
  }
}

void gemv_4bit_cpu(const Gemv4Args& a, int64_t n0, int64_t n1) {
#if defined(__x86_64__)
  // the fast layouts are only chosen with AVX-512; the general one runs either way
  if (a.layout != Gemv4Layout::kGeneral || bnb_use_avx512()) return gemv_avx512(a, n0, n1);
#endif
  gemv_portable(a, n0, n1);
}

}  // namespace lightllm
