// Device code shared by the one-launch GEMV kernels (lora.cu, gptq.cu): the split reduction and
// LoRA's S = x A^T over a CTA's slice of K. CUDA only; included by .cu files.
//
// Split reduction (the scheme of kernels/_common.py): a GEMV has too few output tiles to fill the
// GPU, so K is cut into slices, one CTA each. Every CTA stores its float32 partial tile in a
// workspace and counts itself in on its tile's counter; the CTA that arrives last sums the
// partials in slice order (the same bits whatever the scheduling), runs the epilogue (rank-r term,
// bias, one rounding to the output dtype), stores y and resets the counter to zero for the next
// launch. One launch: no memset of an accumulator, no cast pass, no float atomics. Where the
// counters come from (a per-stream buffer, or one of its own per launch under CUDA graph capture)
// is bindings_cuda.cpp's split_counters.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "blockwise.h"  // FloatType

namespace lightllm {
namespace split_lora {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float load_float(const void* p, FloatType t, int64_t i) {
  switch (t) {
    case FloatType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case FloatType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_float(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_float(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_float(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// 8 consecutive values as float from element i of p. `count` of them exist (the rest read as 0);
// a full group is one 16-byte load (two for float32): the caller guarantees 16-byte alignment of
// element i whenever count == 8.
__device__ __forceinline__ void load8(const void* p, FloatType t, int64_t i, int count, float (&v)[8]) {
  if (count >= 8) {
    if (t == FloatType::kFloat32) {
      const float4* q = reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
      const float4 a = __ldg(q), b = __ldg(q + 1);
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
      return;
    }
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p) + i));
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float2 f;
      if (t == FloatType::kFloat16) f = __half22float2(*reinterpret_cast<const __half2*>(&w[e]));
      else f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[e]));
      v[2 * e] = f.x;
      v[2 * e + 1] = f.y;
    }
    return;
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = e < count ? load_float(p, t, i + e) : 0.0f;
}

// True in every thread of the CTA that completes its tile (the last of `splits` to arrive).
// Each thread's partial stores are fenced before the barrier; one thread counts the CTA in.
__device__ __forceinline__ bool arrive_last(int* counter, int splits) {
  __shared__ int last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1) == splits - 1;
  __syncthreads();
  if (last) __threadfence();  // acquire: the partials of the other CTAs are read after this
  return last != 0;
}

// s_acc[m * r + j] += sum over kk < count of x_at(m, kk) * A[j, k0 + kk], for m < rows (<= ROWS).
// Warps take rank rows j in turn; lane l covers kk = 8l .. 8l + 7 (count <= 256), so a warp reads
// one contiguous 256-value run of A's row; the per-row sums are warp-shuffle reductions. A's
// elements k0 + 8l must be 16-byte aligned (k0 and K multiples of 8 when A is half precision, of
// 4 when float32). CUDA cores in float32: A's slice is small next to the weight's.
template <int ROWS, typename XAt>
__device__ __forceinline__ void add_s_part(XAt x_at, int rows, const void* a, FloatType a_type, int64_t k_total,
                                           int r, int64_t k0, int count, float* s_acc) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const int kk = lane * 8;
  const int have = count - kk < 0 ? 0 : (count - kk > 8 ? 8 : count - kk);
  for (int j = warp; j < r; j += warps) {
    float av[8];
    load8(a, a_type, static_cast<int64_t>(j) * k_total + k0 + kk, have, av);
#pragma unroll
    for (int m = 0; m < ROWS; ++m) {
      if (m >= rows) break;  // uniform across the CTA
      float p = 0.0f;
#pragma unroll
      for (int e = 0; e < 8; ++e) p = fmaf(x_at(m, kk + e), av[e], p);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) p += __shfl_xor_sync(kFullMask, p, off);
      if (lane == 0) s_acc[m * r + j] += p;
    }
  }
}

// ws_s[(tile * splits + split) * rows * r + e] = s_acc[e]: this CTA's part of S.
__device__ __forceinline__ void store_s_part(const float* s_acc, int rows, int r, float* ws_s, int64_t tile,
                                             int splits, int split) {
  float* dst = ws_s + (tile * splits + split) * rows * r;
  for (int e = threadIdx.x; e < rows * r; e += blockDim.x) dst[e] = s_acc[e];
}

// s_tot[e] = sum over the tile's slices of their parts of S (slice order), into shared memory.
__device__ __forceinline__ void sum_s_parts(const float* ws_s, int rows, int r, int64_t tile, int splits,
                                            float* s_tot) {
  const float* src = ws_s + tile * splits * rows * r;
  for (int e = threadIdx.x; e < rows * r; e += blockDim.x) {
    float t = 0.0f;
    for (int i = 0; i < splits; ++i) t += __ldcg(src + static_cast<int64_t>(i) * rows * r + e);
    s_tot[e] = t;
  }
}

}  // namespace split_lora
}  // namespace lightllm
