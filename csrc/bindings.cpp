// lightllm._C, the C++ CPU kernels: the only translation unit of this module that sees
// at::Tensor (argument checks, output allocation, torch's thread pool), then a call into the
// torch-free kernel files. No CUDA here at all: the CUDA kernels are lightllm._C_cuda
// (bindings_cuda.cpp), so a CUDA module that fails to load never takes these with it.
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <string>
#include <torch/extension.h>
#include <vector>

#include "blockwise.h"
#include "checks.h"
#include "gptq.h"
#include "optim.h"

namespace {

using lightllm::check_blocksize;
using lightllm::check_map;
using lightllm::float_type_of;
using lightllm::FloatType;

// Blocks per task for torch's CPU thread pool: about 64K values each.
int64_t cpu_grain(int64_t blocksize) { return std::max<int64_t>(1, 65536 / blocksize); }

void check_cpu(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.is_cpu(), op, ": lightllm._C takes CPU tensors, got one on ", t.device(),
              " (CUDA tensors go to lightllm._C_cuda)");
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise(const at::Tensor& x, const at::Tensor& map,
                                                      int64_t blocksize) {
  constexpr const char* op = "quantize_blockwise";
  const FloatType x_type = float_type_of(x.scalar_type(), op, "x");
  check_blocksize(op, blocksize);
  check_map(op, map, x);
  check_cpu(op, x);
  const at::Tensor xc = x.contiguous();
  const at::Tensor mapc = map.contiguous();
  const int64_t n = xc.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, x.options().dtype(at::kFloat));
  if (n == 0) return {codes, absmax};
  const void* xp = xc.data_ptr();
  const auto search = lightllm::code_search_for(mapc.data_ptr<float>());
  uint8_t* cp = codes.data_ptr<uint8_t>();
  float* ap = absmax.data_ptr<float>();
  at::parallel_for(0, nblocks, cpu_grain(blocksize), [&](int64_t begin, int64_t end) {
    lightllm::quantize_blockwise_cpu(xp, x_type, *search, cp, ap, n, blocksize, begin, end);
  });
  return {codes, absmax};
}

at::Tensor dequantize_blockwise(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& map,
                                int64_t blocksize, at::ScalarType dtype) {
  constexpr const char* op = "dequantize_blockwise";
  const FloatType out_type = float_type_of(dtype, op, "dtype");
  lightllm::check_dequantize_args(op, codes, absmax, map, blocksize);
  check_cpu(op, codes);
  const int64_t n = codes.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const at::Tensor cc = codes.contiguous();
  const at::Tensor ac = absmax.contiguous();
  const at::Tensor mapc = map.contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(dtype));
  if (n == 0) return out;
  const uint8_t* cp = cc.data_ptr<uint8_t>();
  const float* ap = ac.data_ptr<float>();
  const float* mp = mapc.data_ptr<float>();
  void* op_out = out.data_ptr();
  at::parallel_for(0, nblocks, cpu_grain(blocksize), [&](int64_t begin, int64_t end) {
    lightllm::dequantize_blockwise_cpu(cp, ap, mp, op_out, out_type, n, blocksize, begin, end);
  });
  return out;
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

// ---- GPTQ -----------------------------------------------------------------------------------
// Argument problems raise ValueError (TORCH_CHECK_VALUE), wrong dtypes TypeError, as the Python
// layer does; a wrong tensor is refused before any pointer is read.

// Rows of x up to which the GEMV serves (one pass over the weight per block of up to 16 rows);
// above, the weight is dequantized once to float32 and multiplied by torch's GEMM. Measured on a
// 2-core EPYC at 4096 x 4096, 4 bits: the GEMV is ahead at 256 rows (float16 x 0.8x the time,
// bfloat16 0.6x) and even with dequantize + GEMM at 512 for float16.
constexpr int64_t kGptqGemvMaxRows = 256;

lightllm::CpuIsa gptq_isa(const std::string& isa) {
  const lightllm::CpuIsa best = lightllm::gptq_cpu_best_isa();
  if (isa == "auto") return best;
  lightllm::CpuIsa want;
  if (isa == "avx512bf16") want = lightllm::CpuIsa::kAvx512Bf16;
  else if (isa == "avx512") want = lightllm::CpuIsa::kAvx512;
  else if (isa == "avx2") want = lightllm::CpuIsa::kAvx2;
  else if (isa == "scalar") want = lightllm::CpuIsa::kScalar;
  else TORCH_CHECK_VALUE(false, "gptq_matmul: isa must be 'auto', 'avx512bf16', 'avx512', 'avx2' or 'scalar', got '", isa,
                         "'");
  TORCH_CHECK_VALUE(static_cast<int>(want) <= static_cast<int>(best), "gptq_matmul: this CPU cannot run the ", isa,
                    " kernel (the widest it runs is ", lightllm::cpu_isa_name(best), ")");
  return want;
}

void check_cpu_arg(const char* op, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cpu(), op, ": lightllm._C takes CPU tensors, got one on ", t.device(),
                    " (CUDA tensors go to lightllm._C_cuda)");
}

FloatType float_arg(const char* op, const at::Tensor& t, const char* what) {
  const at::ScalarType st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, ": ", what,
                   " must be float32, float16 or bfloat16, got ", st);
  return float_type_of(st, op, what);
}

// The GPTQ tensors (gptq_format.py): qweight [K * bits / 32, N], qzeros [G, N * bits / 32],
// scales [G, N], g_idx [K], every g_idx naming one of the G groups (checked: the kernels index
// scales and qzeros with it).
void check_gptq_cpu(const char* op, const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                    const at::Tensor& g_idx, int64_t bits) {
  TORCH_CHECK_VALUE(bits == 2 || bits == 3 || bits == 4 || bits == 8, op, ": bits must be 2, 3, 4 or 8, got ", bits);
  for (const at::Tensor* t : {&qweight, &qzeros, &scales, &g_idx}) check_cpu_arg(op, *t);
  TORCH_CHECK_TYPE(qweight.scalar_type() == at::kInt && qzeros.scalar_type() == at::kInt &&
                       g_idx.scalar_type() == at::kInt,
                   op, ": qweight, qzeros and g_idx must be int32, got ", qweight.scalar_type(), ", ",
                   qzeros.scalar_type(), " and ", g_idx.scalar_type());
  float_arg(op, scales, "scales");
  TORCH_CHECK_VALUE(qweight.dim() == 2 && qzeros.dim() == 2 && scales.dim() == 2 && g_idx.dim() == 1, op,
                    ": expected qweight [K*bits/32, N], qzeros [G, N*bits/32], scales [G, N], g_idx [K]; got ",
                    qweight.sizes(), ", ", qzeros.sizes(), ", ", scales.sizes(), ", ", g_idx.sizes());
  const int64_t n = qweight.size(1), k = g_idx.size(0);
  const int64_t chunk = bits == 3 ? 32 : 32 / bits;
  TORCH_CHECK_VALUE(k % chunk == 0 && qweight.size(0) == k * bits / 32, op, ": qweight ", qweight.sizes(),
                    " does not hold K = ", k, " (g_idx's length) ", bits, "-bit values; K must be a multiple of ",
                    chunk);
  TORCH_CHECK_VALUE(n % chunk == 0 && qzeros.size(1) == n * bits / 32 && scales.size(1) == n &&
                        scales.size(0) == qzeros.size(0),
                    op, ": qzeros ", qzeros.sizes(), " and scales ", scales.sizes(), " do not match N = ", n, " at ",
                    bits, " bits (N must be a multiple of ", chunk, ")");
  TORCH_CHECK_VALUE(k == 0 || scales.size(0) > 0, op, ": scales and qzeros hold no groups for K = ", k);
}

// Segments of k over which g_idx is constant, at most kGptqCpuSegmentMax long: (start of each, then
// K) and its group. Returns the number of runs of equal g_idx (before the cuts). Refuses a g_idx
// outside [0, G).
int64_t gptq_segments(const char* op, const at::Tensor& g_idx, int64_t groups, std::vector<int32_t>& starts,
                      std::vector<int32_t>& group_of) {
  const int32_t* g = g_idx.data_ptr<int32_t>();
  const int64_t k = g_idx.numel();
  starts.clear();
  group_of.clear();
  int64_t runs = 0, run_start = 0;
  for (int64_t i = 0; i < k; ++i) {
    const bool new_run = i == 0 || g[i] != g[i - 1];
    if (new_run) {
      TORCH_CHECK_VALUE(g[i] >= 0 && g[i] < groups, op, ": g_idx[", i, "] = ", g[i], " names no group (scales and ",
                        "qzeros hold ", groups, ")");
      ++runs;
      run_start = i;
    }
    if (new_run || (i - run_start) % lightllm::kGptqCpuSegmentMax == 0) {
      starts.push_back(static_cast<int32_t>(i));
      group_of.push_back(g[i]);
    }
  }
  starts.push_back(static_cast<int32_t>(k));
  return runs;
}

at::Tensor gptq_dequantize_cpu(const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                               const at::Tensor& g_idx, int64_t bits, bool zeros_v1, at::ScalarType dtype) {
  constexpr const char* op = "gptq_dequantize";
  check_gptq_cpu(op, qweight, qzeros, scales, g_idx, bits);
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble, op,
                   ": dtype must be float32, float16, bfloat16 or float64, got ", dtype);
  // float64 (the tests' exact weight): the float32 values s * (q - z), as the reference computes them.
  if (dtype == at::kDouble) return gptq_dequantize_cpu(qweight, qzeros, scales, g_idx, bits, zeros_v1, at::kFloat).to(dtype);
  const FloatType out_type = float_type_of(dtype, op, "dtype");
  const int64_t n = qweight.size(1), k = g_idx.size(0), groups = scales.size(0);
  at::Tensor out = at::empty({n, k}, scales.options().dtype(dtype));
  if (n == 0 || k == 0) return out;
  const at::Tensor qw = qweight.contiguous(), qz = qzeros.contiguous(), sc = scales.contiguous(),
                   gi = g_idx.contiguous();
  std::vector<int32_t> starts, group_of;
  gptq_segments(op, gi, groups, starts, group_of);  // the range check
  const int32_t* qwp = qw.data_ptr<int32_t>();
  const int32_t* qzp = qz.data_ptr<int32_t>();
  const int32_t* gip = gi.data_ptr<int32_t>();
  const void* scp = sc.data_ptr();
  const FloatType scales_type = float_type_of(sc.scalar_type(), op, "scales");
  void* outp = out.data_ptr();
  const int64_t cols = lightllm::kGptqCpuDequantizeCols;
  at::parallel_for(0, (n + cols - 1) / cols, 1, [&](int64_t begin, int64_t end) {
    lightllm::gptq_dequantize_cpu(qwp, qzp, scp, scales_type, gip, groups, n, k, static_cast<int>(bits),
                                  zeros_v1 ? 1 : 0, outp, out_type, begin * cols, std::min(n, end * cols));
  });
  return out;
}

// y = x W^T + bias + lora_scale * S lora_b^T, S = lora_s or x lora_a^T: the GEMV for up to
// kGptqGemvMaxRows rows, dequantize + GEMM above. The rank-r term is computed by torch in float32
// (S, then S B^T: [M, r] and [M, N], small next to the weight) and added by the kernel's epilogue
// with the bias, before the one rounding to x's dtype.
at::Tensor gptq_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                           const at::Tensor& scales, const at::Tensor& g_idx, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_s,
                           const std::optional<at::Tensor>& lora_b, double lora_scale, int64_t bits, bool zeros_v1,
                           const std::string& isa_name) {
  constexpr const char* op = "gptq_matmul";
  check_gptq_cpu(op, qweight, qzeros, scales, g_idx, bits);
  check_cpu_arg(op, x);
  const FloatType x_type = float_arg(op, x, "x");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == g_idx.size(0), op, ": x must be [M, K] with K = ", g_idx.size(0),
                    " (g_idx's length), got ", x.sizes());
  const lightllm::CpuIsa isa = gptq_isa(isa_name);
  const int64_t m = x.size(0), n = qweight.size(1), k = x.size(1), groups = scales.size(0);
  if (bias.has_value()) {
    check_cpu_arg(op, *bias);
    float_arg(op, *bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, op, ": bias must be [", n, "], got ", bias->sizes());
  }
  TORCH_CHECK_VALUE((lora_a.has_value() || lora_s.has_value()) == lora_b.has_value(), op,
                    ": lora_b goes with lora_a or lora_s (the rank-r term needs both factors)");
  int64_t r = 0;
  if (lora_b.has_value()) {
    r = lora_b->dim() == 2 ? lora_b->size(1) : -1;
    TORCH_CHECK_VALUE(lora_b->dim() == 2 && lora_b->size(0) == n && r >= 1, op, ": lora_b must be [N, r] = [", n,
                      ", r] with r >= 1, got ", lora_b->sizes());
    if (lora_a.has_value())
      TORCH_CHECK_VALUE(lora_a->dim() == 2 && lora_a->size(0) == r && lora_a->size(1) == k, op,
                        ": lora_a must be [r, K] = [", r, ", ", k, "], got ", lora_a->sizes());
    if (lora_s.has_value())
      TORCH_CHECK_VALUE(lora_s->dim() == 2 && lora_s->size(0) == m && lora_s->size(1) == r, op,
                        ": lora_s must be [M, r] = [", m, ", ", r, "], got ", lora_s->sizes());
    for (const auto* t : {&lora_a, &lora_s, &lora_b})
      if (t->has_value()) {
        check_cpu_arg(op, **t);
        float_arg(op, **t, "the adapter tensors");
      }
  }
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  const at::Tensor qw = qweight.contiguous(), qz = qzeros.contiguous(), sc = scales.contiguous(),
                   gi = g_idx.contiguous();
  std::vector<int32_t> starts, group_of;
  const int64_t runs = gptq_segments(op, gi, groups, starts, group_of);
  const auto blocks = lightllm::gptq_cpu_row_blocks(m, isa);
  const int64_t rows = blocks.back().row0 + blocks.back().rows;  // x padded with zero rows up to the blocks

  at::Tensor xf = at::zeros({rows, k}, x.options().dtype(at::kFloat));
  xf.narrow(0, 0, m).copy_(x);
  at::Tensor addend;  // the rank-r term in float32, [M, N]
  if (r > 0) {
    const at::Tensor s = lora_s.has_value() ? lora_s->to(at::kFloat) : at::matmul(xf.narrow(0, 0, m), lora_a->to(at::kFloat).t());
    addend = at::mm(s, lora_b->to(at::kFloat).t()).mul_(lora_scale).contiguous();
  }
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();

  if (m > kGptqGemvMaxRows && k > 0) {
    // Compute-bound: dequantize once (float32) and let torch's GEMM do the rest.
    const at::Tensor weight = gptq_dequantize_cpu(qw, qz, sc, gi, bits, zeros_v1, at::kFloat);
    at::Tensor acc = at::mm(xf.narrow(0, 0, m), weight.t());
    if (r > 0) acc.add_(addend);
    if (bias.has_value()) acc.add_(bias_c.to(at::kFloat));
    y.copy_(acc);
    return y;
  }

  const int64_t segments = static_cast<int64_t>(group_of.size());
  std::vector<float> xsum(std::max<int64_t>(rows * segments, 1));
  lightllm::gptq_cpu_segment_sums(xf.data_ptr<float>(), rows, k, starts.data(), segments, xsum.data());
  std::vector<float> xi(rows * k);
  lightllm::gptq_cpu_interleave(xf.data_ptr<float>(), k, blocks, xi.data());
  lightllm::GptqCpuGemv p{};
  p.x = xi.data();
  p.xsum = xsum.data();
  // The bf16 path (float16 / bfloat16 x on CPUs with AVX512-BF16): x's pairs in 2 bf16 parts for
  // float16 (11 significant bits), 1 for bfloat16.
  std::vector<uint32_t> xpairs;
  std::vector<float> xoff;
  p.xparts = 0;
  if (lightllm::gptq_cpu_uses_dp(isa, x_type, static_cast<int>(bits), lightllm::gptq_cpu_per_k(runs, k, static_cast<int>(bits)))) {
    p.xparts = x_type == FloatType::kFloat16 ? 2 : 1;
    xpairs.resize(std::max<int64_t>(rows * k / 2 * p.xparts, 1));
    xoff.resize(xsum.size());
    lightllm::gptq_cpu_prepare_dp(xf.data_ptr<float>(), k, blocks, static_cast<int>(bits), p.xparts, starts.data(),
                                  segments, xpairs.data(), xoff.data());
    p.xpairs = xpairs.data();
    p.xoff = xoff.data();
  }
  p.seg_start = starts.data();
  p.seg_group = group_of.data();
  p.segments = segments;
  p.per_k = lightllm::gptq_cpu_per_k(runs, k, static_cast<int>(bits));
  p.g_idx = gi.data_ptr<int32_t>();
  p.groups = groups;
  p.m = m;
  p.k = k;
  p.n = n;
  p.qweight = qw.data_ptr<int32_t>();
  p.qzeros = qz.data_ptr<int32_t>();
  p.scales = sc.data_ptr();
  p.scales_type = float_type_of(sc.scalar_type(), op, "scales");
  p.bits = static_cast<int>(bits);
  p.zero_offset = zeros_v1 ? 1 : 0;
  p.bias = bias.has_value() ? bias_c.data_ptr() : nullptr;
  p.bias_type = bias.has_value() ? float_type_of(bias_c.scalar_type(), op, "bias") : FloatType::kFloat32;
  p.addend = r > 0 ? addend.data_ptr<float>() : nullptr;
  p.y = y.data_ptr();
  p.y_type = x_type;
  for (const auto& block : blocks) {
    const int64_t cols = lightllm::gptq_cpu_tile_cols(block.rows, static_cast<int>(bits), isa);
    at::parallel_for(0, (n + cols - 1) / cols, 1, [&](int64_t begin, int64_t end) {
      lightllm::gptq_gemv_cpu(p, block, isa, begin, end);
    });
  }
  return y;
}

}  // namespace

namespace lightllm {
void bind_bnb_cpu(pybind11::module_& m);  // bindings_bnb.cpp: 4-bit NF4/FP4 and LLM.int8 kernels
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lightllm C++ CPU kernels (the CUDA kernels are lightllm._C_cuda)";
  m.def("quantize_blockwise", &quantize_blockwise, "block-wise 8-bit quantization (CPU tensor)",
        py::arg("x"), py::arg("code"), py::arg("blocksize"));
  m.def("dequantize_blockwise", &dequantize_blockwise, "block-wise 8-bit dequantization (CPU tensor)",
        py::arg("codes"), py::arg("absmax"), py::arg("code"), py::arg("blocksize"), py::arg("dtype"));
  m.def("optimizer_step_cpu", &optimizer_step_cpu, "fused optimizer step for a list of CPU parameters",
        py::arg("algo"), py::arg("params"), py::arg("grads"), py::arg("state1"), py::arg("state2"),
        py::arg("absmax1"), py::arg("absmax2"), py::arg("steps"), py::arg("qmap1"), py::arg("qmap2"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("maximize"),
        py::arg("nesterov"), py::arg("grad_scale"), py::arg("found_inf"));
  m.def("gptq_dequantize", &gptq_dequantize_cpu, "GPTQ weight -> dense [N, K] (CPU tensors)", py::arg("qweight"),
        py::arg("qzeros"), py::arg("scales"), py::arg("g_idx"), py::arg("bits"), py::arg("zeros_v1"), py::arg("dtype"));
  m.def("gptq_matmul", &gptq_matmul_cpu,
        "x @ W^T + bias + s * S B^T with W in the GPTQ layout, S given or x A^T (CPU tensors); isa: 'auto' (the "
        "widest this CPU runs), 'avx512bf16', 'avx512', 'avx2' or 'scalar'",
        py::arg("x"), py::arg("qweight"), py::arg("qzeros"), py::arg("scales"), py::arg("g_idx"), py::arg("bias"),
        py::arg("lora_a"), py::arg("lora_s"), py::arg("lora_b"), py::arg("lora_scale"), py::arg("bits"),
        py::arg("zeros_v1"), py::arg("isa") = "auto");
  m.def("gptq_cpu_isa", [] { return std::string(lightllm::cpu_isa_name(lightllm::gptq_cpu_best_isa())); },
        "the widest instruction set the CPU GPTQ kernels use on this CPU: 'avx512bf16', 'avx512', 'avx2' or 'scalar'");
  m.attr("torch_version") = LIGHTLLM_TORCH_VERSION;
  lightllm::bind_bnb_cpu(m);
}
