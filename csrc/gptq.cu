// GPTQ dequant-matmul on CUDA: a small-M GEMV that reads the checkpoint layout directly, and a
// dequantize kernel for large M (dequantize once, then cuBLAS) and for the backward pass.
//
// Decoding is the same for every bit width: along the packed axis, a run of CHUNK values fills
// CHUNK_WORDS int32 words as one little-endian bit stream (value j at bit BITS * j), so with j
// unrolled every shift is a compile-time constant; only 3-bit values can straddle two words.
//
// The GEMV: four adjacent columns per thread (16-byte loads; a warp reads 512 contiguous bytes
// per packed row, four runs loaded before any is used), x for the CTA's K slice staged in shared
// memory as float, the group's scales and zeros reloaded only when the group changes (uniform
// across the CTA), the number of rows a template parameter, and float32 arithmetic throughout: W
// is the reference's float32 weight exactly (the reference then rounds it to x's dtype, the GEMV
// does not). The K slices meet in the split reduction (split_lora.cuh): the last CTA of a column
// tile adds LoRA's rank-r term (S given, or x A^T summed from the slices' parts) and the bias
// and stores y in x's dtype, so the whole layer is one launch. Not yet measured on a GPU; the
// magic-number conversion and tensor cores for M > 8 are the next steps once a profiler can say
// what limits it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "gptq.h"
#include "split_lora.cuh"

namespace lightllm {
namespace {

constexpr int kThreads = 128;  // threads per CTA
constexpr int kCols = 4;       // adjacent output columns per thread (one 16-byte load of packed words)
constexpr int kSlice = static_cast<int>(kGptqGemvSlice);  // K values per CTA (a multiple of every
                               // chunk: 16, 32, 8, 4), so that a 4096-wide layer still makes
                               // 8 x 16 = 128 CTAs at K = 4096
static_assert(kGptqGemvTileN == kThreads * kCols, "a column tile is one CTA's columns");

template <int BITS>
struct Packing {
  static constexpr int kChunk = BITS == 3 ? 32 : 32 / BITS;  // values per run of whole words
  static constexpr int kWords = kChunk * BITS / 32;
  static constexpr uint32_t kMask = (1u << BITS) - 1;

  // Value j of a run held in words[0 .. kWords).
  template <int J>
  __device__ __forceinline__ static uint32_t value(const uint32_t (&words)[kWords]) {
    constexpr int bit = BITS * J, word = bit / 32, shift = bit % 32;
    uint32_t v = words[word] >> shift;
    if constexpr (shift + BITS > 32) v |= words[word + 1] << (32 - shift);
    return v & kMask;
  }

  // The packed value of column (or row) `index` along a packed axis, from a row of words.
  __device__ __forceinline__ static uint32_t value_at(const int32_t* row, int64_t index) {
    const int bit = BITS * static_cast<int>(index % kChunk);
    const int64_t word = (index / kChunk) * kWords + bit / 32;
    const int shift = bit % 32;
    uint32_t v = static_cast<uint32_t>(__ldg(row + word)) >> shift;
    if (shift + BITS > 32) v |= static_cast<uint32_t>(__ldg(row + word + 1)) << (32 - shift);
    return v & kMask;
  }
};

using split_lora::load_float;
using split_lora::store_float;

// Scale and zero of group g for column n, as float (zero includes the v1 offset).
template <int BITS>
__device__ __forceinline__ void group_params(const int32_t* qzeros, const void* scales, FloatType scales_type,
                                             int64_t n_total, int64_t n, int g, int zero_offset, float& s, float& z) {
  s = load_float(scales, scales_type, static_cast<int64_t>(g) * n_total + n);
  const int32_t* zrow = qzeros + static_cast<int64_t>(g) * (n_total * BITS / 32);
  z = static_cast<float>(static_cast<int>(Packing<BITS>::value_at(zrow, n)) + zero_offset);
}

// Each thread owns kCols adjacent output columns: one 16-byte load brings a packed word of each, so
// a warp reads 512 contiguous bytes per packed row. ROWS (1, 2, 4 or 8) bounds the rows of x; rows
// beyond the real ones are zeros in shared memory, so the inner loops carry no predicates. The CTA
// then stores its partial, and the last CTA of its column tile finishes (split reduction).
template <int BITS, int ROWS>
__global__ void __launch_bounds__(kThreads) gptq_gemv_kernel(GptqGemvParams p) {
  using P = Packing<BITS>;
  __shared__ float xs[ROWS][kSlice];
  __shared__ int groups[kSlice];
  extern __shared__ float s_acc[];  // [rows][r]: this slice's part of S = x A^T, then the tile's S

  const int rows = static_cast<int>(p.m), r = p.r;
  const int64_t k_total = p.k, n_total = p.n;
  const int tile = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int64_t k0 = static_cast<int64_t>(split) * kSlice;
  const int64_t k1 = k0 + kSlice < k_total ? k0 + kSlice : k_total;
  for (int i = threadIdx.x; i < kSlice; i += kThreads) {
    const int64_t k = k0 + i;
    groups[i] = k < k1 ? __ldg(p.g_idx + k) : 0;
#pragma unroll
    for (int m = 0; m < ROWS; ++m)
      xs[m][i] = (m < rows && k < k1) ? load_float(p.x, p.x_type, m * k_total + k) : 0.0f;
  }
  const bool s_here = p.lora_a != nullptr && p.lora_s == nullptr;  // S from the slices' parts
  if (s_here)
    for (int e = threadIdx.x; e < rows * r; e += kThreads) s_acc[e] = 0.0f;
  __syncthreads();
  if (s_here)
    split_lora::add_s_part<ROWS>([&](int m, int kk) { return xs[m][kk]; }, rows, p.lora_a, p.a_type, k_total, r, k0,
                                 static_cast<int>(k1 - k0), s_acc);

  // N is a multiple of kCols (packing); threads past it do no loads but join the barriers below.
  const int64_t n = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kCols;
  const bool active = n < n_total;

  float acc[ROWS][kCols] = {};
  int current_group = -1;
  float s[kCols] = {}, z[kCols] = {};
  // K is a multiple of the chunk (the packed layout's requirement), and so is every slice start.
  // Runs are taken kBatch at a time, all their words loaded before any is decoded, so that
  // kBatch * kWords 16-byte loads are in flight per thread.
  constexpr int kBatch = 2;
  for (int64_t c0 = k0; active && c0 < k1; c0 += kBatch * P::kChunk) {
    uint4 words[kBatch][P::kWords];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int64_t row = (c0 / P::kChunk + b) * P::kWords;
#pragma unroll
      for (int w = 0; w < P::kWords; ++w)
        words[b][w] = c0 + b * P::kChunk < k1 ? __ldg(reinterpret_cast<const uint4*>(p.qweight + (row + w) * n_total + n))
                                              : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      if (c0 + b * P::kChunk >= k1) break;
      const int local = static_cast<int>(c0 - k0) + b * P::kChunk;
      // Each run is summed on its own, then added: shorter float32 chains than one per slice.
      float run[ROWS][kCols] = {};
      [&]<int... J>(std::integer_sequence<int, J...>) {
        (([&] {
           const int g = groups[local + J];
           if (g != current_group) {  // the same for every thread of the CTA: no divergence
             current_group = g;
#pragma unroll
             for (int c = 0; c < kCols; ++c)
               group_params<BITS>(p.qzeros, p.scales, p.scales_type, n_total, n + c, g, p.zero_offset, s[c], z[c]);
           }
#pragma unroll
           for (int c = 0; c < kCols; ++c) {
             uint32_t cw[P::kWords];
#pragma unroll
             for (int w = 0; w < P::kWords; ++w) cw[w] = reinterpret_cast<const uint32_t*>(&words[b][w])[c];
             const float wv = __fmul_rn(__fsub_rn(static_cast<float>(P::template value<J>(cw)), z[c]), s[c]);
#pragma unroll
             for (int m = 0; m < ROWS; ++m) run[m][c] = fmaf(xs[m][local + J], wv, run[m][c]);
           }
         }()),
         ...);
      }(std::make_integer_sequence<int, P::kChunk>{});
#pragma unroll
      for (int m = 0; m < ROWS; ++m)
#pragma unroll
        for (int c = 0; c < kCols; ++c) acc[m][c] += run[m][c];
    }
  }

  if (active)
#pragma unroll
    for (int m = 0; m < ROWS; ++m)
      if (m < rows)
        *reinterpret_cast<float4*>(p.ws_y + (static_cast<int64_t>(split) * rows + m) * n_total + n) =
            make_float4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
  if (s_here) {
    __syncthreads();  // s_acc was written by lane 0 of each warp
    split_lora::store_s_part(s_acc, rows, r, p.ws_s, tile, splits, split);
  }

  if (!split_lora::arrive_last(p.counters + tile, splits)) return;

  const float* s_tile = p.lora_s;  // [rows][r]
  if (s_here) {
    split_lora::sum_s_parts(p.ws_s, rows, r, tile, splits, s_acc);
    __syncthreads();
    s_tile = s_acc;
  }
  if (active) {
    float out[ROWS][kCols] = {};
#pragma unroll
    for (int m = 0; m < ROWS; ++m) {
      if (m >= rows) break;
      for (int i = 0; i < splits; ++i) {
        const float4 v = __ldcg(reinterpret_cast<const float4*>(p.ws_y + (static_cast<int64_t>(i) * rows + m) * n_total + n));
        out[m][0] += v.x; out[m][1] += v.y; out[m][2] += v.z; out[m][3] += v.w;
      }
    }
    if (s_tile != nullptr && p.lora_b != nullptr) {
      for (int j = 0; j < r; ++j) {
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          const float bj = p.scale * load_float(p.lora_b, p.b_type, (n + c) * r + j);
#pragma unroll
          for (int m = 0; m < ROWS; ++m)
            if (m < rows) out[m][c] = fmaf(s_tile[m * r + j], bj, out[m][c]);
        }
      }
    }
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const float bias = p.bias != nullptr ? load_float(p.bias, p.bias_type, n + c) : 0.0f;
#pragma unroll
      for (int m = 0; m < ROWS; ++m) {
        if (m >= rows) break;
        const int64_t at = m * n_total + n + c;
        switch (p.x_type) {
          case FloatType::kFloat16: store_float(static_cast<__half*>(p.y) + at, out[m][c] + bias); break;
          case FloatType::kBFloat16: store_float(static_cast<__nv_bfloat16*>(p.y) + at, out[m][c] + bias); break;
          default: store_float(static_cast<float*>(p.y) + at, out[m][c] + bias); break;
        }
      }
    }
  }
  if (threadIdx.x == 0) p.counters[tile] = 0;  // every CTA of this tile has arrived
}

// One thread per (run of K values, column): decodes a run and writes it along K.
template <int BITS, typename TO>
__global__ void __launch_bounds__(256)
gptq_dequantize_kernel(const int32_t* __restrict__ qweight, const int32_t* __restrict__ qzeros,
                       const void* __restrict__ scales, FloatType scales_type, const int32_t* __restrict__ g_idx,
                       int64_t n_total, int64_t k_total, int zero_offset, TO* __restrict__ out) {
  using P = Packing<BITS>;
  const int64_t n = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * P::kChunk;
  if (n >= n_total || c >= k_total) return;
  uint32_t words[P::kWords];
  const int64_t row = (c / P::kChunk) * P::kWords;
#pragma unroll
  for (int w = 0; w < P::kWords; ++w) words[w] = static_cast<uint32_t>(__ldg(qweight + (row + w) * n_total + n));
  int current_group = -1;
  float s = 0.0f, z = 0.0f;
  TO* dst = out + n * k_total + c;
  [&]<int... J>(std::integer_sequence<int, J...>) {
    (([&] {
       const int g = __ldg(g_idx + c + J);
       if (g != current_group) {
         current_group = g;
         group_params<BITS>(qzeros, scales, scales_type, n_total, n, g, zero_offset, s, z);
       }
       store_float(dst + J, __fmul_rn(__fsub_rn(static_cast<float>(P::template value<J>(words)), z), s));
     }()),
     ...);
  }(std::make_integer_sequence<int, P::kChunk>{});
}

template <int BITS>
int gemv_bits(const GptqGemvParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(gptq_gemv_tiles(p.n)), static_cast<unsigned>(gptq_gemv_splits(p.k)));
  const size_t smem = p.lora_a != nullptr && p.lora_s == nullptr ? static_cast<size_t>(p.m) * p.r * sizeof(float) : 0;
  // The dynamic [rows][r] part of S beside at most 9.1 KB static: ranks above ~1000 need the opt-in.
#define LIGHTLLM_GEMV(R)                                                                                        \
  do {                                                                                                          \
    if (smem > 32 * 1024) {                                                                                     \
      const cudaError_t e = cudaFuncSetAttribute(gptq_gemv_kernel<BITS, R>,                                    \
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)); \
      if (e != cudaSuccess) return static_cast<int>(e);                                                         \
    }                                                                                                           \
    gptq_gemv_kernel<BITS, R><<<grid, kThreads, smem, stream>>>(p);                                             \
  } while (0)
  if (p.m <= 1) LIGHTLLM_GEMV(1);
  else if (p.m <= 2) LIGHTLLM_GEMV(2);
  else if (p.m <= 4) LIGHTLLM_GEMV(4);
  else if (p.m <= 8) LIGHTLLM_GEMV(8);
  else return static_cast<int>(cudaErrorInvalidValue);
#undef LIGHTLLM_GEMV
  return static_cast<int>(cudaGetLastError());
}

template <int BITS, typename TO>
int dequantize_typed(const int32_t* qweight, const int32_t* qzeros, const void* scales, FloatType scales_type,
                     const int32_t* g_idx, int64_t n, int64_t k, int zero_offset, TO* out, cudaStream_t stream) {
  // Runs of K on x (up to 2^31 - 1 blocks), columns on y (N / 256 stays far below 65535).
  const dim3 grid(static_cast<unsigned>(k / Packing<BITS>::kChunk), static_cast<unsigned>((n + 255) / 256));
  gptq_dequantize_kernel<BITS, TO><<<grid, 256, 0, stream>>>(qweight, qzeros, scales, scales_type, g_idx, n, k,
                                                              zero_offset, out);
  return static_cast<int>(cudaGetLastError());
}

template <int BITS>
int dequantize_bits(const int32_t* qweight, const int32_t* qzeros, const void* scales, FloatType scales_type,
                    const int32_t* g_idx, int64_t n, int64_t k, int zero_offset, void* out, FloatType out_type,
                    cudaStream_t stream) {
  switch (out_type) {
    case FloatType::kFloat16:
      return dequantize_typed<BITS>(qweight, qzeros, scales, scales_type, g_idx, n, k, zero_offset, static_cast<__half*>(out), stream);
    case FloatType::kBFloat16:
      return dequantize_typed<BITS>(qweight, qzeros, scales, scales_type, g_idx, n, k, zero_offset, static_cast<__nv_bfloat16*>(out), stream);
    default:
      return dequantize_typed<BITS>(qweight, qzeros, scales, scales_type, g_idx, n, k, zero_offset, static_cast<float*>(out), stream);
  }
}

}  // namespace

int launch_gptq_gemv(const GptqGemvParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.bits) {
    case 2: return gemv_bits<2>(p, s);
    case 3: return gemv_bits<3>(p, s);
    case 4: return gemv_bits<4>(p, s);
    case 8: return gemv_bits<8>(p, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

int launch_gptq_dequantize(const int32_t* qweight, const int32_t* qzeros, const void* scales,
                           FloatType scales_type, const int32_t* g_idx, int64_t n, int64_t k, int bits,
                           int zero_offset, void* out, FloatType out_type, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (bits) {
    case 2: return dequantize_bits<2>(qweight, qzeros, scales, scales_type, g_idx, n, k, zero_offset, out, out_type, s);
    case 3: return dequantize_bits<3>(qweight, qzeros, scales, scales_type, g_idx, n, k, zero_offset, out, out_type, s);
    case 4: return dequantize_bits<4>(qweight, qzeros, scales, scales_type, g_idx, n, k, zero_offset, out, out_type, s);
    case 8: return dequantize_bits<8>(qweight, qzeros, scales, scales_type, g_idx, n, k, zero_offset, out, out_type, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace lightllm
