// LoRA decode on CUDA: y = x W^T + bias + scale * (x A^T) B^T for up to 16 tokens, one launch.
//
// Memory-bound: the whole cost is reading W once, so the kernel is a GEMV that streams W with one
// 16-byte load per lane per row and step, several rows in flight. The products run on tensor
// cores (mma.sync m16n8k16, x as the 16-row A operand, zero rows beyond the tokens) with a
// permuted K order: lane (g, c) loads W[n0 + g][k + 8c .. k + 8c + 7] and that one load *is* its
// B fragment for two MMAs (logical k slots {2c, 2c+1, 2c+8, 2c+9} of MMA 0 are physical
// 8c + {0, 1, 2, 3}, of MMA 1 physical 8c + {4, 5, 6, 7}). A dot product does not care about the
// order of k, so the A fragments (x, staged in shared memory) just follow the same permutation:
// no shuffles, no shared memory for W, no conversion instructions.
//
// A CTA owns 256 rows of W (8 warps x 4 groups of 8) and a slice of K; x's slice is staged in
// shared memory 256 values at a time. Over the same slice it adds up its part of S = x A^T
// (float32, CUDA cores; see split_lora.cuh) - every column tile does so, reading A's slice from L2,
// which is why the tiles are 256 rows wide. The CTA completing a tile (split reduction) sums the
// partials, adds scale * S B^T and the bias, rounds once and stores y; column tile 0 stores S.
// Not yet measured on a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "lora.h"
#include "split_lora.cuh"

namespace lightllm {
namespace {

using split_lora::arrive_last;
using split_lora::load_float;
using split_lora::store_float;

constexpr int kThreads = 256;
constexpr int kRows = 16;                                   // x rows = the MMA's M
constexpr int kTileN = static_cast<int>(kLoraDecodeTileN);  // 8 warps x 32 rows of W
constexpr int kChunk = static_cast<int>(kLoraDecodeChunk);
constexpr int kPad = 32;  // halves of padding per staged x row: rows g and g + 1 land 16 banks apart

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ float half_to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float half_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) lora_decode_kernel(LoraDecodeParams p) {
  __shared__ __align__(16) T xs[kRows][kChunk + kPad];
  __shared__ __align__(16) float part[kRows][kTileN + 8];  // padded: the fragment stores spread over banks
  extern __shared__ float s_acc[];  // [rows][r]: this CTA's part of S, then the tile's S

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
  const int tile = blockIdx.x, split = blockIdx.y;
  const int rows = static_cast<int>(p.m), r = p.r;
  const int64_t n0 = static_cast<int64_t>(tile) * kTileN;
  const int64_t k_begin = static_cast<int64_t>(split) * p.k_per_split;
  const int64_t k_end = k_begin + p.k_per_split < p.k ? k_begin + p.k_per_split : p.k;
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);

  for (int e = tid; e < rows * r; e += kThreads) s_acc[e] = 0.0f;
  float acc[4][4] = {};  // 4 groups of 8 W rows; C fragment (g, 2c), (g, 2c+1), (g+8, 2c), (g+8, 2c+1)

  for (int64_t kc = k_begin; kc < k_end; kc += kChunk) {
    const int count = static_cast<int>(k_end - kc < kChunk ? k_end - kc : kChunk);  // a multiple of 8
    __syncthreads();  // the previous chunk's readers are done with xs
    for (int i = tid; i < kRows * (kChunk / 8); i += kThreads) {
      const int m = i / (kChunk / 8), v = (i % (kChunk / 8)) * 8;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (m < rows && v < count) val = __ldg(reinterpret_cast<const uint4*>(x + m * p.k + kc + v));
      *reinterpret_cast<uint4*>(&xs[m][v]) = val;
    }
    __syncthreads();
    if (r > 0) {
      split_lora::add_s_part<kRows>([&](int m, int kk) { return half_to_float(xs[m][kk]); }, rows, p.a, p.a_type,
                                    p.k, r, kc, count, s_acc);
    }
    // Two k-steps of 32 per iteration: eight 16-byte loads of W in flight per lane.
    for (int ks = 0; ks < count; ks += 64) {
      uint4 wv[2][4];
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int64_t n = n0 + warp * 32 + q * 8 + g;
          const int kk = ks + h * 32 + 8 * c;
          wv[h][q] = (n < p.n && kk < count) ? __ldg(reinterpret_cast<const uint4*>(w + n * p.k + kc + kk))
                                             : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int kk = ks + h * 32 + 8 * c;  // xs beyond `count` holds zeros
        const uint4 xa = *reinterpret_cast<const uint4*>(&xs[g][kk]);
        const uint4 xb = *reinterpret_cast<const uint4*>(&xs[g + 8][kk]);
        const uint32_t a0[4] = {xa.x, xb.x, xa.y, xb.y};
        const uint32_t a1[4] = {xa.z, xb.z, xa.w, xb.w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          mma_16816<T>(acc[q], a0, wv[h][q].x, wv[h][q].y);
          mma_16816<T>(acc[q], a1, wv[h][q].z, wv[h][q].w);
        }
      }
    }
  }

  // This CTA's partial tile -> shared memory -> workspace (thread t owns column n0 + t).
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int nl = warp * 32 + q * 8 + 2 * c;
    *reinterpret_cast<float2*>(&part[g][nl]) = make_float2(acc[q][0], acc[q][1]);
    *reinterpret_cast<float2*>(&part[g + 8][nl]) = make_float2(acc[q][2], acc[q][3]);
  }
  __syncthreads();
  const int64_t n = n0 + tid;
  if (n < p.n)
    for (int m = 0; m < rows; ++m) p.ws_y[(static_cast<int64_t>(split) * rows + m) * p.n + n] = part[m][tid];
  if (r > 0) split_lora::store_s_part(s_acc, rows, r, p.ws_s, tile, p.splits, split);

  if (!arrive_last(p.counters + tile, p.splits)) return;

  if (r > 0) {
    split_lora::sum_s_parts(p.ws_s, rows, r, tile, p.splits, s_acc);
    __syncthreads();
    if (tile == 0)
      for (int e = tid; e < rows * r; e += kThreads) p.s_out[e] = s_acc[e];
  }
  if (n < p.n) {
    float out[kRows];
#pragma unroll
    for (int m = 0; m < kRows; ++m) {
      out[m] = 0.0f;
      if (m < rows)
        for (int i = 0; i < p.splits; ++i) out[m] += __ldcg(p.ws_y + (static_cast<int64_t>(i) * rows + m) * p.n + n);
    }
    if (r > 0) {
      float lora[kRows] = {};
      for (int j = 0; j < r; ++j) {
        const float bj = load_float(p.b, p.b_type, n * r + j);
#pragma unroll
        for (int m = 0; m < kRows; ++m)
          if (m < rows) lora[m] = fmaf(s_acc[m * r + j], bj, lora[m]);
      }
#pragma unroll
      for (int m = 0; m < kRows; ++m) out[m] = fmaf(p.scale, lora[m], out[m]);
    }
    const float bias = p.bias != nullptr ? load_float(p.bias, p.bias_type, n) : 0.0f;
    T* y = static_cast<T*>(p.y);
#pragma unroll
    for (int m = 0; m < kRows; ++m)
      if (m < rows) store_float(y + m * p.n + n, out[m] + bias);
  }
  if (tid == 0) p.counters[tile] = 0;  // every CTA of this tile has arrived: ready for the next launch
}

int sm_count(int device) {
  static int cached[64] = {};
  if (device < 0 || device >= 64) return 132;
  if (cached[device] == 0) {
    int v = 0;
    cached[device] = cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) == cudaSuccess && v > 0 ? v : 132;
  }
  return cached[device];
}

// Static shared memory of the kernel (x staging, the partial tile, arrive_last's flag): past 48 KB
// with the dynamic [rows][r] part (ranks above 256 at 16 rows) the launch needs the opt-in.
constexpr size_t kStaticSmem = kRows * (kChunk + kPad) * 2 + kRows * (kTileN + 8) * 4 + 16;

template <typename Kernel>
int launch_typed(Kernel kernel, dim3 grid, size_t smem, cudaStream_t s, const LoraDecodeParams& p) {
  if (smem + kStaticSmem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  kernel<<<grid, kThreads, smem, s>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

LoraDecodePlan plan_lora_decode(int64_t n, int64_t k, int device) {
  LoraDecodePlan plan{};
  plan.tiles = static_cast<int>((n + kTileN - 1) / kTileN);
  const int64_t chunks = std::max<int64_t>(1, (k + kChunk - 1) / kChunk);
  const int64_t wanted = std::max<int64_t>(1, (2 * sm_count(device) + plan.tiles - 1) / std::max(plan.tiles, 1));
  const int64_t per_split = (chunks + std::min(wanted, chunks) - 1) / std::min(wanted, chunks);
  plan.k_per_split = per_split * kChunk;
  plan.splits = static_cast<int>((chunks + per_split - 1) / per_split);
  return plan;
}

int launch_lora_decode(const LoraDecodeParams& p, void* stream) {
  if (p.m < 1 || p.m > kLoraDecodeMaxRows || p.k % 8 != 0 || p.k_per_split % kChunk != 0)
    return static_cast<int>(cudaErrorInvalidValue);
  const dim3 grid(static_cast<unsigned>((p.n + kTileN - 1) / kTileN), static_cast<unsigned>(p.splits));
  const size_t smem = static_cast<size_t>(p.m) * p.r * sizeof(float);
  auto s = static_cast<cudaStream_t>(stream);
  if (p.x_type == FloatType::kFloat16) return launch_typed(lora_decode_kernel<__half>, grid, smem, s, p);
  if (p.x_type == FloatType::kBFloat16) return launch_typed(lora_decode_kernel<__nv_bfloat16>, grid, smem, s, p);
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace lightllm
