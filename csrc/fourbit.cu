// bitsandbytes' 4-bit NF4 / FP4 weights on CUDA (format: lightllm/ops/fourbit.py): a GEMV for up to
// 16 rows of x that reads the packed weight once, and a dequantize kernel (the large-M path runs it
// and then cuBLAS, from bindings_cuda.cpp; so does the backward pass).
//
// The GEMV: a warp per 4 output rows (2 from 8 rows of x up), 8 warps per CTA. Each lane loads 16
// bytes of a weight row (32 codes) per step with one 128-bit load, so a warp reads 512 contiguous
// bytes of each of its rows; K must be a multiple of 32 (the rows then start on 16-byte
// boundaries, and a lane's 32 codes lie in one quantization block: blocksizes are multiples of
// 32), other K go to the dequantize path. The 16-value table sits in shared memory (16 banks, no
// conflicts); each lane scales its codes by the block's absmax (decoded here from the uint8 codes
// when double-quantized, with separate multiply and add: QuantState.float_absmax's bits), reads x
// straight from global memory (L1-resident: every warp of the CTA reads the same slice) and
// accumulates in float32. The lanes' sums meet in a shuffle reduction; K slices over CTAs where the
// output has too few rows to fill the GPU, and the slices meet in the split reduction
// (split_lora.cuh): the last CTA of a row tile adds the bias and rounds once to x's dtype. Not yet
// run on a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fourbit.h"
#include "split_lora.cuh"

namespace lightllm {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kLaneValues = 32;                   // codes per 16-byte load
constexpr int kWarpValues = 32 * kLaneValues;     // values of K per warp step

template <int ROWS>
constexpr int rows_per_warp() {
  return ROWS <= 4 ? 4 : 2;
}

__device__ __forceinline__ float block_scale(const FourBitScales& s, int64_t block) {
  if (s.nested_absmax == nullptr) return __ldg(static_cast<const float*>(s.absmax) + block);
  const int c = __ldg(static_cast<const uint8_t*>(s.absmax) + block);
  return __fadd_rn(__fmul_rn(__ldg(s.nested_code + c), __ldg(s.nested_absmax + block / s.nested_blocksize)),
                   __ldg(s.nested_offset));
}

__device__ __forceinline__ void store_y(void* y, FloatType t, int64_t at, float v) {
  switch (t) {
    case FloatType::kFloat16: split_lora::store_float(static_cast<__half*>(y) + at, v); break;
    case FloatType::kBFloat16: split_lora::store_float(static_cast<__nv_bfloat16*>(y) + at, v); break;
    default: split_lora::store_float(static_cast<float*>(y) + at, v); break;
  }
}

template <int ROWS>
__global__ void __launch_bounds__(kThreads, 1) fourbit_gemv_kernel(FourBitGemvParams p) {
  constexpr int RW = rows_per_warp<ROWS>();
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = p.code[threadIdx.x];
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rows = static_cast<int>(p.m);
  const int64_t k = p.k, n_total = p.n;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * (kWarps * RW) + warp * RW;
  const int split = blockIdx.y, splits = gridDim.y;
  const int64_t steps = (k + kWarpValues - 1) / kWarpValues;
  const int64_t per_split = (steps + splits - 1) / splits;
  const int64_t k0 = split * per_split * kWarpValues;
  const int64_t k1 = k0 + per_split * kWarpValues < k ? k0 + per_split * kWarpValues : k;

  float acc[ROWS][RW] = {};
  for (int64_t kb = k0 + lane * kLaneValues; kb < k1; kb += kWarpValues) {
    uint4 q[RW];
    float scale[RW];
#pragma unroll
    for (int r = 0; r < RW; ++r) {
      const int64_t n = n0 + r;
      if (n < n_total) {
        const int64_t flat = n * k + kb;
        q[r] = __ldg(reinterpret_cast<const uint4*>(p.packed + flat / 2));
        scale[r] = block_scale(p.scales, flat / p.blocksize);
      } else {
        q[r] = make_uint4(0, 0, 0, 0);
        scale[r] = 0.0f;
      }
    }
#pragma unroll
    for (int word = 0; word < 4; ++word) {  // 8 codes per 32-bit word, the first in the high nibble of byte 0
      float w[RW][8];
#pragma unroll
      for (int r = 0; r < RW; ++r) {
        const uint32_t u = word == 0 ? q[r].x : word == 1 ? q[r].y : word == 2 ? q[r].z : q[r].w;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const uint32_t byte = (u >> (8 * b)) & 0xFFu;
          w[r][2 * b] = table[byte >> 4] * scale[r];
          w[r][2 * b + 1] = table[byte & 0xFu] * scale[r];
        }
      }
#pragma unroll
      for (int m = 0; m < ROWS; ++m) {
        if (m >= rows) break;
        float xv[8];
        split_lora::load8(p.x, p.x_type, m * k + kb + 8 * word, 8, xv);
#pragma unroll
        for (int r = 0; r < RW; ++r)
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[m][r] = fmaf(xv[e], w[r][e], acc[m][r]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < ROWS; ++m)
#pragma unroll
    for (int r = 0; r < RW; ++r)
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) acc[m][r] += __shfl_xor_sync(0xFFFFFFFFu, acc[m][r], offset);

  if (splits == 1) {
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < RW; ++r) {
        const int64_t n = n0 + r;
        if (n >= n_total) break;
        const float bias = p.bias != nullptr ? p.bias[n] : 0.0f;
#pragma unroll
        for (int m = 0; m < ROWS; ++m)
          if (m < rows) store_y(p.y, p.x_type, m * n_total + n, acc[m][r] + bias);
      }
    }
    return;
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < RW; ++r) {
      const int64_t n = n0 + r;
      if (n >= n_total) break;
#pragma unroll
      for (int m = 0; m < ROWS; ++m)
        if (m < rows) p.ws[(static_cast<int64_t>(split) * rows + m) * n_total + n] = acc[m][r];
    }
  }
  if (!split_lora::arrive_last(p.counters + blockIdx.x, splits)) return;
  // The tile's kWarps * RW rows, each (row, m) summed over the slices in slice order by one thread.
  const int64_t tile0 = static_cast<int64_t>(blockIdx.x) * (kWarps * RW);
  for (int e = threadIdx.x; e < kWarps * RW * rows; e += kThreads) {
    const int64_t n = tile0 + e / rows;
    const int m = e % rows;
    if (n >= n_total) continue;
    float total = 0.0f;
    for (int i = 0; i < splits; ++i) total += __ldcg(p.ws + (static_cast<int64_t>(i) * rows + m) * n_total + n);
    store_y(p.y, p.x_type, m * n_total + n, total + (p.bias != nullptr ? p.bias[n] : 0.0f));
  }
  if (threadIdx.x == 0) p.counters[blockIdx.x] = 0;  // every CTA of this tile has arrived
}

template <int ROWS>
int gemv_rows(const FourBitGemvParams& p, cudaStream_t stream) {
  const int64_t per_cta = kWarps * rows_per_warp<ROWS>();
  const dim3 grid(static_cast<unsigned>((p.n + per_cta - 1) / per_cta), static_cast<unsigned>(p.splits));
  fourbit_gemv_kernel<ROWS><<<grid, kThreads, 0, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

// One thread per 8 bytes (16 values, all in one quantization block).
template <typename TO>
__global__ void __launch_bounds__(256)
fourbit_dequantize_kernel(const uint8_t* __restrict__ packed, FourBitScales s, const float* __restrict__ code,
                          int64_t blocksize, int64_t n, TO* __restrict__ out) {
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  const int64_t v0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 16;
  if (v0 >= n) return;
  const float scale = block_scale(s, v0 / blocksize);
  const int64_t b0 = v0 / 2;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t v = v0 + 2 * i;
    if (v >= n) break;
    const uint32_t byte = __ldg(packed + b0 + i);
    split_lora::store_float(out + v, __fmul_rn(table[byte >> 4], scale));
    if (v + 1 < n) split_lora::store_float(out + v + 1, __fmul_rn(table[byte & 0xFu], scale));
  }
}

template <typename TO>
int dequantize_typed(const uint8_t* packed, const FourBitScales& s, const float* code, int64_t blocksize, int64_t n,
                     TO* out, cudaStream_t stream) {
  const int64_t threads = (n + 15) / 16;
  fourbit_dequantize_kernel<TO><<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(packed, s, code,
                                                                                                  blocksize, n, out);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int64_t fourbit_gemv_rows_per_cta(int64_t m) { return kWarps * (m <= 4 ? 4 : 2); }

int fourbit_gemv_splits(int64_t m, int64_t n, int64_t k, int sm_count) {
  const int64_t tiles = (n + fourbit_gemv_rows_per_cta(m) - 1) / fourbit_gemv_rows_per_cta(m);
  const int64_t steps = (k + kWarpValues - 1) / kWarpValues;
  if (steps == 0) return 1;  // K = 0: nothing to split (and no division by zero below)
  int64_t wanted = (2 * static_cast<int64_t>(sm_count) + tiles - 1) / (tiles > 0 ? tiles : 1);
  if (wanted > steps) wanted = steps;
  if (wanted < 1) wanted = 1;
  const int64_t per = (steps + wanted - 1) / wanted;  // no empty slices
  return static_cast<int>((steps + per - 1) / per);
}

int launch_fourbit_gemv(const FourBitGemvParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (p.m <= 1) return gemv_rows<1>(p, s);
  if (p.m <= 2) return gemv_rows<2>(p, s);
  if (p.m <= 4) return gemv_rows<4>(p, s);
  if (p.m <= 8) return gemv_rows<8>(p, s);
  if (p.m <= 16) return gemv_rows<16>(p, s);
  return static_cast<int>(cudaErrorInvalidValue);
}

int launch_fourbit_dequantize(const uint8_t* packed, const FourBitScales& scales, const float* code, int64_t blocksize,
                              int64_t n, void* out, FloatType out_type, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (out_type) {
    case FloatType::kFloat16: return dequantize_typed(packed, scales, code, blocksize, n, static_cast<__half*>(out), s);
    case FloatType::kBFloat16:
      return dequantize_typed(packed, scales, code, blocksize, n, static_cast<__nv_bfloat16*>(out), s);
    default: return dequantize_typed(packed, scales, code, blocksize, n, static_cast<float*>(out), s);
  }
}

}  // namespace lightllm
