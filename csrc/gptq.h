// GPTQ dequant-matmul kernels: host launchers only (no torch headers; see bindings.cpp).
// Layout and formula: lightllm/quantization/gptq_format.py. W[n, k] = s[g[k], n] * (q[k, n] - z[g[k], n]).
#pragma once

#include <cstdint>

#include "blockwise.h"  // FloatType

namespace lightllm {

#ifdef LIGHTLLM_WITH_CUDA
// Rows of x up to which the GEMV kernel serves; larger M goes through dequantize + cuBLAS.
constexpr int64_t kGptqGemvMaxRows = 8;

// out_f32 [m, n] += x [m, k] @ W^T, over K slices that add up with float32 atomics (the caller
// zeroes out_f32 and applies bias, LoRA term and the cast to x's dtype). m <= kGptqGemvMaxRows.
int launch_gptq_gemv(const void* x, FloatType x_type, int64_t m, int64_t k, const int32_t* qweight,
                     const int32_t* qzeros, const void* scales, FloatType scales_type, const int32_t* g_idx,
                     int64_t n, int bits, int zero_offset, float* out_f32, void* stream);

// out [n, k] = W in out_type (computed in float32, rounded once).
int launch_gptq_dequantize(const int32_t* qweight, const int32_t* qzeros, const void* scales,
                           FloatType scales_type, const int32_t* g_idx, int64_t n, int64_t k, int bits,
                           int zero_offset, void* out, FloatType out_type, void* stream);
#endif

}  // namespace lightllm
