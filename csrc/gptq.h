// GPTQ dequant-matmul kernels: host launchers only (no torch headers; see bindings_cuda.cpp).
// Layout and formula: lightllm/quantization/gptq_format.py. W[n, k] = s[g[k], n] * (q[k, n] - z[g[k], n]).
#pragma once

#include <cstdint>
#include <vector>

#include "blockwise.h"  // FloatType

namespace lightllm {

// ---- CPU (csrc/gptq_cpu.cpp; bindings.cpp checks the arguments and runs ranges in parallel) ---

// Instruction sets of the CPU GEMV, chosen at run time (the build targets baseline x86-64).
// kAvx512Bf16: AVX-512 plus AVX512-BF16 and VBMI2, for the bf16 dot-product path (float16 and bfloat16
// activations, 2, 3, 4 bits; everything else runs the AVX-512 float32 path there).
enum class CpuIsa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
CpuIsa gptq_cpu_best_isa();  // the widest this CPU runs
const char* cpu_isa_name(CpuIsa isa);

// One call of the CPU GEMV. The weight is read once per block of rows (blocks of up to 16 rows,
// gptq_cpu_row_blocks); within a block every packed word is loaded once and used for every row.
// K is cut into segments where g_idx is constant (the groups, when the rows are in group order as
// QuantLinear keeps them; any g_idx works, a scattered one is just slower). Per segment the kernel
// sums x_k * (q_k - c) with c = 2^(bits-1) (exact small integers), and then adds
// s * acc - s * (z - c) * sum_k x_k, so the zero point and scale cost one step per segment.
struct GptqCpuGemv {
  const float* x;      // float32, rows padded to the row blocks with zeros, each block interleaved:
                       // (row0 + r, k) at x[row0 * k + k * rows + r] (gptq_cpu_interleave)
  const float* xsum;   // [rows, segments]: sum of x over each segment
  const int32_t* seg_start;  // [segments + 1], k boundaries
  const int32_t* seg_group;  // [segments]
  int64_t segments;
  // Scattered g_idx (runs shorter than a chunk of packed rows): dequantize per k instead, the group
  // looked up in g_idx [k] (per_k, gptq_cpu_per_k).
  bool per_k;
  const int32_t* g_idx;
  int64_t groups;
  int64_t m, k, n;     // m: the real rows (written); k, n: the weight's in and out features
  const int32_t* qweight;  // [k * bits / 32, n]
  const int32_t* qzeros;   // [groups, n * bits / 32]
  const void* scales;      // [groups, n]
  FloatType scales_type;
  int bits, zero_offset;   // zero_offset 1 for v1 checkpoints (stored z - 1)
  // The bf16 path (CpuIsa::kAvx512Bf16): xparts 1 (bfloat16 x) or 2 (float16 x), 0 for the float32
  // path; x's pairs and the per-segment sums of their 128 * 2^-p * x terms (gptq_cpu_prepare_dp).
  int xparts;
  const uint32_t* xpairs;
  const float* xoff;       // [rows, segments]
  const void* bias;        // [n] or null
  FloatType bias_type;
  const float* addend;     // [m, n] float32 or null: the rank-r term, added before the rounding
  void* y;                 // [m, n]
  FloatType y_type;
};

// Whether `runs` runs of equal g_idx over k values are too short for the per-run factoring (shorter
// on average than one chunk of packed rows: 32 values for 3 bits, 32 / bits otherwise).
inline bool gptq_cpu_per_k(int64_t runs, int64_t k, int bits) {
  return runs * (bits == 3 ? 32 : 32 / bits) > k;
}

// Longest segment: runs of one group longer than this are cut, so that every sum in float32 runs
// over at most this many products before it is added to the output's (two-level summation: a
// single chain over K = 4096 values would lose several bits more than a blocked GEMV).
constexpr int64_t kGptqCpuSegmentMax = 128;

struct GptqCpuRowBlock {
  int64_t row0;
  int rows;  // rows the kernel computes (x is padded up to them)
};
// Row blocks for m rows: each block is one pass over the weight.
std::vector<GptqCpuRowBlock> gptq_cpu_row_blocks(int64_t m, CpuIsa isa);
// Output columns per task for a block of `rows` (tasks are independent: run them in parallel).
int64_t gptq_cpu_tile_cols(int rows, int bits, CpuIsa isa);
// Whether the bf16 path serves this call on `isa`.
inline bool gptq_cpu_uses_dp(CpuIsa isa, FloatType x_type, int bits, bool per_k) {
  return isa == CpuIsa::kAvx512Bf16 && x_type != FloatType::kFloat32 && bits != 8 && !per_k;
}
// The bf16 path's x: xpairs [rows * k / 2 * parts] (per row block: [chunk][pair][part][rows]) and
// xoff [rows, segments], from x [rows, k] (plain, rows padded).
void gptq_cpu_prepare_dp(const float* x, int64_t k, const std::vector<GptqCpuRowBlock>& blocks, int bits, int parts,
                         const int32_t* seg_start, int64_t segments, uint32_t* xpairs, float* xoff);
// Column tiles [tile_begin, tile_end) of one row block.
void gptq_gemv_cpu(const GptqCpuGemv& p, const GptqCpuRowBlock& block, CpuIsa isa, int64_t tile_begin,
                   int64_t tile_end);
// x [rows, k] -> the blocks' interleaved layout (GptqCpuGemv::x).
void gptq_cpu_interleave(const float* x, int64_t k, const std::vector<GptqCpuRowBlock>& blocks, float* out);
// xsum [rows, segments] from x [rows, k] (summed in double).
void gptq_cpu_segment_sums(const float* x, int64_t rows, int64_t k, const int32_t* seg_start, int64_t segments,
                           float* xsum);

// out [n, k] = W for output columns [n_begin, n_end), in out_type (computed in float32, rounded
// once: bit for bit the reference's dequantization).
void gptq_dequantize_cpu(const int32_t* qweight, const int32_t* qzeros, const void* scales, FloatType scales_type,
                         const int32_t* g_idx, int64_t groups, int64_t n, int64_t k, int bits, int zero_offset,
                         void* out, FloatType out_type, int64_t n_begin, int64_t n_end);
constexpr int64_t kGptqCpuDequantizeCols = 64;  // columns per dequantize task

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
