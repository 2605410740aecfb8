// lightllm._C, the C++ CPU kernels: the only translation unit of this module that sees
// at::Tensor (argument checks, output allocation, torch's thread pool), then a call into the
// torch-free kernel files. No CUDA here at all: the CUDA kernels are lightllm._C_cuda
// (bindings_cuda.cpp), so a CUDA module that fails to load never takes these with it.
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <torch/extension.h>

#include "blockwise.h"
#include "checks.h"
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
  m.attr("torch_version") = LIGHTLLM_TORCH_VERSION;
  lightllm::bind_bnb_cpu(m);
}
