// bitsandbytes-format layers on the CPU: 4-bit NF4/FP4 (quantize, dequantize, decode GEMV) and
// LLM.int8 (decode GEMV). Host kernels only, no torch headers: bindings_bnb.cpp checks the tensors
// and runs these over row / block ranges on torch's thread pool.
//
// The Python references define the semantics (lightllm/ops/fourbit.py, lightllm/ops/int8.py).
// 4-bit: flat row-major values in blocks of `blocksize` (a power of two, 32..4096), so every block
// starts on a 32-value boundary of the flat index: a "chunk" of 32 values (16 packed bytes) never
// straddles two blocks, even where a block straddles two rows of a weight.
#pragma once

#include <cstdint>
#include <functional>

#include "blockwise.h"  // FloatType

namespace lightllm {

// ---- LoRA on these layers --------------------------------------------------------------------------

// The rank-r term of LoRA on a 4-bit or int8 base, added in the GEMV's epilogue so that the layer
// with its adapter reads the packed weight once: out[m, n] += addend[m, n], addend = scale * S B^T
// (float32 [M, N], from torch's GEMM before the call: S = x A^T [M, r] is kept for the backward pass,
// and M x N x r multiply-adds are few next to the M x N x K of the layer). null: no adapter.
struct LoraEpilogue {
  const float* addend = nullptr;
  int64_t ld = 0;  // N

  inline float term(int64_t m, int64_t n) const { return addend[m * ld + n]; }
};

// ---- 4-bit ------------------------------------------------------------------------------------

// The 16 code values (float32, indexed by code) in the form the kernels search: the codes sorted
// (stable, as torch.argsort), the 15 midpoints between neighbours ((a + b) / 2 in float32) and the
// code index of each sorted position.
struct FourBitSearch {
  float bounds[16];   // 15 midpoints, the 16th unused (+inf)
  int32_t order[16];  // sorted position -> code
};
FourBitSearch make_fourbit_search(const float* code);

// Quantize blocks [b0, b1) of n values: absmax[b] and the packed bytes of those blocks.
void quantize_4bit_cpu(const void* x, FloatType x_type, const FourBitSearch& search, uint8_t* packed, float* absmax,
                       int64_t n, int64_t blocksize, int64_t b0, int64_t b1);

// Dequantize chunks [c0, c1) (values 32 * c0 .. 32 * c1 - 1, clipped to n) into out[0..n).
void dequantize_4bit_cpu(const uint8_t* packed, const float* absmax, const float* code, int64_t n,
                         int64_t blocksize, void* out, FloatType out_type, int64_t c0, int64_t c1);

// y[M, N] = x[M, K] W^T + bias for the 4-bit W [N, K] (flat, blocks along the flat index).
// The layout of x the kernel reads: kGeneral (float32, as is: blocks may straddle rows, or no
// AVX-512), kFloat32 (float32 in the fused kernel's value order), kBFloat16 (x's own bfloat16 values,
// for the vdpbf16ps kernel).
enum class Gemv4Layout : int { kGeneral = 0, kFloat32 = 1, kBFloat16 = 2 };
Gemv4Layout gemv4_layout(FloatType x_type, int64_t m, int64_t k, int64_t blocksize);
// Rows of bfloat16 x from which kBFloat16 is chosen (-1: by CPU, the default); returns the previous
// setting (tests run both kernels at every M).
int64_t bnb_cpu_set_bf16_kernel_min_rows(int64_t rows);
int64_t gemv4_x_bytes(Gemv4Layout layout, int64_t m, int64_t k);
// The K tile of the fused kernels (x is read per tile of K; k when one tile does).
int64_t gemv4_tile(Gemv4Layout layout, int64_t m, int64_t k);
// x as the kernel reads it: per K tile, that tile of every row, contiguous.
void gemv4_prepare_x(const void* x, FloatType x_type, int64_t m, int64_t k, Gemv4Layout layout, int64_t tile,
                     void* out);

struct Gemv4Args {
  const uint8_t* packed;
  const float* absmax;
  const float* code;
  int64_t n_rows;  // N
  int64_t k;       // K
  int64_t blocksize;
  int64_t m;          // rows of x, 1..16
  Gemv4Layout layout;  // decided once per call (gemv4_layout)
  int64_t tile;        // gemv4_tile(layout, m, k)
  const void* x;       // from gemv4_prepare_x
  const float* bias;   // float32 [N] (already rounded to x's dtype) or nullptr
  void* out;           // [M, N] in out_type
  FloatType out_type;
  LoraEpilogue lora;   // added with the bias, before the one rounding
};
// Output rows [n0, n1).
void gemv_4bit_cpu(const Gemv4Args& a, int64_t n0, int64_t n1);

// ---- LLM.int8 -----------------------------------------------------------------------------------

// The activations quantized as bitsandbytes' int8_vectorwise_quant does on their float16 values,
// in the layout the kernel reads.
struct Int8Activations {
  int64_t m = 0, k = 0, k_padded = 0;  // k_padded: a multiple of 64
  uint8_t* codes_u8 = nullptr;          // [m][k_padded]: code + 128 (unsigned), padding 128 (code 0)
  int8_t* codes = nullptr;              // [m][k_padded]: signed codes (portable path)
  float* row_stats = nullptr;           // [m]
  int64_t n_outliers = 0;
  int64_t* outlier_cols = nullptr;      // [n_outliers], ascending
  float* outlier_x = nullptr;           // [m][n_outliers]: x's own values (x's dtype) in float32
};
// Bytes of scratch Int8Activations needs (caller allocates; prepare carves it up).
int64_t int8_scratch_bytes(int64_t m, int64_t k);
// Runs body(r0, r1) over the rows [0, n), on one thread or many (the bindings pass torch's pool).
using RowRunner = std::function<void(int64_t n, const std::function<void(int64_t, int64_t)>& body)>;
void int8_prepare_activations(const void* x, FloatType x_type, int64_t m, int64_t k, double threshold, void* scratch,
                              Int8Activations* acts, const RowRunner& run_rows = {});

struct Int8LinearArgs {
  const int8_t* cb;     // [N, K]
  const float* scb;     // [N]
  const float* bias;    // [N], rounded to x's dtype, or nullptr
  int64_t n_rows;
  const Int8Activations* acts;
  void* out;            // [M, N] in out_type (x's dtype)
  FloatType out_type;
  LoraEpilogue lora;    // added after the base output is rounded to x's dtype (the reference's order)
};
// Output rows [n0, n1), every row of x.
void int8_linear_cpu(const Int8LinearArgs& a, int64_t n0, int64_t n1);
// The same outputs from a product computed elsewhere: c [M, N] = codes . CB^T, exact int32 (the
// bindings take it from torch._int_mm, oneDNN's AMX / VNNI GEMM, when x has many rows).
void int8_linear_epilogue_cpu(const Int8LinearArgs& a, const int32_t* c, int64_t n0, int64_t n1);

// Which instruction set the kernels use: "avx512" (AVX-512 F/BW/VL, + VNNI for int8) where the CPU
// has it, else "portable". force_portable(true) makes every kernel take the portable path (tests).
const char* bnb_cpu_isa();
void bnb_cpu_force_portable(bool on);

}  // namespace lightllm
