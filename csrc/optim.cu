// Fused optimizer step on CUDA, one launch for many parameters (semantics: lightllm/ops/optim.py).
//
// Memory-bound: per fp32 parameter with 8-bit state the step moves 16.06 bytes (param read+write,
// grad read, two codes read+write, the absmax values), so each thread owns 8 consecutive values
// (16-byte loads and stores of fp32, 8-byte loads and stores of codes) and one warp owns one
// 256-value block: the block's new absmax is a warp-shuffle reduction, no shared memory or
// barrier. CTAs walk a work list of (tensor, block) pairs, so many tensors share one launch and
// the two 1 KB maps and search trees are built once per CTA. The learning rate, each tensor's step,
// GradScaler's flags and the per-tensor "gradient not finite" flags are read on the device: no host
// synchronization, so the step can be captured in a CUDA graph. The caller increments the steps.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "optim.h"
#include "search_tree.h"

namespace lightllm {
namespace {

constexpr int kPerThread = 8;
constexpr int kWarpsPerCta = 8;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void from_f(float& o, float v) { o = v; }
__device__ __forceinline__ void from_f(__half& o, float v) { o = __float2half_rn(v); }
__device__ __forceinline__ void from_f(__nv_bfloat16& o, float v) { o = __float2bfloat16_rn(v); }

// 8 values as float: one 16-byte load per 8 half-precision values, two per 8 floats.
template <typename T>
__device__ __forceinline__ void load8(const T* p, bool vector, int valid, float (&v)[8]) {
  if (vector && valid == 8) {
    if constexpr (sizeof(T) == 4) {
      const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
      const uint4 raw = *reinterpret_cast<const uint4*>(p);
      const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = to_f(h[i]);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = i < valid ? to_f(p[i]) : 0.0f;
}

template <typename T>
__device__ __forceinline__ void store8(T* p, bool vector, int valid, const float (&v)[8]) {
  if (vector && valid == 8) {
    if constexpr (sizeof(T) == 4) {
      reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
      reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      uint4 raw;
      T* h = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < 8; ++i) from_f(h[i], v[i]);
      *reinterpret_cast<uint4*>(p) = raw;
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (i < valid) from_f(p[i], v[i]);
}

// State of this thread's 8 values: map[code] * absmax (8-bit) or the float32 values.
template <bool STATE8>
__device__ __forceinline__ void load_state(void* state, const float* absmax, const float* smap, int64_t block,
                                           int64_t base, bool vector, int valid, float (&out)[8]) {
  if constexpr (STATE8) {
    const uint8_t* codes = static_cast<const uint8_t*>(state) + base;
    uint8_t c[8];
    if (vector && valid == 8) {
      *reinterpret_cast<uint2*>(c) = *reinterpret_cast<const uint2*>(codes);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) c[i] = i < valid ? codes[i] : 0;
    }
    const float a = absmax[block];
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = i < valid ? smap[c[i]] * a : 0.0f;
  } else {
    load8(static_cast<const float*>(state) + base, vector, valid, out);
  }
}

// New block absmax (warp reduction), then the nearest code through the Eytzinger tree; a negative
// momentum keeps a negative code (bitsandbytes' rule).
template <bool STATE8>
__device__ __forceinline__ void store_state(void* state, float* absmax, const float* smap, const float* tree,
                                            bool keep_sign, int64_t block, int64_t base, bool vector, int valid,
                                            int lane, const float (&value)[8]) {
  if constexpr (STATE8) {
    float m = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) m = fmaxf(m, i < valid ? fabsf(value[i]) : 0.0f);  // finite: grads checked
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(kFullMask, m, offset));
    if (lane == 0) absmax[block] = m;
    const float inv = m == 0.0f ? 0.0f : 1.0f / m;
    uint8_t c[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float q = __fmul_rn(value[i], inv);
      unsigned t = 1;
#pragma unroll
      for (int level = 0; level < 8; ++level) t = 2 * t + (tree[t] < q ? 1u : 0u);
      int code = static_cast<int>(t) - 256;
      if (keep_sign && value[i] < 0.0f && smap[code] >= 0.0f) code -= 1;
      c[i] = static_cast<uint8_t>(code);
    }
    uint8_t* codes = static_cast<uint8_t*>(state) + base;
    if (vector && valid == 8) {
      *reinterpret_cast<uint2*>(codes) = *reinterpret_cast<const uint2*>(c);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (i < valid) codes[i] = c[i];
    }
  } else {
    store8(static_cast<float*>(state) + base, vector, valid, value);
  }
}

template <OptimAlgo ALGO, typename P, bool STATE8>
__global__ void __launch_bounds__(kWarpsPerCta * 32)
optimizer_step_kernel(const OptimDeviceTensor* __restrict__ tensors, const int32_t* __restrict__ work_tensor,
                      const int32_t* __restrict__ work_block, int64_t n_work, const int32_t* __restrict__ skip,
                      const float* __restrict__ map1, const float* __restrict__ map2, const float* __restrict__ lr_ptr,
                      const float* __restrict__ grad_scale, const float* __restrict__ found_inf, OptimHyper h) {
  __shared__ float smap1[256], smap2[256], tree1[256], tree2[256];
  constexpr bool kTwoState = ALGO == OptimAlgo::kAdam || ALGO == OptimAlgo::kAdamW;
  for (int t = threadIdx.x; t < 256; t += blockDim.x) {
    smap1[t] = map1[t];
    smap2[t] = map2[t];
    tree1[t] = t == 0 ? 0.0f : map_midpoint(map1, eytzinger_rank(t));
    tree2[t] = t == 0 ? 0.0f : map_midpoint(map2, eytzinger_rank(t));
  }
  __syncthreads();
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const float lr = *lr_ptr;
  const float scale = grad_scale != nullptr ? *grad_scale : 1.0f;
  const int lane = threadIdx.x & 31;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5); w < n_work;
       w += static_cast<int64_t>(gridDim.x) * kWarpsPerCta) {
    const int32_t ti = work_tensor[w];
    if (skip[ti] != 0) continue;  // warp-uniform
    const OptimDeviceTensor T = tensors[ti];
    const int64_t block = work_block[w];
    const int64_t base = block * kOptimBlock + lane * kPerThread;
    const int64_t left = T.n - base;
    const int valid = left <= 0 ? 0 : (left >= kPerThread ? kPerThread : static_cast<int>(left));
    const bool vector = T.aligned;
    const double step = static_cast<double>(*T.step) + 1.0;  // the caller increments it afterwards

    float g[8], p[8], m[8], v[8];
    load8(static_cast<const P*>(T.grad) + base, vector, valid, g);
#pragma unroll
    for (int i = 0; i < 8; ++i) {  // divided, as the reference does; then the sign for maximize
      if (grad_scale != nullptr) g[i] = __fdiv_rn(g[i], scale);
      if (h.maximize) g[i] = -g[i];
    }
    load8(static_cast<const P*>(T.param) + base, vector, valid, p);
    load_state<STATE8>(T.state1, T.absmax1, smap1, block, base, vector, valid, m);
    if constexpr (kTwoState) load_state<STATE8>(T.state2, T.absmax2, smap2, block, base, vector, valid, v);
    const float decay = static_cast<float>(1.0 - static_cast<double>(lr) * h.weight_decay_d);
    if constexpr (kTwoState) {
      const float step_size = static_cast<float>(lr / (1.0 - pow(h.beta1_d, step)));
      const float bc2_sqrt = static_cast<float>(sqrt(1.0 - pow(h.beta2_d, step)));
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        float gi = g[i];
        float pi = p[i];
        if constexpr (ALGO == OptimAlgo::kAdamW) pi = __fmul_rn(pi, decay); else gi = __fadd_rn(gi, __fmul_rn(h.weight_decay, pi));
        const float mi = __fadd_rn(__fmul_rn(h.beta1, m[i]), __fmul_rn(h.one_minus_beta1, gi));
        const float vi = __fadd_rn(__fmul_rn(h.beta2, v[i]), __fmul_rn(__fmul_rn(h.one_minus_beta2, gi), gi));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), h.eps);
        p[i] = __fsub_rn(pi, __fdiv_rn(__fmul_rn(step_size, mi), denom));
        m[i] = mi;
        v[i] = vi;
      }
    } else if constexpr (ALGO == OptimAlgo::kLion) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float gi = g[i];
        const float c = __fadd_rn(__fmul_rn(h.beta1, m[i]), __fmul_rn(h.one_minus_beta1, gi));
        const float direction = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : 0.0f);
        p[i] = __fsub_rn(__fmul_rn(p[i], decay), __fmul_rn(lr, direction));
        m[i] = __fadd_rn(__fmul_rn(h.beta2, m[i]), __fmul_rn(h.one_minus_beta2, gi));
      }
    } else {
      const bool first = step == 1.0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float gi = __fadd_rn(g[i], __fmul_rn(h.weight_decay, p[i]));
        const float mi = first ? gi : __fadd_rn(__fmul_rn(h.beta1, m[i]), gi);
        const float d = h.nesterov ? __fadd_rn(gi, __fmul_rn(h.beta1, mi)) : mi;
        p[i] = __fsub_rn(p[i], __fmul_rn(lr, d));
        m[i] = mi;
      }
    }
    store8(static_cast<P*>(T.param) + base, vector, valid, p);
    store_state<STATE8>(T.state1, T.absmax1, smap1, tree1, true, block, base, vector, valid, lane, m);
    if constexpr (kTwoState) store_state<STATE8>(T.state2, T.absmax2, smap2, tree2, false, block, base, vector, valid, lane, v);
  }
}

template <OptimAlgo ALGO, typename P>
int launch_typed(const OptimLaunch& l, bool state8, cudaStream_t stream) {
  const int64_t ctas_needed = (l.n_work + kWarpsPerCta - 1) / kWarpsPerCta;
  const int ctas = static_cast<int>(ctas_needed < 65535 * 8 ? ctas_needed : 65535 * 8);
  if (ctas == 0) return 0;
  auto* kernel = state8 ? optimizer_step_kernel<ALGO, P, true> : optimizer_step_kernel<ALGO, P, false>;
  kernel<<<ctas, kWarpsPerCta * 32, 0, stream>>>(l.tensors, l.work_tensor, l.work_block, l.n_work, l.skip, l.map1,
                                                 l.map2, l.lr, l.grad_scale, l.found_inf, l.hyper);
  return static_cast<int>(cudaGetLastError());
}

template <OptimAlgo ALGO>
int launch_algo(const OptimLaunch& l, FloatType type, bool state8, cudaStream_t stream) {
  switch (type) {
    case FloatType::kFloat32: return launch_typed<ALGO, float>(l, state8, stream);
    case FloatType::kFloat16: return launch_typed<ALGO, __half>(l, state8, stream);
    case FloatType::kBFloat16: return launch_typed<ALGO, __nv_bfloat16>(l, state8, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

int launch_optimizer_step(const OptimLaunch& l, FloatType param_type, bool state8, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  switch (l.hyper.algo) {
    case OptimAlgo::kAdam: return launch_algo<OptimAlgo::kAdam>(l, param_type, state8, s);
    case OptimAlgo::kAdamW: return launch_algo<OptimAlgo::kAdamW>(l, param_type, state8, s);
    case OptimAlgo::kLion: return launch_algo<OptimAlgo::kLion>(l, param_type, state8, s);
    case OptimAlgo::kSGD: return launch_algo<OptimAlgo::kSGD>(l, param_type, state8, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace lightllm
