// bitsandbytes' 4-bit NF4 / FP4 weights on CUDA: host launchers only (no torch headers; the
// at::Tensor side is bindings_cuda.cpp). Format: lightllm/ops/fourbit.py.
#pragma once

#include <cstdint>

#include "blockwise.h"  // FloatType

namespace lightllm {

// The block absmax: float32 values, or (double quantization, nested_absmax != null) uint8 codes
// decoded as nested_code[c] * nested_absmax[b / nested_blocksize] + *nested_offset.
struct FourBitScales {
  const void* absmax;          // float32 [blocks] or uint8 [blocks]
  const float* nested_absmax;  // null: not double-quantized
  const float* nested_code;    // [256]
  const float* nested_offset;  // [1]
  int64_t nested_blocksize;
};

struct FourBitGemvParams {
  const void* x;        // [m, k], 16-byte aligned, k a multiple of 32
  FloatType x_type;
  const uint8_t* packed;  // [n * k / 2], 16-byte aligned
  FourBitScales scales;
  const float* code;    // the 16 table values
  int64_t blocksize;
  const float* bias;    // [n] float32 (already rounded to x's dtype) or null
  void* y;              // [m, n] in x's dtype
  float* ws;            // [splits, m, n] float32 partials (splits > 1)
  int* counters;        // [tiles] zeroed, left zeroed
  int64_t m, n, k;
  int splits;
};

constexpr int64_t kFourBitGemvMaxRows = 16;
// Output rows per CTA for m rows of x (8 warps, 4 or 2 output rows each).
int64_t fourbit_gemv_rows_per_cta(int64_t m);
// K slices for a layer of n outputs and k inputs on a card with `sm_count` SMs.
int fourbit_gemv_splits(int64_t m, int64_t n, int64_t k, int sm_count);
int launch_fourbit_gemv(const FourBitGemvParams& p, void* stream);

// out[0 .. n) = code[c] * absmax in float32, rounded once to out_type.
int launch_fourbit_dequantize(const uint8_t* packed, const FourBitScales& scales, const float* code, int64_t blocksize,
                              int64_t n, void* out, FloatType out_type, void* stream);

}  // namespace lightllm
