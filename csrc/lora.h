// LoRA on a dense base layer, decode sizes (up to 16 tokens): host launchers only (no torch
// headers; see bindings_cuda.cpp). Semantics: lightllm/ops/lora.py,
//   y = x W^T + bias + scale * (x A^T) B^T,  S = x A^T in float32, one rounding to x's dtype.
#pragma once

#include <cstdint>

#include "blockwise.h"  // FloatType

namespace lightllm {

#ifdef LIGHTLLM_WITH_CUDA
constexpr int64_t kLoraDecodeMaxRows = 16;
constexpr int64_t kLoraDecodeTileN = 256;   // output columns (rows of W) per CTA
constexpr int64_t kLoraDecodeChunk = 256;   // K values staged in shared memory at a time

struct LoraDecodeParams {
  const void* x;       // [m, k], x_type (float16 or bfloat16), contiguous, 16-byte aligned
  const void* w;       // [n, k], x_type, contiguous, 16-byte aligned, k % 8 == 0
  const void* bias;    // [n] or null
  FloatType bias_type;
  const void* a;       // [r, k] or null (no adapter), contiguous, 16-byte aligned rows
  FloatType a_type;
  const void* b;       // [n, r], contiguous
  FloatType b_type;
  FloatType x_type;
  void* y;             // [m, n], x_type
  float* s_out;        // [m, r]
  float* ws_y;         // [splits, m, n]
  float* ws_s;         // [tiles, splits, m, r]
  int* counters;       // [tiles], zero on entry, zero again on exit (bindings_cuda.cpp: split_counters)
  int64_t m, n, k;
  int r;
  float scale;
  int splits;
  int64_t k_per_split; // a multiple of kLoraDecodeChunk
};

struct LoraDecodePlan {
  int tiles;
  int splits;
  int64_t k_per_split;
};

// Column tiles and K slices for about two waves of the device's SMs.
LoraDecodePlan plan_lora_decode(int64_t n, int64_t k, int device);

// One launch on `stream` (a cudaStream_t). Returns the launch's error code.
int launch_lora_decode(const LoraDecodeParams& p, void* stream);
#endif

}  // namespace lightllm
