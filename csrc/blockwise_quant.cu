// Block-wise 8-bit quantization on CUDA (bitsandbytes semantics; see blockwise.h).
//
// Both kernels are memory-bound (quantize: 4 bytes in, 1 out per fp32 value), so the design
// is about bytes in flight: each thread owns 8 consecutive values (two 16-byte loads of fp32,
// one of fp16/bf16; one 8-byte store of codes), CTAs loop over tiles so the 1 KB search tree is
// built once per CTA, and quantization blocks never straddle CTAs (a CTA tile is a whole number
// of blocks), so absmax needs no inter-CTA communication.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "blockwise.h"
#include "search_tree.h"

namespace lightllm {
namespace {

constexpr int kValuesPerThread = 8;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- loads of 8 consecutive values as float ------------------------------------------------
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void load8(const __half* p, float (&v)[8]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    v[2 * i] = f.x; v[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[8]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    v[2 * i] = f.x; v[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// ---- stores of 8 consecutive values from float (round to nearest even) ----------------------
__device__ __forceinline__ void store8(float* p, const float (&v)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store8(__half* p, const float (&v)[8]) {
  uint4 raw;
  __half2* h = reinterpret_cast<__half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = raw;
}
__device__ __forceinline__ void store8(__nv_bfloat16* p, const float (&v)[8]) {
  uint4 raw;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = raw;
}
__device__ __forceinline__ void from_float(float& o, float v) { o = v; }
__device__ __forceinline__ void from_float(__half& o, float v) { o = __float2half_rn(v); }
__device__ __forceinline__ void from_float(__nv_bfloat16& o, float v) { o = __float2bfloat16_rn(v); }

// ---- quantize -------------------------------------------------------------------------------
// THREADS_PER_BLOCK = blocksize / 8 threads cooperate on one quantization block.
template <typename T, int THREADS_PER_QBLOCK>
__global__ void __launch_bounds__(THREADS_PER_QBLOCK > 256 ? THREADS_PER_QBLOCK : 256)
quantize_blockwise_kernel(const T* __restrict__ x, const float* __restrict__ map,
                          uint8_t* __restrict__ codes, float* __restrict__ absmax, int64_t n,
                          bool vector_ok) {
  __shared__ float tree[256];
  __shared__ float warp_max[32];
  for (int t = threadIdx.x; t < 256; t += blockDim.x)
    tree[t] = t == 0 ? 0.0f : map_midpoint(map, eytzinger_rank(t));
  __syncthreads();

  constexpr int kBlocksize = THREADS_PER_QBLOCK * kValuesPerThread;
  const int64_t tile = static_cast<int64_t>(blockDim.x) * kValuesPerThread;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;

  for (int64_t tile_start = static_cast<int64_t>(blockIdx.x) * tile; tile_start < n;
       tile_start += static_cast<int64_t>(gridDim.x) * tile) {
    const int64_t base = tile_start + static_cast<int64_t>(threadIdx.x) * kValuesPerThread;
    float v[kValuesPerThread];
    if (vector_ok && base + kValuesPerThread <= n) {
      load8(x + base, v);
    } else {
#pragma unroll
      for (int i = 0; i < kValuesPerThread; ++i) v[i] = base + i < n ? to_float(x[base + i]) : 0.0f;
    }

    float m = 0.0f;
#pragma unroll
    for (int i = 0; i < kValuesPerThread; ++i) m = nan_propagating_max(m, fabsf(v[i]));

    // Reduce over the THREADS_PER_QBLOCK threads of this quantization block.
    constexpr int kWarpSpan = THREADS_PER_QBLOCK < 32 ? THREADS_PER_QBLOCK : 32;
#pragma unroll
    for (int offset = kWarpSpan / 2; offset > 0; offset /= 2)
      m = nan_propagating_max(m, __shfl_xor_sync(kFullMask, m, offset));
    if constexpr (THREADS_PER_QBLOCK > 32) {
      constexpr int kWarpsPerQblock = THREADS_PER_QBLOCK / 32;
      __syncthreads();  // warp_max is reused across tiles
      if (lane == 0) warp_max[warp] = m;
      __syncthreads();
      const int first = (warp / kWarpsPerQblock) * kWarpsPerQblock;
      m = warp_max[first];
#pragma unroll
      for (int w = 1; w < kWarpsPerQblock; ++w) m = nan_propagating_max(m, warp_max[first + w]);
    }

    const int64_t qblock = base / kBlocksize;
    if (threadIdx.x % THREADS_PER_QBLOCK == 0 && base < n) absmax[qblock] = m;
    const float inv = m == 0.0f ? 0.0f : 1.0f / m;  // IEEE division (no fast-math)

    // The walk keeps the node's byte offset (4 * t) rather than its index: the shared-memory load
    // then needs no shift, 4 instructions a level instead of 6, and the loop is issue-bound.
    const char* tree_bytes = reinterpret_cast<const char*>(tree);
    uint8_t c[kValuesPerThread];
#pragma unroll
    for (int i = 0; i < kValuesPerThread; ++i) {
      const float q = __fmul_rn(v[i], inv);  // _rn: never contracted into an FMA
      unsigned offset = 4;  // node 1
#pragma unroll
      for (int level = 0; level < 8; ++level)
        offset = 2 * offset + (*reinterpret_cast<const float*>(tree_bytes + offset) < q ? 4u : 0u);
      c[i] = static_cast<uint8_t>((offset >> 2) - 256);
    }
    if (vector_ok && base + kValuesPerThread <= n) {
      uint2 packed;
      packed.x = c[0] | (c[1] << 8) | (c[2] << 16) | (static_cast<unsigned>(c[3]) << 24);
      packed.y = c[4] | (c[5] << 8) | (c[6] << 16) | (static_cast<unsigned>(c[7]) << 24);
      *reinterpret_cast<uint2*>(codes + base) = packed;
    } else {
#pragma unroll
      for (int i = 0; i < kValuesPerThread; ++i)
        if (base + i < n) codes[base + i] = c[i];
    }
  }
}

// ---- dequantize -----------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(256)
dequantize_blockwise_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ absmax,
                            const float* __restrict__ map, T* __restrict__ out, int64_t n,
                            int blocksize_log2, bool vector_ok) {
  __shared__ float table[256];
  for (int t = threadIdx.x; t < 256; t += blockDim.x) table[t] = map[t];
  __syncthreads();

  const int64_t tile = static_cast<int64_t>(blockDim.x) * kValuesPerThread;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * tile + static_cast<int64_t>(threadIdx.x) * kValuesPerThread;
       base < n; base += static_cast<int64_t>(gridDim.x) * tile) {
    // blocksize >= 64 and base % 8 == 0: a thread's 8 values share one block.
    const float a = __ldg(absmax + (base >> blocksize_log2));
    if (vector_ok && base + kValuesPerThread <= n) {
      const uint2 packed = __ldg(reinterpret_cast<const uint2*>(codes + base));
      float v[kValuesPerThread];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        v[i] = __fmul_rn(table[(packed.x >> (8 * i)) & 0xff], a);
        v[4 + i] = __fmul_rn(table[(packed.y >> (8 * i)) & 0xff], a);
      }
      store8(out + base, v);
    } else {
      for (int i = 0; i < kValuesPerThread && base + i < n; ++i) from_float(out[base + i], __fmul_rn(table[codes[base + i]], a));
    }
  }
}

int resident_ctas(int threads) {
  // Grid-stride launch sized to fill the card a few times over; SM count cached per device.
  constexpr int kCachedDevices = 64;
  static std::atomic<int> sm_count[kCachedDevices] = {};
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  if (device >= 0 && device < kCachedDevices) sms = sm_count[device].load(std::memory_order_relaxed);
  if (sms == 0) {
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (device >= 0 && device < kCachedDevices) sm_count[device].store(sms, std::memory_order_relaxed);
  }
  return sms * (2048 / threads);
}

int grid_for(int64_t n, int threads) {
  const int64_t tiles = (n + static_cast<int64_t>(threads) * kValuesPerThread - 1) / (static_cast<int64_t>(threads) * kValuesPerThread);
  const int64_t cap = static_cast<int64_t>(resident_ctas(threads)) * 4;
  return static_cast<int>(tiles < cap ? tiles : cap);
}

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename T>
int launch_quantize_typed(const T* x, const float* map, uint8_t* codes, float* absmax, int64_t n,
                          int64_t blocksize, cudaStream_t stream) {
  const bool vector_ok = aligned(x, 16) && aligned(codes, 8);
  const int threads_per_qblock = static_cast<int>(blocksize / kValuesPerThread);
  const int threads = threads_per_qblock > 256 ? threads_per_qblock : 256;
  const int grid = grid_for(n, threads);
  switch (threads_per_qblock) {
#define LIGHTLLM_CASE(TPQ) \
  case TPQ: quantize_blockwise_kernel<T, TPQ><<<grid, threads, 0, stream>>>(x, map, codes, absmax, n, vector_ok); break;
    LIGHTLLM_CASE(8) LIGHTLLM_CASE(16) LIGHTLLM_CASE(32) LIGHTLLM_CASE(64)
    LIGHTLLM_CASE(128) LIGHTLLM_CASE(256) LIGHTLLM_CASE(512)
#undef LIGHTLLM_CASE
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_dequantize_typed(const uint8_t* codes, const float* absmax, const float* map, T* out,
                            int64_t n, int64_t blocksize, cudaStream_t stream) {
  const bool vector_ok = aligned(codes, 8) && aligned(out, 16);
  int log2 = 0;
  while ((int64_t{1} << log2) < blocksize) ++log2;
  dequantize_blockwise_kernel<T><<<grid_for(n, 256), 256, 0, stream>>>(codes, absmax, map, out, n, log2, vector_ok);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int launch_quantize_blockwise(const void* x, FloatType x_type, const float* map, uint8_t* codes,
                              float* absmax, int64_t n, int64_t blocksize, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (x_type) {
    case FloatType::kFloat16: return launch_quantize_typed(static_cast<const __half*>(x), map, codes, absmax, n, blocksize, s);
    case FloatType::kBFloat16: return launch_quantize_typed(static_cast<const __nv_bfloat16*>(x), map, codes, absmax, n, blocksize, s);
    default: return launch_quantize_typed(static_cast<const float*>(x), map, codes, absmax, n, blocksize, s);
  }
}

int launch_dequantize_blockwise(const uint8_t* codes, const float* absmax, const float* map,
                                void* out, FloatType out_type, int64_t n, int64_t blocksize,
                                void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (out_type) {
    case FloatType::kFloat16: return launch_dequantize_typed(codes, absmax, map, static_cast<__half*>(out), n, blocksize, s);
    case FloatType::kBFloat16: return launch_dequantize_typed(codes, absmax, map, static_cast<__nv_bfloat16*>(out), n, blocksize, s);
    default: return launch_dequantize_typed(codes, absmax, map, static_cast<float*>(out), n, blocksize, s);
  }
}

const char* cuda_error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

}  // namespace lightllm
