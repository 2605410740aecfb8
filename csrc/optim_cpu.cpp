// Fused optimizer update on the CPU: one pass over each 256-value block (dequantize the state,
// update, write the parameter, requantize with the block's new absmax). See optim.h.
#include "optim.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>

#include "search_tree.h"

namespace lightllm {
namespace {

template <typename T>
void load_block(const void* src, int64_t start, int64_t n, float* out) {
  const T* x = static_cast<const T*>(src) + start;
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(x[i]);
}

void load_floats(const void* src, FloatType type, int64_t start, int64_t n, float* out) {
  switch (type) {
    case FloatType::kFloat32: load_block<float>(src, start, n, out); break;
    case FloatType::kFloat16: load_block<c10::Half>(src, start, n, out); break;
    case FloatType::kBFloat16: load_block<c10::BFloat16>(src, start, n, out); break;
  }
}

template <typename T>
void store_block(void* dst, int64_t start, int64_t n, const float* in) {
  T* x = static_cast<T*>(dst) + start;
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<T>(in[i]);
}

void store_floats(void* dst, FloatType type, int64_t start, int64_t n, const float* in) {
  switch (type) {
    case FloatType::kFloat32: store_block<float>(dst, start, n, in); break;
    case FloatType::kFloat16: store_block<c10::Half>(dst, start, n, in); break;
    case FloatType::kBFloat16: store_block<c10::BFloat16>(dst, start, n, in); break;
  }
}

// State of one block as float32: map[code] * absmax for 8-bit state, the values for 32-bit.
void load_state(const void* state, const float* absmax, const float* map, int64_t block, int64_t start, int64_t n,
                float* out) {
  if (absmax == nullptr) {
    std::copy_n(static_cast<const float*>(state) + start, n, out);
    return;
  }
  const uint8_t* codes = static_cast<const uint8_t*>(state) + start;
  const float a = absmax[block];
  for (int64_t i = 0; i < n; ++i) out[i] = map[codes[i]] * a;
}

void store_state(void* state, float* absmax, const float* map, const CodeSearch* search, bool keep_sign,
                 int64_t block, int64_t start, int64_t n, const float* values) {
  if (absmax == nullptr) {
    std::copy_n(values, n, static_cast<float*>(state) + start);
    return;
  }
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(values[i]));  // finite: gradients were checked
  absmax[block] = m;
  uint8_t* codes = static_cast<uint8_t*>(state) + start;
  search->encode(values, m == 0.0f ? 0.0f : 1.0f / m, codes, n);
  if (keep_sign) {  // a negative value keeps a negative code (bitsandbytes' rule for the momentum)
    for (int64_t i = 0; i < n; ++i) codes[i] -= (values[i] < 0.0f && map[codes[i]] >= 0.0f) ? 1 : 0;
  }
}

}  // namespace

bool all_finite_cpu(const void* x, FloatType type, int64_t begin, int64_t end) {
  constexpr int64_t kChunk = 1024;
  float buffer[kChunk];
  for (int64_t s = begin; s < end; s += kChunk) {
    const int64_t n = std::min(kChunk, end - s);
    load_floats(x, type, s, n, buffer);
    float probe = 0.0f;  // x * 0 is NaN exactly when x is NaN or inf
    for (int64_t i = 0; i < n; ++i) probe += buffer[i] * 0.0f;
    if (probe != 0.0f) return false;
  }
  return true;
}

void optimizer_update_cpu(const OptimHyper& h, const OptimTensor& t, float step, const float* qmap1,
                          const float* qmap2, const CodeSearch* search1, const CodeSearch* search2,
                          int64_t block_begin, int64_t block_end) {
  float g[kOptimBlock], p[kOptimBlock], m[kOptimBlock], v[kOptimBlock];
  const bool two_state = h.algo == OptimAlgo::kAdam || h.algo == OptimAlgo::kAdamW;
  const float sign = h.maximize ? -h.inv_grad_scale : h.inv_grad_scale;
  // Bias corrections in double, as the reference computes them, then rounded once.
  const float step_size = static_cast<float>(h.lr / (1.0 - std::pow(static_cast<double>(h.beta1), step)));
  const float bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(static_cast<double>(h.beta2), step)));
  const float decay = static_cast<float>(1.0 - static_cast<double>(h.lr) * h.weight_decay);
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t start = b * kOptimBlock;
    const int64_t n = std::min(kOptimBlock, t.n - start);
    load_floats(t.grad, t.grad_type, start, n, g);
    load_floats(t.param, t.param_type, start, n, p);
    load_state(t.state1, t.absmax1, qmap1, b, start, n, m);
    for (int64_t i = 0; i < n; ++i) g[i] *= sign;
    switch (h.algo) {
      case OptimAlgo::kAdam:
      case OptimAlgo::kAdamW: {
        load_state(t.state2, t.absmax2, qmap2, b, start, n, v);
        const bool decoupled = h.algo == OptimAlgo::kAdamW;
        for (int64_t i = 0; i < n; ++i) {
          float gi = g[i];
          float pi = p[i];
          if (decoupled) pi *= decay; else gi += h.weight_decay * pi;
          const float mi = h.beta1 * m[i] + h.one_minus_beta1 * gi;
          const float vi = h.beta2 * v[i] + h.one_minus_beta2 * gi * gi;
          const float denom = std::sqrt(vi) / bc2_sqrt + h.eps;
          p[i] = pi - step_size * mi / denom;
          m[i] = mi;
          v[i] = vi;
        }
        break;
      }
      case OptimAlgo::kLion:
        for (int64_t i = 0; i < n; ++i) {
          const float c = h.beta1 * m[i] + h.one_minus_beta1 * g[i];
          const float direction = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : 0.0f);
          p[i] = p[i] * decay - h.lr * direction;
          m[i] = h.beta2 * m[i] + h.one_minus_beta2 * g[i];
        }
        break;
      case OptimAlgo::kSGD: {
        const bool first = step == 1.0f;
        for (int64_t i = 0; i < n; ++i) {
          const float gi = g[i] + h.weight_decay * p[i];
          const float mi = first ? gi : h.beta1 * m[i] + gi;
          p[i] -= h.lr * (h.nesterov ? gi + h.beta1 * mi : mi);
          m[i] = mi;
        }
        break;
      }
    }
    store_floats(t.param, t.param_type, start, n, p);
    store_state(t.state1, t.absmax1, qmap1, search1, true, b, start, n, m);
    if (two_state) store_state(t.state2, t.absmax2, qmap2, search2, false, b, start, n, v);
  }
}

}  // namespace lightllm
