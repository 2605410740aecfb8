// lightllm._C_cuda, the CUDA kernels: the only translation unit of this module that sees
// at::Tensor (argument checks, output allocation, stream selection), then a call into the
// torch-free launchers of the .cu files. A module of its own, apart from the C++ CPU kernels
// (lightllm._C, bindings.cpp), so that a failure to load CUDA code never takes those with it.
#include <algorithm>
#include <map>
#include <mutex>
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "blockwise.h"
#include "checks.h"
#include "fourbit.h"
#include "gptq.h"
#include "lora.h"
#include "optim.h"

namespace {

using lightllm::check_blocksize;
using lightllm::check_map;
using lightllm::float_type_of;
using lightllm::FloatType;

void check_launch(const char* op, int error) {
  TORCH_CHECK(error == 0, op, ": CUDA launch failed: ", lightllm::cuda_error_string(error));
}

void check_cuda(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": lightllm._C_cuda takes CUDA tensors, got one on ", t.device(),
              " (CPU tensors go to lightllm._C)");
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise(const at::Tensor& x, const at::Tensor& map,
                                                      int64_t blocksize) {
  constexpr const char* op = "quantize_blockwise";
  const FloatType x_type = float_type_of(x.scalar_type(), op, "x");
  check_blocksize(op, blocksize);
  check_map(op, map, x);
  check_cuda(op, x);
  const at::Tensor xc = x.contiguous();
  const at::Tensor mapc = map.contiguous();
  const int64_t n = xc.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, x.options().dtype(at::kFloat));
  if (n == 0) return {codes, absmax};
  const c10::cuda::CUDAGuard guard(xc.device());
  check_launch(op, lightllm::launch_quantize_blockwise(
                       xc.data_ptr(), x_type, mapc.data_ptr<float>(), codes.data_ptr<uint8_t>(),
                       absmax.data_ptr<float>(), n, blocksize, c10::cuda::getCurrentCUDAStream().stream()));
  return {codes, absmax};
}

at::Tensor dequantize_blockwise(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& map,
                                int64_t blocksize, at::ScalarType dtype) {
  constexpr const char* op = "dequantize_blockwise";
  const FloatType out_type = float_type_of(dtype, op, "dtype");
  lightllm::check_dequantize_args(op, codes, absmax, map, blocksize);
  check_cuda(op, codes);
  const int64_t n = codes.numel();
  const at::Tensor cc = codes.contiguous();
  const at::Tensor ac = absmax.contiguous();
  const at::Tensor mapc = map.contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(dtype));
  if (n == 0) return out;
  const c10::cuda::CUDAGuard guard(cc.device());
  check_launch(op, lightllm::launch_dequantize_blockwise(
                       cc.data_ptr<uint8_t>(), ac.data_ptr<float>(), mapc.data_ptr<float>(), out.data_ptr(),
                       out_type, n, blocksize, c10::cuda::getCurrentCUDAStream().stream()));
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
  const c10::cuda::CUDAGuard guard(qweight.device());
  const at::Tensor qw = qweight.contiguous(), qz = qzeros.contiguous(), sc = scales.contiguous(), gi = g_idx.contiguous();
  check_launch(op, lightllm::launch_gptq_dequantize(
                       qw.data_ptr<int32_t>(), qz.data_ptr<int32_t>(), sc.data_ptr(),
                       float_type_of(sc.scalar_type(), op, "scales"), gi.data_ptr<int32_t>(), n, k, static_cast<int>(bits),
                       zeros_v1 ? 1 : 0, out.data_ptr(), out_type, c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

// Counters for the split reductions of the one-launch GEMVs (split_lora.cuh). Every launch leaves
// its counters at zero, so outside graph capture one buffer per (device, stream) serves all launches
// on that stream (they run in order); replacing it when it grows is safe, since the caching
// allocator gives the old memory only to later work on the same stream. While the stream is
// capturing, a launch gets a buffer of its own from the graph's memory pool instead: the zeroing is
// captured with the kernel, so each graph owns its counters and every replay starts from zero,
// however the cache grows later and whichever streams replay graphs at the same time.
using CounterKey = std::pair<c10::DeviceIndex, cudaStream_t>;
std::mutex counter_mutex;
// Never destroyed: a static tensor would be freed after CUDA at exit.
auto* const counter_cache = new std::map<CounterKey, at::Tensor>();

CounterKey counter_key(const at::Tensor& like) {
  return {like.device().index(), c10::cuda::getCurrentCUDAStream(like.device().index()).stream()};
}

at::Tensor split_counters(const at::Tensor& like, int64_t count) {
  const CounterKey key = counter_key(like);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(key.second, &capture));
  if (capture != cudaStreamCaptureStatusNone)
    return at::zeros({std::max<int64_t>(count, 1)}, like.options().dtype(at::kInt));
  const std::lock_guard<std::mutex> lock(counter_mutex);
  at::Tensor& slot = (*counter_cache)[key];
  if (!slot.defined() || slot.numel() < count)
    slot = at::zeros({std::max<int64_t>(count, 1024)}, like.options().dtype(at::kInt));
  return slot;
}

// Checks a split-reduction launch. A failed one may have left counters part-way (CTAs that counted
// in before the failure), so its cached buffer is dropped: the next launch gets a fresh zeroed one.
void check_split_launch(const char* op, int error, const at::Tensor& like, const at::Tensor& counters) {
  if (error != 0) {
    const std::lock_guard<std::mutex> lock(counter_mutex);
    const auto it = counter_cache->find(counter_key(like));
    if (it != counter_cache->end() && it->second.is_same(counters)) counter_cache->erase(it);
  }
  check_launch(op, error);
}

// Contiguous and 16-byte aligned (for vector loads): a view that starts off a boundary is copied.
at::Tensor aligned16(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

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
    check_split_launch(op, lightllm::launch_gptq_gemv(p, c10::cuda::getCurrentCUDAStream().stream()), x, counters);
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
  check_split_launch(op, lightllm::launch_lora_decode(p, c10::cuda::getCurrentCUDAStream().stream()), x, counters);
  return {y, s};
}

// One launch of the fused optimizer step over the tensors listed in `table` (int64 [n, 9], built and
// cached by lightllm/ops/optim.py; see OptimDeviceTensor). `like`: one of the parameters (dtype, device).
void optimizer_step_cuda(int64_t algo, const at::Tensor& table, const at::Tensor& work_tensor,
                         const at::Tensor& work_block, const at::Tensor& skip, const at::Tensor& like, bool state8,
                         const at::Tensor& qmap1, const at::Tensor& qmap2, const at::Tensor& lr, double beta1,
                         double beta2, double eps, double weight_decay, bool maximize, bool nesterov,
                         const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "optimizer_step_cuda";
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
}

// ---- bitsandbytes' 4-bit NF4 / FP4 (csrc/fourbit.cu) --------------------------------------------
// Argument errors are ValueErrors naming the tensor, as the C++ CPU module's (bindings_bnb.cpp).

bool fourbit_blocksize_ok(int64_t blocksize) {
  return blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0;
}

// The block absmax of n values (float32, or uint8 codes with the double-quantization state), on
// `device`; holds the contiguous tensors the launch reads.
struct FourBitScaleTensors {
  at::Tensor absmax, nested_absmax, nested_code, nested_offset;
  lightllm::FourBitScales view() const {
    lightllm::FourBitScales s{};
    s.absmax = absmax.data_ptr();
    if (nested_absmax.defined()) {
      s.nested_absmax = nested_absmax.data_ptr<float>();
      s.nested_code = nested_code.data_ptr<float>();
      s.nested_offset = nested_offset.data_ptr<float>();
    }
    return s;
  }
};

FourBitScaleTensors check_fourbit(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                                  const std::optional<at::Tensor>& nested_absmax,
                                  const std::optional<at::Tensor>& nested_code, int64_t nested_blocksize,
                                  const std::optional<at::Tensor>& nested_offset, const at::Tensor& code,
                                  int64_t blocksize, int64_t n, const at::Device& device, bool exact) {
  TORCH_CHECK_VALUE(fourbit_blocksize_ok(blocksize), op, ": blocksize must be a power of two from 32 to 4096, got ",
                    blocksize);
  TORCH_CHECK_VALUE(packed.scalar_type() == at::kByte, op, ": packed must be uint8 bytes, got ", packed.scalar_type());
  TORCH_CHECK_VALUE(exact ? packed.numel() == (n + 1) / 2 : packed.numel() >= (n + 1) / 2, op, ": packed holds ", packed.numel(), " bytes; ", n,
                    " 4-bit values need ", (n + 1) / 2);
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  TORCH_CHECK_VALUE(exact ? absmax.numel() == blocks : absmax.numel() >= blocks, op, ": absmax holds ", absmax.numel(), " values; ", n,
                    " values at blocksize ", blocksize, " need ", blocks);
  TORCH_CHECK_VALUE(code.scalar_type() == at::kFloat && code.numel() == 16, op,
                    ": code must be the 16 float32 values of the 4-bit type");
  FourBitScaleTensors t;
  t.absmax = absmax.reshape({-1}).contiguous();
  if (nested_absmax.has_value()) {
    TORCH_CHECK_VALUE(absmax.scalar_type() == at::kByte, op, ": double-quantized absmax must be uint8 codes, got ",
                      absmax.scalar_type());
    TORCH_CHECK_VALUE(nested_code.has_value() && nested_offset.has_value(), op,
                      ": double quantization needs nested_absmax, nested_code and nested_offset");
    TORCH_CHECK_VALUE(nested_blocksize >= 1, op, ": nested_blocksize must be a positive int, got ", nested_blocksize);
    const int64_t nested_blocks = (blocks + nested_blocksize - 1) / nested_blocksize;
    TORCH_CHECK_VALUE(nested_absmax->scalar_type() == at::kFloat &&
                          (exact ? nested_absmax->numel() == nested_blocks : nested_absmax->numel() >= nested_blocks),
                      op,
                      ": nested_absmax must hold ", nested_blocks, " float32 values for ", blocks,
                      " absmax codes at nested_blocksize ", nested_blocksize, ", got ", nested_absmax->numel(), " ",
                      nested_absmax->scalar_type());
    TORCH_CHECK_VALUE(nested_code->scalar_type() == at::kFloat && nested_code->numel() == 256, op,
                      ": nested_code must be the 256 float32 values of the 8-bit map");
    TORCH_CHECK_VALUE(nested_offset->numel() == 1 && nested_offset->is_floating_point(), op,
                      ": nested_offset must be one float");
    t.nested_absmax = nested_absmax->reshape({-1}).contiguous();
    t.nested_code = nested_code->contiguous();
    t.nested_offset = nested_offset->reshape({1}).to(at::kFloat).contiguous();
  } else {
    TORCH_CHECK_VALUE(absmax.scalar_type() == at::kFloat, op, ": absmax must be float32, got ", absmax.scalar_type());
  }
  for (const at::Tensor* x : std::initializer_list<const at::Tensor*>{&packed, &absmax, &code, &t.nested_absmax,
                                                                      &t.nested_code, &t.nested_offset}) {
    if (!x->defined()) continue;
    TORCH_CHECK_VALUE(x->is_cuda() && x->device() == device, op, ": all tensors must be on ", device,
                      ", one is on ", x->device());
  }
  return t;
}

at::Tensor fourbit_dequantize_into(const char* op, const at::Tensor& packed, const FourBitScaleTensors& scales,
                                   int64_t nested_blocksize, const at::Tensor& code, int64_t blocksize, int64_t n,
                                   at::ScalarType dtype) {
  const FloatType out_type = float_type_of(dtype, op, "dtype");
  at::Tensor out = at::empty({n}, packed.options().dtype(dtype));
  if (n == 0) return out;
  const c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor pc = packed.reshape({-1}).contiguous(), cc = code.contiguous();
  lightllm::FourBitScales s = scales.view();
  s.nested_blocksize = nested_blocksize;
  check_launch(op, lightllm::launch_fourbit_dequantize(pc.data_ptr<uint8_t>(), s, cc.data_ptr<float>(), blocksize, n,
                                                       out.data_ptr(), out_type,
                                                       c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

at::Tensor dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax,
                           const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                           int64_t nested_blocksize, const std::optional<at::Tensor>& nested_offset,
                           const at::Tensor& code, int64_t blocksize, int64_t n, at::ScalarType dtype) {
  constexpr const char* op = "dequantize_4bit";
  TORCH_CHECK_VALUE(n >= 0, op, ": n must be >= 0, got ", n);
  check_cuda(op, packed);
  const FourBitScaleTensors scales = check_fourbit(op, packed, absmax, nested_absmax, nested_code, nested_blocksize,
                                                   nested_offset, code, blocksize, n, packed.device(), false);
  return fourbit_dequantize_into(op, packed, scales, nested_blocksize, code, blocksize, n, dtype);
}

at::Tensor matmul_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                       const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                       int64_t nested_blocksize, const std::optional<at::Tensor>& nested_offset,
                       const at::Tensor& code, int64_t blocksize, int64_t out_features,
                       const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "matmul_4bit";
  check_cuda(op, x);
  const FloatType x_type = float_type_of(x.scalar_type(), op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension");
  TORCH_CHECK_VALUE(out_features >= 0, op, ": out_features must be >= 0, got ", out_features);
  const int64_t k = x.size(-1), n_out = out_features;
  const FourBitScaleTensors scales = check_fourbit(op, packed, absmax, nested_absmax, nested_code, nested_blocksize,
                                                   nested_offset, code, blocksize, n_out * k, x.device(), true);
  if (bias.has_value()) {
    float_type_of(bias->scalar_type(), op, "bias");
    TORCH_CHECK_VALUE(bias->numel() == n_out, op, ": bias has ", bias->numel(), " values, the layer has ", n_out,
                      " outputs");
    TORCH_CHECK_VALUE(bias->device() == x.device(), op, ": bias is on ", bias->device(), ", x on ", x.device());
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(n_out);
  const at::Tensor x2 = x.reshape({-1, k});
  const int64_t m = x2.size(0);
  if (m == 0 || n_out == 0) return at::empty(shape, x.options());
  const c10::cuda::CUDAGuard guard(x.device());
  if (m > lightllm::kFourBitGemvMaxRows || k == 0 || k % 32 != 0) {  // K = 0: no GEMV slices; the dense path
    // Prefill (or K the GEMV's 16-byte rows do not fit): dequantize once (the reference's bits) and cuBLAS.
    const at::Tensor w = fourbit_dequantize_into(op, packed, scales, nested_blocksize, code, blocksize, n_out * k,
                                                 x.scalar_type());
    const at::Tensor b = bias.has_value() ? bias->reshape({-1}).to(x.scalar_type()) : at::Tensor();
    return at::linear(x2, w.view({n_out, k}), b).view(shape);
  }
  const at::Tensor xc = aligned16(x2), pc = aligned16(packed.reshape({-1})), cc = code.contiguous();
  // rounded to x's dtype first, as the reference adds it
  const at::Tensor bias_f = bias.has_value() ? bias->reshape({-1}).to(x.scalar_type()).to(at::kFloat).contiguous()
                                             : at::Tensor();
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, x.device().index()));
  lightllm::FourBitGemvParams p{};
  p.x = xc.data_ptr();
  p.x_type = x_type;
  p.packed = pc.data_ptr<uint8_t>();
  p.scales = scales.view();
  p.scales.nested_blocksize = nested_blocksize;
  p.code = cc.data_ptr<float>();
  p.blocksize = blocksize;
  p.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  p.m = m;
  p.n = n_out;
  p.k = k;
  p.splits = lightllm::fourbit_gemv_splits(m, n_out, k, sm_count);
  at::Tensor out = at::empty({m, n_out}, x.options());
  p.y = out.data_ptr();
  const int64_t tiles = (n_out + lightllm::fourbit_gemv_rows_per_cta(m) - 1) / lightllm::fourbit_gemv_rows_per_cta(m);
  at::Tensor ws, counters;
  if (p.splits > 1) {
    ws = at::empty({p.splits, m, n_out}, x.options().dtype(at::kFloat));
    counters = split_counters(x2, tiles);
    p.ws = ws.data_ptr<float>();
    p.counters = counters.data_ptr<int32_t>();
  }
  const int error = lightllm::launch_fourbit_gemv(p, c10::cuda::getCurrentCUDAStream().stream());
  if (p.splits > 1) check_split_launch(op, error, x2, counters);
  else check_launch(op, error);
  return out.view(shape);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lightllm CUDA kernels (the C++ CPU kernels are lightllm._C)";
  m.def("quantize_blockwise", &quantize_blockwise, "block-wise 8-bit quantization (CUDA tensor)",
        py::arg("x"), py::arg("code"), py::arg("blocksize"));
  m.def("dequantize_blockwise", &dequantize_blockwise, "block-wise 8-bit dequantization (CUDA tensor)",
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
  m.def("optimizer_step_cuda", &optimizer_step_cuda, "fused optimizer step for CUDA parameters (one launch)",
        py::arg("algo"), py::arg("table"), py::arg("work_tensor"), py::arg("work_block"), py::arg("skip"),
        py::arg("like"), py::arg("state8"), py::arg("qmap1"), py::arg("qmap2"), py::arg("lr"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("maximize"), py::arg("nesterov"),
        py::arg("grad_scale"), py::arg("found_inf"));
  m.def("dequantize_4bit", &dequantize_4bit,
        "4-bit NF4/FP4 codes -> n values in dtype; absmax float32, or uint8 codes with the nested state (CUDA tensors)",
        py::arg("packed"), py::arg("absmax"), py::arg("nested_absmax"), py::arg("nested_code"),
        py::arg("nested_blocksize"), py::arg("nested_offset"), py::arg("code"), py::arg("blocksize"), py::arg("n"),
        py::arg("dtype"));
  m.def("matmul_4bit", &matmul_4bit,
        "x @ W^T + bias with W in 4-bit NF4/FP4: a GEMV up to 16 rows, dequantize + cuBLAS above (CUDA tensors)",
        py::arg("x"), py::arg("packed"), py::arg("absmax"), py::arg("nested_absmax"), py::arg("nested_code"),
        py::arg("nested_blocksize"), py::arg("nested_offset"), py::arg("code"), py::arg("blocksize"),
        py::arg("out_features"), py::arg("bias"));
  m.attr("torch_version") = LIGHTLLM_TORCH_VERSION;
  m.attr("cuda_gencode") = LIGHTLLM_CUDA_GENCODE;
}
