// The only translation unit that sees at::Tensor: argument checks, output allocation, stream
// selection, then a call into the torch-free launchers of the kernel files.
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <torch/extension.h>

#ifdef LIGHTLLM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "blockwise.h"
#include "gptq.h"
#include "lora.h"
#include "optim.h"

namespace {

using lightllm::FloatType;

FloatType float_type_of(at::ScalarType t, const char* op, const char* what) {
  switch (t) {
    case at::kFloat: return FloatType::kFloat32;
    case at::kHalf: return FloatType::kFloat16;
    case at::kBFloat16: return FloatType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", what, " must be float32, float16 or bfloat16, got ", t);
  }
}

void check_blocksize(const char* op, int64_t blocksize) {
  TORCH_CHECK(blocksize >= 64 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0, op,
              ": blocksize must be a power of two from 64 to 4096, got ", blocksize);
}

void check_map(const char* op, const at::Tensor& map, const at::Tensor& like) {
  TORCH_CHECK(map.scalar_type() == at::kFloat && map.dim() == 1 && map.numel() == 256, op,
              ": code must be a 1-D float32 tensor of 256 values, got ", map.scalar_type(), " of shape ",
              map.sizes());
  TORCH_CHECK(map.device() == like.device(), op, ": code is on ", map.device(), " but the data is on ",
              like.device());
}

// Blocks per task for torch's CPU thread pool: about 64K values each.
int64_t cpu_grain(int64_t blocksize) { return std::max<int64_t>(1, 65536 / blocksize); }

#ifdef LIGHTLLM_WITH_CUDA
void check_launch(const char* op, int error) {
  TORCH_CHECK(error == 0, op, ": CUDA launch failed: ", lightllm::cuda_error_string(error));
}
#endif

std::tuple<at::Tensor, at::Tensor> quantize_blockwise(const at::Tensor& x, const at::Tensor& map,
                                                      int64_t blocksize) {
  constexpr const char* op = "quantize_blockwise";
  const FloatType x_type = float_type_of(x.scalar_type(), op, "x");
  check_blocksize(op, blocksize);
  check_map(op, map, x);
  const at::Tensor xc = x.contiguous();
  const at::Tensor mapc = map.contiguous();
  const int64_t n = xc.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, x.options().dtype(at::kFloat));
  if (n == 0) return {codes, absmax};

  if (xc.is_cuda()) {
#ifdef LIGHTLLM_WITH_CUDA
    const c10::cuda::CUDAGuard guard(xc.device());
    check_launch(op, lightllm::launch_quantize_blockwise(
                         xc.data_ptr(), x_type, mapc.data_ptr<float>(), codes.data_ptr<uint8_t>(),
                         absmax.data_ptr<float>(), n, blocksize, c10::cuda::getCurrentCUDAStream().stream()));
#else
    TORCH_CHECK(false, op, ": lightllm._C was built without CUDA kernels");
#endif
  } else {
    TORCH_CHECK(xc.is_cpu(), op, ": unsupported device ", xc.device());
    const void* xp = xc.data_ptr();
    const auto search = lightllm::code_search_for(mapc.data_ptr<float>());
    uint8_t* cp = codes.data_ptr<uint8_t>();
    float* ap = absmax.data_ptr<float>();
    at::parallel_for(0, nblocks, cpu_grain(blocksize), [&](int64_t begin, int64_t end) {
      lightllm::quantize_blockwise_cpu(xp, x_type, *search, cp, ap, n, blocksize, begin, end);
    });
  }
  return {codes, absmax};
}

at::Tensor dequantize_blockwise(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& map,
                                int64_t blocksize, at::ScalarType dtype) {
  constexpr const char* op = "dequantize_blockwise";
  const FloatType out_type = float_type_of(dtype, op, "dtype");
  TORCH_CHECK(codes.scalar_type() == at::kByte, op, ": codes must be uint8, got ", codes.scalar_type());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, op, ": absmax must be float32, got ", absmax.scalar_type());
  check_blocksize(op, blocksize);
  check_map(op, map, codes);
  TORCH_CHECK(absmax.device() == codes.device(), op, ": absmax is on ", absmax.device(), " but codes are on ",
              codes.device());
  const int64_t n = codes.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  TORCH_CHECK(absmax.numel() == nblocks, op, ": absmax must hold ceil(", n, " / ", blocksize, ") = ", nblocks,
              " values, got ", absmax.numel());
  const at::Tensor cc = codes.contiguous();
  const at::Tensor ac = absmax.contiguous();
  const at::Tensor mapc = map.contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(dtype));
  if (n == 0) return out;

  if (cc.is_cuda()) {
#ifdef LIGHTLLM_WITH_CUDA
    const c10::cuda::CUDAGuard guard(cc.device());
    check_launch(op, lightllm::launch_dequantize_blockwise(
                         cc.data_ptr<uint8_t>(), ac.data_ptr<float>(), mapc.data_ptr<float>(), out.data_ptr(),
                         out_type, n, blocksize, c10::cuda::getCurrentCUDAStream().stream()));
#else
    TORCH_CHECK(false, op, ": lightllm._C was built without CUDA kernels");
#endif
  } else {
    TORCH_CHECK(cc.is_cpu(), op, ": unsupported device ", cc.device());
    const uint8_t* cp = cc.data_ptr<uint8_t>();
    const float* ap = ac.data_ptr<float>();
    const float* mp = mapc.data_ptr<float>();
    void* op_out = out.data_ptr();
    at::parallel_for(0, nblocks, cpu_grain(blocksize), [&](int64_t begin, int64_t end) {
      lightllm::dequantize_blockwise_cpu(cp, ap, mp, op_out, out_type, n, blocksize, begin, end);
    });
  }
  return out;
}

// ---- GPTQ (CUDA only) -----------------------------------------------------------------------
void check_gptq(const char* op, const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                const at::Tensor& g_idx, int64_t bits) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, op, ": bits must be 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(qweight.is_cuda(), op, ": the CUDA kernels take CUDA tensors, got qweight on ", qweight.device());
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qzeros.scalar_type() == at::kInt && g_idx.scalar_type() == at::kInt,
              op, ": qweight, qzeros and g_idx must be int32, got ", qweight.scalar_type(), ", ", qzeros.scalar_type(),
              " and ", g_idx.scalar_type());
  for (const at::Tensor* t : {&qzeros, &scales, &g_idx})
    TORCH_CHECK(t->device() == qweight.device(), op, ": all tensors must be on ", qweight.device(), ", one is on ",
                t->device());
  TORCH_CHECK(qweight.dim() == 2 && qzeros.dim() == 2 && scales.dim() == 2 && g_idx.dim() == 1, op,
              ": expected qweight [K*bits/32, N], qzeros [G, N*bits/32], scales [G, N], g_idx [K]");
  const int64_t n = qweight.size(1), k = g_idx.size(0);
  const int64_t chunk = bits == 3 ? 32 : 32 / bits;
  TORCH_CHECK(k % chunk == 0 && qweight.size(0) == k * bits / 32, op, ": qweight ", qweight.sizes(), " does not hold K = ",
              k, " (g_idx's length) ", bits, "-bit values; K must be a multiple of ", chunk);
  TORCH_CHECK(n % chunk == 0 && qzeros.size(1) == n * bits / 32 && scales.size(1) == n && scales.size(0) == qzeros.size(0),
              op, ": qzeros ", qzeros.sizes(), " and scales ", scales.sizes(), " do not match N = ", n, " at ", bits,
              " bits (N must be a multiple of ", chunk, ")");
  TORCH_CHECK(k == 0 || scales.size(0) > 0, op, ": scales and qzeros hold no groups for K = ", k);
  float_type_of(scales.scalar_type(), op, "scales");
}

at::Tensor gptq_dequantize(const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                           const at::Tensor& g_idx, int64_t bits, bool zeros_v1, at::ScalarType dtype) {
  constexpr const char* op = "gptq_dequantize";
  check_gptq(op, qweight, qzeros, scales, g_idx, bits);
  const FloatType out_type = float_type_of(dtype, op, "dtype");
  const int64_t n = qweight.size(1), k = g_idx.size(0);
  at::Tensor out = at::empty({n, k}, scales.options().dtype(dtype));
  if (n == 0 || k == 0) return out;
#ifdef LIGHTLLM_WITH_CUDA
  const c10::cuda::CUDAGuard guard(qweight.device());
  const at::Tensor qw = qweight.contiguous(), qz = qzeros.contiguous(), sc = scales.contiguous(), gi = g_idx.contiguous();
  check_launch(op, lightllm::launch_gptq_dequantize(
                       qw.data_ptr<int32_t>(), qz.data_ptr<int32_t>(), sc.data_ptr(),
                       float_type_of(sc.scalar_type(), op, "scales"), gi.data_ptr<int32_t>(), n, k, static_cast<int>(bits),
                       zeros_v1 ? 1 : 0, out.data_ptr(), out_type, c10::cuda::getCurrentCUDAStream().stream()));
#else
  TORCH_CHECK(false, op, ": lightllm._C was built without CUDA kernels");
#endif
  return out;
}

#ifdef LIGHTLLM_WITH_CUDA
// One int32 counter buffer per (device, stream) for the split reductions of the one-launch GEMVs:
// zeroed once and left zeroed by every launch (split_lora.cuh). Launches on one stream run in
// order, so they share it. Never destroyed: a static tensor would be freed after CUDA at exit.
at::Tensor split_counters(const at::Tensor& like, int64_t count) {
  static std::mutex mutex;
  static auto* cache = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(like.device().index()).stream();
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& slot = (*cache)[{like.device().index(), stream}];
  if (!slot.defined() || slot.numel() < count)
    slot = at::zeros({std::max<int64_t>(count, 1024)}, like.options().dtype(at::kInt));
  return slot;
}

// Contiguous and 16-byte aligned (for vector loads): a view that starts off a boundary is copied.
at::Tensor aligned16(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}
#endif

// LoRA's adapter tensors for x [m, k] and an output of n columns: lora_a [r, k] and/or lora_s [m, r]
// (float32), with lora_b [n, r]; returns r (0 without an adapter).
int64_t check_lora(const char* op, const at::Tensor& x, int64_t n, const std::optional<at::Tensor>& lora_a,
                   const std::optional<at::Tensor>& lora_s, const std::optional<at::Tensor>& lora_b) {
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK((lora_a.has_value() || lora_s.has_value()) == lora_b.has_value(), op,
              ": lora_b goes with lora_a or lora_s (the rank-r term needs both factors)");
  if (!lora_b.has_value()) return 0;
  const int64_t r = lora_b->dim() == 2 ? lora_b->size(1) : -1;
  TORCH_CHECK(lora_b->dim() == 2 && lora_b->size(0) == n && r >= 1, op, ": lora_b must be [N, r] = [", n,
              ", r] with r >= 1, got ", lora_b->sizes());
  if (lora_a.has_value())
    TORCH_CHECK(lora_a->dim() == 2 && lora_a->size(0) == r && lora_a->size(1) == k, op, ": lora_a must be [r, K] = [",
                r, ", ", k, "], got ", lora_a->sizes());
  if (lora_s.has_value())
    TORCH_CHECK(lora_s->dim() == 2 && lora_s->size(0) == m && lora_s->size(1) == r, op, ": lora_s must be [M, r] = [",
                m, ", ", r, "], got ", lora_s->sizes());
  for (const auto* t : {&lora_a, &lora_s, &lora_b}) {
    if (!t->has_value()) continue;
    TORCH_CHECK((*t)->device() == x.device(), op, ": the adapter tensors must be on ", x.device(), ", one is on ",
                (*t)->device());
    float_type_of((*t)->scalar_type(), op, "the adapter tensors");
  }
  return r;
}

at::Tensor gptq_matmul(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                       const at::Tensor& g_idx, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_s,
                       const std::optional<at::Tensor>& lora_b, double lora_scale, int64_t bits, bool zeros_v1) {
  constexpr const char* op = "gptq_matmul";
  check_gptq(op, qweight, qzeros, scales, g_idx, bits);
  const FloatType x_type = float_type_of(x.scalar_type(), op, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == g_idx.size(0), op, ": x must be [M, K] with K = ", g_idx.size(0), ", got ",
              x.sizes());
  TORCH_CHECK(x.device() == qweight.device(), op, ": x is on ", x.device(), " but the weight is on ", qweight.device());
  const int64_t m = x.size(0), n = qweight.size(1), k = x.size(1);
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->device() == x.device(), op, ": bias must be [", n,
                "] on ", x.device(), ", got ", bias->sizes(), " on ", bias->device());
  const int64_t r = check_lora(op, x, n, lora_a, lora_s, lora_b);
#ifdef LIGHTLLM_WITH_CUDA
  const c10::cuda::CUDAGuard guard(x.device());
  if (m <= lightllm::kGptqGemvMaxRows) {
    // One launch: the GEMV with the split reduction, the rank-r term and the bias.
    at::Tensor y = at::empty({m, n}, x.options());
    if (m == 0 || n == 0) return y;
    const at::Tensor qw = aligned16(qweight), xc = x.contiguous(), qz = qzeros.contiguous(), sc = scales.contiguous(),
                     gi = g_idx.contiguous();
    // S for the rows in shared memory up to ranks of 6000; beyond, S = x A^T first (cuBLAS).
    const bool s_here = lora_a.has_value() && !lora_s.has_value() && m * r * 4 <= 192 * 1024;
    const std::optional<at::Tensor> s_first =
        lora_a.has_value() && !lora_s.has_value() && !s_here
            ? std::optional<at::Tensor>(at::matmul(x.to(at::kFloat), lora_a->to(at::kFloat).t()))
            : std::nullopt;
    const std::optional<at::Tensor>& s_given = s_first.has_value() ? s_first : lora_s;
    at::Tensor a, s, b, bias_c;
    if (s_here) {  // 16-byte rows for the vector loads: half rows need K % 8 == 0, float rows K % 4 == 0
      a = aligned16(lora_a->scalar_type() != at::kFloat && k % 8 != 0 ? lora_a->to(at::kFloat) : *lora_a);
    }
    if (s_given.has_value()) s = s_given->to(at::kFloat).contiguous();
    if (r > 0) b = lora_b->contiguous();
    if (bias.has_value()) bias_c = bias->contiguous();
    const int64_t tiles = lightllm::gptq_gemv_tiles(n), splits = lightllm::gptq_gemv_splits(k);
    at::Tensor ws_y = at::empty({splits, m, n}, x.options().dtype(at::kFloat));
    at::Tensor ws_s = s_here ? at::empty({tiles, splits, m, r}, x.options().dtype(at::kFloat)) : at::Tensor();
    at::Tensor counters = split_counters(x, tiles);
    lightllm::GptqGemvParams p{};
    p.x = xc.data_ptr();
    p.x_type = x_type;
    p.m = m;
    p.k = k;
    p.n = n;
    p.qweight = qw.data_ptr<int32_t>();
    p.qzeros = qz.data_ptr<int32_t>();
    p.scales = sc.data_ptr();
    p.scales_type = float_type_of(sc.scalar_type(), op, "scales");
    p.g_idx = gi.data_ptr<int32_t>();
    p.bits = static_cast<int>(bits);
    p.zero_offset = zeros_v1 ? 1 : 0;
    p.bias = bias.has_value() ? bias_c.data_ptr() : nullptr;
    p.bias_type = bias.has_value() ? float_type_of(bias_c.scalar_type(), op, "bias") : FloatType::kFloat32;
    p.lora_a = s_here ? a.data_ptr() : nullptr;
    p.a_type = s_here ? float_type_of(a.scalar_type(), op, "lora_a") : FloatType::kFloat32;
    p.lora_s = s_given.has_value() ? s.data_ptr<float>() : nullptr;
    p.lora_b = r > 0 ? b.data_ptr() : nullptr;
    p.b_type = r > 0 ? float_type_of(b.scalar_type(), op, "lora_b") : FloatType::kFloat32;
    p.r = static_cast<int>(r);
    p.scale = static_cast<float>(lora_scale);
    p.y = y.data_ptr();
    p.ws_y = ws_y.data_ptr<float>();
    p.ws_s = s_here ? ws_s.data_ptr<float>() : nullptr;
    p.counters = counters.data_ptr<int>();
    check_launch(op, lightllm::launch_gptq_gemv(p, c10::cuda::getCurrentCUDAStream().stream()));
    return y;
  }
  // Compute-bound: dequantize once, then cuBLAS; the rank-r term and the bias in float32.
  const at::Tensor weight = gptq_dequantize(qweight, qzeros, scales, g_idx, bits, zeros_v1, x.scalar_type());
  std::optional<at::Tensor> s;
  if (lora_s.has_value()) s = lora_s->to(at::kFloat);
  else if (lora_a.has_value()) s = at::matmul(x.to(at::kFloat), lora_a->to(at::kFloat).t());
  if (!s.has_value())
    return at::linear(x, weight, bias.has_value() ? std::optional<at::Tensor>(bias->to(x.scalar_type())) : std::nullopt);
  at::Tensor acc = at::linear(x, weight).to(at::kFloat);
  acc.addmm_(*s, lora_b->to(at::kFloat).t(), 1.0, lora_scale);
  if (bias.has_value()) acc.add_(bias->to(at::kFloat));
  return acc.to(x.scalar_type());
#else
  (void)m; (void)n; (void)k; (void)x_type; (void)r;
  TORCH_CHECK(false, op, ": lightllm._C was built without CUDA kernels");
#endif
}

// LoRA on a dense layer at decode sizes (lightllm/ops/lora.py): (y, S) in one launch.
std::tuple<at::Tensor, at::Tensor> lora_decode(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                               const at::Tensor& lora_b, double scale) {
  constexpr const char* op = "lora_decode";
  TORCH_CHECK(x.is_cuda(), op, ": the CUDA kernel takes CUDA tensors, got x on ", x.device());
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && weight.size(1) == x.size(1), op,
              ": x must be [M, K] and weight [N, K]; got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              ": x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(), op, ": weight must be ",
              x.scalar_type(), " on ", x.device(), ", got ", weight.scalar_type(), " on ", weight.device());
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(m <= 16, op, ": at most 16 rows of x, got ", m);
  TORCH_CHECK(weight.is_contiguous() && k % 8 == 0 && reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0, op,
              ": weight must be a contiguous, 16-byte aligned [N, K] with K a multiple of 8; got ", weight.sizes(),
              " with strides ", weight.strides());
  const std::optional<at::Tensor> a_opt(lora_a), b_opt(lora_b);
  const int64_t r = check_lora(op, x, n, a_opt, std::nullopt, b_opt);
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->device() == x.device(), op, ": bias must be [", n,
                "] on ", x.device(), ", got ", bias->sizes(), " on ", bias->device());
  at::Tensor y = at::empty({m, n}, x.options());
  at::Tensor s = at::empty({m, r}, x.options().dtype(at::kFloat));
#ifdef LIGHTLLM_WITH_CUDA
  if (m == 0 || n == 0) {
    if (m > 0) s = at::matmul(x.to(at::kFloat), lora_a.to(at::kFloat).t());
    return {y, s};
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = aligned16(x), a = aligned16(lora_a), b = lora_b.contiguous();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const lightllm::LoraDecodePlan plan = lightllm::plan_lora_decode(n, k, x.device().index());
  at::Tensor ws_y = at::empty({plan.splits, m, n}, x.options().dtype(at::kFloat));
  at::Tensor ws_s = at::empty({plan.tiles, plan.splits, m, r}, x.options().dtype(at::kFloat));
  at::Tensor counters = split_counters(x, plan.tiles);
  lightllm::LoraDecodeParams p{};
  p.x = xc.data_ptr();
  p.x_type = float_type_of(x.scalar_type(), op, "x");
  p.w = weight.data_ptr();
  p.bias = bias.has_value() ? bias_c.data_ptr() : nullptr;
  p.bias_type = bias.has_value() ? float_type_of(bias_c.scalar_type(), op, "bias") : FloatType::kFloat32;
  p.a = a.data_ptr();
  p.a_type = float_type_of(a.scalar_type(), op, "lora_a");
  p.b = b.data_ptr();
  p.b_type = float_type_of(b.scalar_type(), op, "lora_b");
  p.y = y.data_ptr();
  p.s_out = s.data_ptr<float>();
  p.ws_y = ws_y.data_ptr<float>();
  p.ws_s = ws_s.data_ptr<float>();
  p.counters = counters.data_ptr<int>();
  p.m = m;
  p.n = n;
  p.k = k;
  p.r = static_cast<int>(r);
  p.scale = static_cast<float>(scale);
  p.splits = plan.splits;
  p.k_per_split = plan.k_per_split;
  check_launch(op, lightllm::launch_lora_decode(p, c10::cuda::getCurrentCUDAStream().stream()));
  return {y, s};
#else
  (void)scale; (void)r;
  TORCH_CHECK(false, op, ": lightllm._C was built without CUDA kernels");
#endif
}

bool built_with_cuda() {
#ifdef LIGHTLLM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// One fused optimizer step for a list of CPU parameters (lightllm/ops/optim.py checks the lists;
// the checks here guard the raw pointers).
void optimizer_step_cpu(int64_t algo, const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                        const std::vector<at::Tensor>& state1, const std::vector<at::Tensor>& state2,
                        const std::vector<at::Tensor>& absmax1, const std::vector<at::Tensor>& absmax2,
                        const std::vector<at::Tensor>& steps, const at::Tensor& qmap1, const at::Tensor& qmap2,
                        const at::Tensor& lr, double beta1, double beta2, double eps, double weight_decay,
                        bool maximize, bool nesterov, const c10::optional<at::Tensor>& grad_scale,
                        const c10::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "optimizer_step_cpu";
  TORCH_CHECK(algo >= 0 && algo <= 3, op, ": unknown algorithm ", algo);
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count && state1.size() == count && state2.size() == count &&
                  absmax1.size() == count && absmax2.size() == count && steps.size() == count,
              op, ": every list needs one entry per parameter (", count, ")");
  if (count == 0) return;
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) return;  // CPU: reading it is free
  check_map(op, qmap1, params[0]);
  check_map(op, qmap2, params[0]);
  const at::Tensor map1 = qmap1.contiguous(), map2 = qmap2.contiguous();
  lightllm::OptimHyper h{};
  h.algo = static_cast<lightllm::OptimAlgo>(algo);
  h.lr = lr.item<float>();
  h.beta1 = static_cast<float>(beta1);
  h.beta2 = static_cast<float>(beta2);
  h.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  h.eps = static_cast<float>(eps);
  h.weight_decay = static_cast<float>(weight_decay);
  h.beta1_d = beta1;
  h.beta2_d = beta2;
  h.weight_decay_d = weight_decay;
  h.maximize = maximize;
  h.nesterov = nesterov;
  h.has_grad_scale = grad_scale.has_value();
  h.grad_scale = grad_scale.has_value() ? grad_scale->item<float>() : 1.0f;
  const bool two_state = algo <= 1;
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(p.is_cpu() && g.is_cpu() && p.is_contiguous() && g.is_contiguous() && g.numel() == p.numel(), op,
                ": param ", i, " and its gradient must be contiguous CPU tensors of one size, got ", p.sizes(),
                " and ", g.sizes());
    lightllm::OptimTensor t{};
    t.n = p.numel();
    t.param = p.data_ptr();
    t.param_type = float_type_of(p.scalar_type(), op, "param");
    t.grad = g.data_ptr();
    t.grad_type = float_type_of(g.scalar_type(), op, "grad");
    const int64_t blocks = (t.n + lightllm::kOptimBlock - 1) / lightllm::kOptimBlock;
    auto bind_state = [&](const at::Tensor& s, const at::Tensor& a, void** state, float** absmax, const char* name) {
      TORCH_CHECK(s.is_cpu() && s.is_contiguous() && s.numel() == t.n, op, ": ", name, " of param ", i,
                  " must be a contiguous CPU tensor of ", t.n, " values");
      if (s.scalar_type() == at::kByte) {
        TORCH_CHECK(a.scalar_type() == at::kFloat && a.numel() == blocks && a.is_contiguous(), op, ": ", name,
                    " of param ", i, " is 8-bit and needs a float32 absmax of ", blocks, " values");
        *absmax = a.data_ptr<float>();
      } else {
        TORCH_CHECK(s.scalar_type() == at::kFloat, op, ": ", name, " of param ", i, " must be uint8 or float32");
        *absmax = nullptr;
      }
      *state = s.data_ptr();
    };
    bind_state(state1[i], absmax1[i], &t.state1, &t.absmax1, "state1");
    if (two_state) bind_state(state2[i], absmax2[i], &t.state2, &t.absmax2, "state2");
    TORCH_CHECK(steps[i].scalar_type() == at::kFloat && steps[i].numel() == 1 && steps[i].is_cpu(), op,
                ": the step of param ", i, " must be a one-element float32 CPU tensor");
    if (t.n == 0) {  // nothing to update, but the step counts, as in the reference
      *steps[i].data_ptr<float>() += 1.0f;
      continue;
    }
    std::atomic<bool> finite{true};
    at::parallel_for(0, t.n, 1 << 16, [&](int64_t begin, int64_t end) {
      if (finite.load(std::memory_order_relaxed) && !lightllm::all_finite_cpu(t.grad, t.grad_type, begin, end))
        finite.store(false, std::memory_order_relaxed);
    });
    if (!finite.load()) continue;  // a NaN or inf gradient: this tensor keeps its value, state and step
    float* step = steps[i].data_ptr<float>();
    *step += 1.0f;
    const float step_now = *step;
    at::parallel_for(0, blocks, 256, [&](int64_t begin, int64_t end) {
      lightllm::optimizer_update_cpu(h, t, step_now, map1.data_ptr<float>(), map2.data_ptr<float>(), begin, end);
    });
  }
}

// One launch of the fused optimizer step over the tensors listed in `table` (int64 [n, 9], built and
// cached by lightllm/ops/optim.py; see OptimDeviceTensor). `like`: one of the parameters (dtype, device).
void optimizer_step_cuda(int64_t algo, const at::Tensor& table, const at::Tensor& work_tensor,
                         const at::Tensor& work_block, const at::Tensor& skip, const at::Tensor& like, bool state8,
                         const at::Tensor& qmap1, const at::Tensor& qmap2, const at::Tensor& lr, double beta1,
                         double beta2, double eps, double weight_decay, bool maximize, bool nesterov,
                         const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "optimizer_step_cuda";
#ifdef LIGHTLLM_WITH_CUDA
  TORCH_CHECK(algo >= 0 && algo <= 3, op, ": unknown algorithm ", algo);
  TORCH_CHECK(like.is_cuda() && table.is_cuda() && work_tensor.is_cuda() && work_block.is_cuda() && skip.is_cuda() &&
                  lr.is_cuda(), op, ": every tensor must be on the parameters' CUDA device");
  TORCH_CHECK(table.scalar_type() == at::kLong && table.dim() == 2 && table.size(1) == 9 && table.is_contiguous(), op,
              ": the tensor table must be a contiguous int64 [n, 9] tensor, got ", table.sizes());
  TORCH_CHECK(work_tensor.scalar_type() == at::kInt && work_block.scalar_type() == at::kInt &&
                  work_tensor.numel() == work_block.numel() && skip.scalar_type() == at::kInt &&
                  skip.numel() == table.size(0), op, ": work lists and skip flags must be int32 and match the table");
  check_map(op, qmap1, like);
  check_map(op, qmap2, like);
  const c10::cuda::CUDAGuard guard(like.device());
  lightllm::OptimLaunch l{};
  l.hyper.algo = static_cast<lightllm::OptimAlgo>(algo);
  l.hyper.beta1 = static_cast<float>(beta1);
  l.hyper.beta2 = static_cast<float>(beta2);
  l.hyper.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  l.hyper.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  l.hyper.beta1_d = beta1;
  l.hyper.beta2_d = beta2;
  l.hyper.weight_decay_d = weight_decay;
  l.hyper.eps = static_cast<float>(eps);
  l.hyper.weight_decay = static_cast<float>(weight_decay);
  l.hyper.maximize = maximize;
  l.hyper.nesterov = nesterov;
  l.tensors = reinterpret_cast<const lightllm::OptimDeviceTensor*>(table.data_ptr<int64_t>());
  l.work_tensor = work_tensor.data_ptr<int32_t>();
  l.work_block = work_block.data_ptr<int32_t>();
  l.n_work = work_tensor.numel();
  l.skip = skip.data_ptr<int32_t>();
  l.map1 = qmap1.data_ptr<float>();
  l.map2 = qmap2.data_ptr<float>();
  l.lr = lr.data_ptr<float>();
  l.grad_scale = grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr;
  l.found_inf = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  if (grad_scale.has_value())
    TORCH_CHECK(grad_scale->is_cuda() && grad_scale->scalar_type() == at::kFloat, op, ": grad_scale must be a float32 CUDA tensor");
  if (found_inf.has_value())
    TORCH_CHECK(found_inf->is_cuda() && found_inf->scalar_type() == at::kFloat, op, ": found_inf must be a float32 CUDA tensor");
  check_launch(op, lightllm::launch_optimizer_step(l, float_type_of(like.scalar_type(), op, "param"), state8,
                                                   c10::cuda::getCurrentCUDAStream().stream()));
#else
  TORCH_CHECK(false, op, ": lightllm._C was built without CUDA kernels");
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lightllm native kernels (C++ CPU and CUDA)";
  m.def("quantize_blockwise", &quantize_blockwise, "block-wise 8-bit quantization (CPU or CUDA tensor)",
        py::arg("x"), py::arg("code"), py::arg("blocksize"));
  m.def("dequantize_blockwise", &dequantize_blockwise, "block-wise 8-bit dequantization (CPU or CUDA tensor)",
        py::arg("codes"), py::arg("absmax"), py::arg("code"), py::arg("blocksize"), py::arg("dtype"));
  m.def("gptq_dequantize", &gptq_dequantize, "GPTQ weight -> dense [N, K] (CUDA tensors)", py::arg("qweight"),
        py::arg("qzeros"), py::arg("scales"), py::arg("g_idx"), py::arg("bits"), py::arg("zeros_v1"), py::arg("dtype"));
  m.def("gptq_matmul", &gptq_matmul,
        "x @ W^T + bias + s * S B^T with W in the GPTQ layout, S given or x A^T (CUDA tensors)",
        py::arg("x"), py::arg("qweight"), py::arg("qzeros"), py::arg("scales"), py::arg("g_idx"), py::arg("bias"),
        py::arg("lora_a"), py::arg("lora_s"), py::arg("lora_b"), py::arg("lora_scale"), py::arg("bits"),
        py::arg("zeros_v1"));
  m.def("lora_decode", &lora_decode,
        "(x W^T + bias + s * (x A^T) B^T, x A^T) for up to 16 rows of x in one launch (CUDA tensors)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("lora_a"), py::arg("lora_b"), py::arg("scale"));
  m.def("optimizer_step_cpu", &optimizer_step_cpu, "fused optimizer step for a list of CPU parameters",
        py::arg("algo"), py::arg("params"), py::arg("grads"), py::arg("state1"), py::arg("state2"),
        py::arg("absmax1"), py::arg("absmax2"), py::arg("steps"), py::arg("qmap1"), py::arg("qmap2"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("maximize"),
        py::arg("nesterov"), py::arg("grad_scale"), py::arg("found_inf"));
  m.def("optimizer_step_cuda", &optimizer_step_cuda, "fused optimizer step for CUDA parameters (one launch)",
        py::arg("algo"), py::arg("table"), py::arg("work_tensor"), py::arg("work_block"), py::arg("skip"),
        py::arg("like"), py::arg("state8"), py::arg("qmap1"), py::arg("qmap2"), py::arg("lr"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("maximize"), py::arg("nesterov"),
        py::arg("grad_scale"), py::arg("found_inf"));
  m.def("built_with_cuda", &built_with_cuda);
  m.attr("torch_version") = LIGHTLLM_TORCH_VERSION;
#ifdef LIGHTLLM_WITH_CUDA
  m.attr("cuda_gencode") = LIGHTLLM_CUDA_GENCODE;
#else
  m.attr("cuda_gencode") = "";
#endif
}
