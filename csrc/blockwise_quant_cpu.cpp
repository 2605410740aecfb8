// Block-wise 8-bit quantization on the CPU: one pass per block (absmax, then codes).
// Threading is the caller's (bindings.cpp runs block ranges on torch's thread pool).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "blockwise.h"
#include "search_tree.h"

namespace lightllm {
namespace {

// ---- float16 <-> float32 in bulk --------------------------------------------------------------
// c10::Half converts in software (~20 integer ops a value); F16C does 8 values in one instruction,
// with the same IEEE round-to-nearest-even. Chosen at run time, so the build needs no -mf16c.
#if defined(__x86_64__)
__attribute__((target("avx,f16c"))) void half_to_float_f16c(const c10::Half* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
  for (; i < n; ++i) out[i] = _cvtsh_ss(in[i].x);
}
__attribute__((target("avx,f16c"))) void float_to_half_f16c(const float* in, c10::Half* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) out[i].x = _cvtss_sh(in[i], _MM_FROUND_TO_NEAREST_INT);
}
const bool kHasF16C = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
#else
constexpr bool kHasF16C = false;
void half_to_float_f16c(const c10::Half*, float*, int64_t) {}
void float_to_half_f16c(const float*, c10::Half*, int64_t) {}
#endif

template <typename T>
void to_float(const T* in, float* out, int64_t n) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    if (kHasF16C) return half_to_float_f16c(in, out, n);
  }
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(in[i]);
}

template <typename T>
void from_float(const float* in, T* out, int64_t n) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    if (kHasF16C) return float_to_half_f16c(in, out, n);
  }
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(in[i]);
}

// ---- kernels ------------------------------------------------------------------------------------
// Largest |x|, NaN if any value is NaN. Eight independent running maxima: a single one is a
// loop-carried compare-and-select chain; eight let the compiler use vector max instructions.
float block_absmax(const float* x, int64_t n) {
  constexpr int kLanes = 8;
  float lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] = nan_propagating_max(lane[l], std::fabs(x[i + l]));
  float m = 0.0f;
  for (; i < n; ++i) m = nan_propagating_max(m, std::fabs(x[i]));
  for (int l = 0; l < kLanes; ++l) m = nan_propagating_max(m, lane[l]);
  return m;
}

template <typename T>
void quantize_range(const T* x, const CodeSearch& search, uint8_t* codes, float* absmax, int64_t n,
                    int64_t blocksize, int64_t block_begin, int64_t block_end) {
  float buffer[4096];  // one block in float32 (blocksize <= 4096); unused for float32 input
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t start = b * blocksize;
    const int64_t len = std::min<int64_t>(blocksize, n - start);
    const float* xb;
    if constexpr (std::is_same_v<T, float>) {
      xb = x + start;
    } else {
      to_float(x + start, buffer, len);
      xb = buffer;
    }
    const float m = block_absmax(xb, len);
    absmax[b] = m;
    search.encode(xb, m == 0.0f ? 0.0f : 1.0f / m, codes + start, len);
  }
}

template <typename T>
void dequantize_range(const uint8_t* codes, const float* absmax, const float* map, T* out, int64_t n,
                      int64_t blocksize, int64_t block_begin, int64_t block_end) {
  constexpr int64_t kChunk = 512;
  float values[kChunk];
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t start = b * blocksize;
    const int64_t len = std::min<int64_t>(blocksize, n - start);
    const float a = absmax[b];
    for (int64_t c0 = 0; c0 < len; c0 += kChunk) {
      const int64_t m = std::min(kChunk, len - c0);
      const uint8_t* cb = codes + start + c0;
      if constexpr (std::is_same_v<T, float>) {
        for (int64_t i = 0; i < m; ++i) out[start + c0 + i] = map[cb[i]] * a;
      } else {
        for (int64_t i = 0; i < m; ++i) values[i] = map[cb[i]] * a;
        from_float(values, out + start + c0, m);
      }
    }
  }
}

}  // namespace

std::shared_ptr<const CodeSearch> code_search_for(const float* map) {
  // Building the search table costs ~30 us, more than quantizing a small tensor; keep the last few
  // maps (compared bit for bit, so any change to a map builds a new table).
  constexpr size_t kKeep = 4;
  static std::mutex mutex;
  static std::vector<std::pair<std::array<float, 256>, std::shared_ptr<const CodeSearch>>> recent;
  std::lock_guard<std::mutex> lock(mutex);
  for (size_t i = 0; i < recent.size(); ++i) {
    if (std::memcmp(recent[i].first.data(), map, sizeof(float) * 256) == 0) {
      if (i != 0) std::swap(recent[i], recent[0]);
      return recent[0].second;
    }
  }
  std::array<float, 256> key;
  std::memcpy(key.data(), map, sizeof(float) * 256);
  recent.insert(recent.begin(), {key, std::make_shared<const CodeSearch>(map)});
  if (recent.size() > kKeep) recent.pop_back();
  return recent[0].second;
}

void quantize_blockwise_cpu(const void* x, FloatType x_type, const CodeSearch& search, uint8_t* codes,
                            float* absmax, int64_t n, int64_t blocksize, int64_t block_begin,
                            int64_t block_end) {
  switch (x_type) {
    case FloatType::kFloat16:
      quantize_range(static_cast<const c10::Half*>(x), search, codes, absmax, n, blocksize, block_begin, block_end);
      break;
    case FloatType::kBFloat16:
      quantize_range(static_cast<const c10::BFloat16*>(x), search, codes, absmax, n, blocksize, block_begin, block_end);
      break;
    default:
      quantize_range(static_cast<const float*>(x), search, codes, absmax, n, blocksize, block_begin, block_end);
  }
}

void dequantize_blockwise_cpu(const uint8_t* codes, const float* absmax, const float* map, void* out,
                              FloatType out_type, int64_t n, int64_t blocksize, int64_t block_begin,
                              int64_t block_end) {
  switch (out_type) {
    case FloatType::kFloat16:
      dequantize_range(codes, absmax, map, static_cast<c10::Half*>(out), n, blocksize, block_begin, block_end);
      break;
    case FloatType::kBFloat16:
      dequantize_range(codes, absmax, map, static_cast<c10::BFloat16*>(out), n, blocksize, block_begin, block_end);
      break;
    default:
      dequantize_range(codes, absmax, map, static_cast<float*>(out), n, blocksize, block_begin, block_end);
  }
}

}  // namespace lightllm
