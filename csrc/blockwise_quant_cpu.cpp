// Block-wise 8-bit quantization on the CPU: one pass per block (absmax, then codes).
// Threading is the caller's (bindings.cpp runs block ranges on torch's thread pool).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "blockwise.h"
#include "search_tree.h"

namespace lightllm {
namespace {

inline float load_as_float(const void* base, FloatType type, int64_t i) {
  switch (type) {
    case FloatType::kFloat16: return static_cast<float>(static_cast<const c10::Half*>(base)[i]);
    case FloatType::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

template <typename T>
void quantize_range(const T* x, const CodeSearch& search, uint8_t* codes, float* absmax, int64_t n,
                    int64_t blocksize, int64_t block_begin, int64_t block_end) {
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t start = b * blocksize;
    const int64_t len = std::min<int64_t>(blocksize, n - start);
    const T* xb = x + start;
    float m = 0.0f;
    for (int64_t i = 0; i < len; ++i) m = nan_propagating_max(m, std::fabs(static_cast<float>(xb[i])));
    absmax[b] = m;
    search.encode(xb, m == 0.0f ? 0.0f : 1.0f / m, codes + start, len);
  }
}

template <typename T>
void dequantize_range(const uint8_t* codes, const float* absmax, const float* map, T* out, int64_t n,
                      int64_t blocksize, int64_t block_begin, int64_t block_end) {
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t start = b * blocksize;
    const int64_t len = std::min<int64_t>(blocksize, n - start);
    const float a = absmax[b];
    for (int64_t i = 0; i < len; ++i) out[start + i] = static_cast<T>(map[codes[start + i]] * a);
  }
}

}  // namespace

CodeSearch* make_code_search(const float* map) { return new CodeSearch(map); }
void free_code_search(CodeSearch* search) { delete search; }

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
