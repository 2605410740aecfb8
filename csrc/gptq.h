// GPTQ dequant-matmul kernels: host launchers only (no torch headers; see bindings_cuda.cpp).
// Layout and formula: lightllm/quantization/gptq_format.py. W[n, k] = s[g[k], n] * (q[k, n] - z[g[k], n]).
#pragma once

#include <cstdint>

#include "blockwise.h"  // FloatType

namespace lightllm {

#ifdef LIGHTLLM_WITH_CUDA
// Rows of x up to which the GEMV kernel serves; larger M goes through dequantize + cuBLAS.
constexpr int64_t kGptqGemvMaxRows = 8;
constexpr int64_t kGptqGemvTileN = 512;  // output columns per CTA (128 threads x 4)
constexpr int64_t kGptqGemvSlice = 256;  // K values per CTA

// y [m, n] = x [m, k] @ W^T + bias + scale * S B^T in one launch (m <= kGptqGemvMaxRows): K is cut
// into slices of kGptqGemvSlice, one CTA each, and the CTA completing a column tile sums the
// slices' partials and runs the epilogue (split reduction, split_lora.cuh). S is `lora_s` [m, r]
// (float32) or, with lora_s null and lora_a [r, k] given, x A^T summed from the slices.
struct GptqGemvParams {
  const void* x;  // [m, k] contiguous
  FloatType x_type;
  int64_t m, k, n;
  const int32_t* qweight;  // 16-byte aligned
  const int32_t* qzeros;
  const void* scales;
  FloatType scales_type;
  const int32_t* g_idx;
  int bits, zero_offset;
  const void* bias;  // [n] or null
  FloatType bias_type;
  const void* lora_a;  // [r, k] or null; 16-byte aligned rows
  FloatType a_type;
  const float* lora_s;  // [m, r] or null
  const void* lora_b;   // [n, r] (needed with lora_a or lora_s)
  FloatType b_type;
  int r;
  float scale;
  void* y;        // [m, n], x_type
  float* ws_y;    // [splits, m, n]
  float* ws_s;    // [tiles, splits, m, r] (with lora_a)
  int* counters;  // [tiles], zero on entry and on exit (bindings_cuda.cpp: split_counters)
};

// (column tiles, K slices) of a launch.
inline int64_t gptq_gemv_tiles(int64_t n) { return (n + kGptqGemvTileN - 1) / kGptqGemvTileN; }
inline int64_t gptq_gemv_splits(int64_t k) { return k == 0 ? 1 : (k + kGptqGemvSlice - 1) / kGptqGemvSlice; }

int launch_gptq_gemv(const GptqGemvParams& p, void* stream);

// out [n, k] = W in out_type (computed in float32, rounded once).
int launch_gptq_dequantize(const int32_t* qweight, const int32_t* qzeros, const void* scales,
                           FloatType scales_type, const int32_t* g_idx, int64_t n, int64_t k, int bits,
                           int zero_offset, void* out, FloatType out_type, void* stream);
#endif

}  // namespace lightllm
