// Fused optimizer step (Adam, AdamW, Lion, SGD with momentum) with 8-bit block-wise or 32-bit state:
// host launchers only. No torch headers here: the bindings files alone see at::Tensor.
// The semantics are those of lightllm/ops/optim.py (the Python reference defines them).
#pragma once

#include <cstdint>

#include "blockwise.h"

namespace lightllm {

enum class OptimAlgo : int { kAdam = 0, kAdamW = 1, kLion = 2, kSGD = 3 };

struct OptimHyper {
  OptimAlgo algo;
  float lr, beta1, beta2, eps, weight_decay;
  float one_minus_beta1, one_minus_beta2;  // rounded from double on the host, as the reference does
  double beta1_d, beta2_d;  // the betas as given, for the bias corrections 1 - beta^t (cancellation)
  double weight_decay_d;    // as given, for the decay factor 1 - lr * wd (computed in double, as the reference)
  bool maximize, nesterov;
  bool has_grad_scale;
  float grad_scale;  // gradients are divided by it (CPU; the CUDA kernel reads it from the device)
};

// One parameter's tensors. 8-bit state: uint8 codes + one float absmax per 256 values; 32-bit state:
// float values and no absmax. state2/absmax2 are null for the one-state algorithms.
struct OptimTensor {
  void* param;
  FloatType param_type;
  const void* grad;
  FloatType grad_type;
  void* state1;
  float* absmax1;  // null: state1 is float32
  void* state2;
  float* absmax2;  // null: state2 is float32
  float* step;
  int64_t n;
};

constexpr int64_t kOptimBlock = 256;

// CPU, in two parts that the caller runs in parallel over ranges:
// whether values [begin, end) of a gradient are all finite (a skipped tensor is left untouched),
bool all_finite_cpu(const void* x, FloatType type, int64_t begin, int64_t end);
// and the update of blocks [block_begin, block_end) of one tensor at step `step` (already
// incremented), with the state maps qmap1 (signed, for m) and qmap2 (unsigned, for v).
void optimizer_update_cpu(const OptimHyper& hyper, const OptimTensor& t, float step, const float* qmap1,
                          const float* qmap2, int64_t block_begin, int64_t block_end);

#ifdef LIGHTLLM_WITH_CUDA
// CUDA: one tensor as the kernel sees it (a table of these lives in device memory).
struct OptimDeviceTensor {
  void* param;  // the gradient has the parameter's dtype
  const void* grad;
  void* state1;
  float* absmax1;
  void* state2;
  float* absmax2;
  float* step;
  int64_t n;
  int64_t aligned;  // every pointer 16-byte aligned: vector loads and stores
};

struct OptimLaunch {
  OptimHyper hyper;  // lr and inv_grad_scale unused: read from the device pointers below
  const OptimDeviceTensor* tensors;
  const int32_t* work_tensor;  // per 256-value block of work: its tensor and its block index
  const int32_t* work_block;
  int64_t n_work;
  const int32_t* skip;  // per tensor: nonzero = leave untouched (gradient not finite)
  const float* map1;
  const float* map2;
  const float* lr;
  const float* grad_scale;  // null: none
  const float* found_inf;   // null: none
};

// One launch on `stream` (a cudaStream_t) for every tensor of one dtype and state kind; does not
// increment the steps. Returns the launch's error code.
int launch_optimizer_step(const OptimLaunch& launch, FloatType param_type, bool state8, void* stream);
#endif

}  // namespace lightllm
