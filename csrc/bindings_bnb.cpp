// lightllm._C, the at::Tensor side of the bitsandbytes-format CPU kernels (4-bit NF4/FP4 and
// LLM.int8): argument checks (ValueError naming the shape, dtype or blocksize), output allocation
// and torch's thread pool; the kernels are in fourbit_cpu.cpp and int8_cpu.cpp. A bindings file of
// its own, added to the module by bind_bnb_cpu() from bindings.cpp.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>

#include "bnb_cpu.h"

namespace lightllm {
namespace {

constexpr int64_t kMaxGemvRows = 16;  // above: dequantize once, then torch's matmul

FloatType float_type_value(at::ScalarType t, const char* op, const char* what) {
  switch (t) {
    case at::kFloat: return FloatType::kFloat32;
    case at::kHalf: return FloatType::kFloat16;
    case at::kBFloat16: return FloatType::kBFloat16;
    default: TORCH_CHECK_VALUE(false, op, ": ", what, " must be float32, float16 or bfloat16, got ", t);
  }
}

void check_cpu(const char* op, const at::Tensor& t, const char* what) {
  TORCH_CHECK_VALUE(t.is_cpu(), op, ": lightllm._C takes CPU tensors, got ", what, " on ", t.device());
}

void check_blocksize_4bit(const char* op, int64_t blocksize) {
  TORCH_CHECK_VALUE(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0, op,
                    ": blocksize must be a power of two from 32 to 4096, got ", blocksize);
}

void check_code(const char* op, const at::Tensor& code) {
  check_cpu(op, code, "code");
  TORCH_CHECK_VALUE(code.scalar_type() == at::kFloat && code.numel() == 16, op,
                    ": code must be the 16 float32 values of the 4-bit type, got ", code.scalar_type(), " of shape ",
                    code.sizes());
}

void check_absmax(const char* op, const at::Tensor& absmax, int64_t n, int64_t blocksize, bool exact) {
  check_cpu(op, absmax, "absmax");
  TORCH_CHECK_VALUE(absmax.scalar_type() == at::kFloat, op, ": absmax must be float32, got ", absmax.scalar_type());
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  TORCH_CHECK_VALUE(exact ? absmax.numel() == blocks : absmax.numel() >= blocks, op, ": absmax holds ",
                    absmax.numel(), " values; ", n, " values at blocksize ", blocksize, " need ", blocks);
}

// Below this many values (or weights) a call runs on one thread: ~30 us of work, less than what
// waking the other threads can cost on a busy machine.
constexpr int64_t kSerialWork = 1 << 20;

// Runs f(begin, end) over [0, n) in chunks handed out one at a time to torch's threads: a thread
// slowed by another process on its core takes fewer chunks instead of holding the others up.
// `work` is the call's total size in values, for the serial cut-off.
template <typename F>
void parallel_chunks(int64_t n, int64_t chunk, int64_t work, const F& f) {
  if (n <= 0) return;
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (threads <= 1 || work < kSerialWork || at::in_parallel_region()) {
    f(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1))
        f(c * chunk, std::min(n, (c + 1) * chunk));
    }
  });
}

// About 16 chunks per thread, within [lo, hi] items each.
int64_t chunk_for(int64_t n, int64_t lo, int64_t hi) {
  const int64_t per = n / (16 * std::max<int64_t>(1, at::get_num_threads()));
  return std::clamp<int64_t>(per, lo, hi);
}

// ---- 4-bit ------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> quantize_4bit(const at::Tensor& x, const at::Tensor& code, int64_t blocksize) {
  constexpr const char* op = "quantize_4bit";
  check_cpu(op, x, "x");
  const FloatType x_type = float_type_value(x.scalar_type(), op, "x");
  check_blocksize_4bit(op, blocksize);
  check_code(op, code);
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.numel();
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  at::Tensor packed = at::empty({(n + 1) / 2}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, x.options().dtype(at::kFloat));
  if (n == 0) return {packed, absmax};
  const FourBitSearch search = make_fourbit_search(code.contiguous().data_ptr<float>());
  const void* xp = xc.data_ptr();
  uint8_t* pp = packed.data_ptr<uint8_t>();
  float* ap = absmax.data_ptr<float>();
  parallel_chunks(blocks, std::max<int64_t>(1, 65536 / blocksize), n, [&](int64_t b0, int64_t b1) {
    quantize_4bit_cpu(xp, x_type, search, pp, ap, n, blocksize, b0, b1);
  });
  return {packed, absmax};
}

at::Tensor dequantize_4bit_into(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                                const at::Tensor& code, int64_t blocksize, int64_t n, at::ScalarType dtype) {
  const FloatType out_type = float_type_value(dtype, op, "dtype");
  at::Tensor out = at::empty({n}, packed.options().dtype(dtype));
  if (n == 0) return out;
  const at::Tensor pc = packed.contiguous(), ac = absmax.contiguous(), cc = code.contiguous();
  const uint8_t* pp = pc.data_ptr<uint8_t>();
  const float* ap = ac.data_ptr<float>();
  const float* cp = cc.data_ptr<float>();
  void* op_out = out.data_ptr();
  parallel_chunks((n + 31) / 32, 2048, n, [&](int64_t c0, int64_t c1) {
    dequantize_4bit_cpu(pp, ap, cp, n, blocksize, op_out, out_type, c0, c1);
  });
  return out;
}

void check_packed(const char* op, const at::Tensor& packed, int64_t n, bool exact) {
  check_cpu(op, packed, "packed");
  TORCH_CHECK_VALUE(packed.scalar_type() == at::kByte, op, ": packed must be uint8 bytes, got ",
                    packed.scalar_type());
  const int64_t need = (n + 1) / 2;
  TORCH_CHECK_VALUE(exact ? packed.numel() == need : packed.numel() >= need, op, ": packed holds ", packed.numel(),
                    " bytes; ", n, " 4-bit values need ", need);
}

at::Tensor dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                           int64_t blocksize, int64_t n, at::ScalarType dtype) {
  constexpr const char* op = "dequantize_4bit";
  TORCH_CHECK_VALUE(n >= 0, op, ": n must be >= 0, got ", n);
  check_blocksize_4bit(op, blocksize);
  check_code(op, code);
  check_packed(op, packed, n, false);
  check_absmax(op, absmax, n, blocksize, false);
  return dequantize_4bit_into(op, packed, absmax, code, blocksize, n, dtype);
}

at::Tensor bias_as_float(const char* op, const c10::optional<at::Tensor>& bias, int64_t n_out, at::ScalarType dtype) {
  if (!bias.has_value()) return at::Tensor();
  check_cpu(op, *bias, "bias");
  float_type_value(bias->scalar_type(), op, "bias");
  TORCH_CHECK_VALUE(bias->numel() == n_out, op, ": bias has ", bias->numel(), " values, the layer has ", n_out,
                    " outputs");
  // rounded to x's dtype first, as the reference adds it
  return bias->reshape({-1}).to(dtype).to(at::kFloat).contiguous();
}

// The LoRA epilogue's operands (lora_s [M, r] = x A^T and lora_b [N, r], both or neither), checked
// and held as float32 contiguous tensors for the kernel's lifetime.
struct LoraOperands {
  at::Tensor s, b, addend;
  double scale = 0.0;
  bool present() const { return s.defined(); }
  // The kernel's epilogue adds scale * S B^T [M, N] (float32, torch's GEMM: small next to the layer)
  LoraEpilogue epilogue() {
    LoraEpilogue e;
    if (present()) {
      addend = at::mm(s, b.t()).mul_(scale).contiguous();
      e.addend = addend.data_ptr<float>();
      e.ld = b.size(0);
    }
    return e;
  }
  // y [M, N] in x's dtype plus the rank-r term: the reference's arithmetic (float32, one rounding)
  at::Tensor add_to(const at::Tensor& y) const {
    if (!present()) return y;
    return at::addmm(y.to(at::kFloat), s, b.t(), 1.0, scale).to(y.scalar_type());
  }
};

LoraOperands lora_operands(const char* op, const c10::optional<at::Tensor>& lora_s,
                           const c10::optional<at::Tensor>& lora_b, double lora_scale, int64_t m, int64_t n_out) {
  LoraOperands l;
  TORCH_CHECK_VALUE(lora_s.has_value() == lora_b.has_value(), op,
                    ": lora_s and lora_b go together (the rank-r term needs both factors)");
  if (!lora_s.has_value()) return l;
  check_cpu(op, *lora_s, "lora_s");
  check_cpu(op, *lora_b, "lora_b");
  float_type_value(lora_s->scalar_type(), op, "lora_s");
  float_type_value(lora_b->scalar_type(), op, "lora_b");
  const int64_t r = lora_b->dim() == 2 ? lora_b->size(1) : -1;
  TORCH_CHECK_VALUE(lora_b->dim() == 2 && lora_b->size(0) == n_out && r >= 1, op, ": lora_b must be [N, r] = [",
                    n_out, ", r] with r >= 1, got ", lora_b->sizes());
  TORCH_CHECK_VALUE(lora_s->dim() == 2 && lora_s->size(0) == m && lora_s->size(1) == r, op,
                    ": lora_s must be [M, r] = [", m, ", ", r, "], got ", lora_s->sizes());
  l.s = lora_s->to(at::kFloat).contiguous();
  l.b = lora_b->to(at::kFloat).contiguous();
  l.scale = lora_scale;
  return l;
}

std::vector<int64_t> output_shape(const at::Tensor& x, int64_t n_out) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(n_out);
  return shape;
}

at::Tensor matmul_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                       const at::Tensor& code, int64_t blocksize, int64_t out_features,
                       const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& lora_s,
                       const c10::optional<at::Tensor>& lora_b, double lora_scale) {
  constexpr const char* op = "matmul_4bit";
  check_cpu(op, x, "x");
  const FloatType x_type = float_type_value(x.scalar_type(), op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension");
  TORCH_CHECK_VALUE(out_features >= 0, op, ": out_features must be >= 0, got ", out_features);
  check_blocksize_4bit(op, blocksize);
  check_code(op, code);
  const int64_t k = x.size(-1), n_out = out_features;
  check_packed(op, packed, n_out * k, true);
  check_absmax(op, absmax, n_out * k, blocksize, true);
  const at::Tensor bias_f = bias_as_float(op, bias, n_out, x.scalar_type());
  const at::Tensor x2 = x.reshape({-1, k}).contiguous();
  const int64_t m = x2.size(0);
  LoraOperands lora = lora_operands(op, lora_s, lora_b, lora_scale, m, n_out);
  if (m > kMaxGemvRows || k == 0) {
    // Prefill: the weight is read once either way and the matmul is compute-bound, so dequantize
    // (this file's kernel, the reference's bits) and let torch's GEMM run it.
    const at::Tensor w = dequantize_4bit_into(op, packed, absmax, code, blocksize, n_out * k, x.scalar_type());
    const at::Tensor b = bias.has_value() ? bias->reshape({-1}).to(x.scalar_type()) : at::Tensor();
    return lora.add_to(at::linear(x2, w.view({n_out, k}), b)).view(output_shape(x, n_out));
  }
  at::Tensor out = at::empty({m, n_out}, x.options());
  if (m == 0 || n_out == 0) return out.view(output_shape(x, n_out));
  Gemv4Args a{};
  a.layout = gemv4_layout(x_type, m, k, blocksize);
  at::Tensor xf = at::empty({gemv4_x_bytes(a.layout, m, k)}, x.options().dtype(at::kByte));
  a.tile = gemv4_tile(a.layout, m, k);
  gemv4_prepare_x(x2.data_ptr(), x_type, m, k, a.layout, a.tile, xf.data_ptr());
  const at::Tensor pc = packed.contiguous(), ac = absmax.contiguous(), cc = code.contiguous();
  a.packed = pc.data_ptr<uint8_t>();
  a.absmax = ac.data_ptr<float>();
  a.code = cc.data_ptr<float>();
  a.n_rows = n_out;
  a.k = k;
  a.blocksize = blocksize;
  a.m = m;
  a.x = xf.data_ptr();
  a.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  a.out = out.data_ptr();
  a.out_type = x_type;
  a.lora = lora.epilogue();
  parallel_chunks(n_out, chunk_for(n_out, 4, 256), n_out * k * m, [&](int64_t n0, int64_t n1) { gemv_4bit_cpu(a, n0, n1); });
  return out.view(output_shape(x, n_out));
}

// ---- LLM.int8 -----------------------------------------------------------------------------------

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& cb, const at::Tensor& scb,
                       const c10::optional<at::Tensor>& bias, double threshold,
                       const c10::optional<at::Tensor>& lora_s, const c10::optional<at::Tensor>& lora_b,
                       double lora_scale, int64_t gemm_min_rows) {
  constexpr const char* op = "int8_linear";
  check_cpu(op, x, "x");
  check_cpu(op, cb, "CB");
  check_cpu(op, scb, "SCB");
  const FloatType x_type = float_type_value(x.scalar_type(), op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension");
  TORCH_CHECK_VALUE(cb.scalar_type() == at::kChar && cb.dim() == 2, op, ": CB must be a 2-D int8 weight [out, in], got ",
                    cb.scalar_type(), " of shape ", cb.sizes());
  const int64_t n_out = cb.size(0), k = cb.size(1);
  TORCH_CHECK_VALUE(x.size(-1) == k, op, ": x has ", x.size(-1), " features, CB of shape ", cb.sizes(), " takes ", k);
  TORCH_CHECK_VALUE(scb.scalar_type() == at::kFloat && scb.numel() == n_out, op,
                    ": SCB must hold one float32 absmax per output row (", n_out, "), got ", scb.scalar_type(),
                    " of shape ", scb.sizes());
  // |sum| <= 127 * 127 * K must fit in int32
  TORCH_CHECK_VALUE(k <= 133000, op, ": K = ", k, " is too large for an exact int32 product (at most 133000)");
  const at::Tensor bias_f = bias_as_float(op, bias, n_out, x.scalar_type());
  const at::Tensor x2 = x.reshape({-1, k}).contiguous();
  const int64_t m = x2.size(0);
  LoraOperands lora = lora_operands(op, lora_s, lora_b, lora_scale, m, n_out);
  at::Tensor out = at::empty({m, n_out}, x.options());
  if (m == 0 || n_out == 0) return out.view(output_shape(x, n_out));
  at::Tensor scratch = at::empty({int8_scratch_bytes(m, k)}, x.options().dtype(at::kByte));
  Int8Activations acts;
  // rows in parallel once there are many (the GEMV's few rows: one thread, the weight dominates)
  const RowRunner run_rows = [&](int64_t rows, const std::function<void(int64_t, int64_t)>& body) {
    parallel_chunks(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), rows * k * 8, body);
  };
  int8_prepare_activations(x2.data_ptr(), x_type, m, k, threshold, scratch.data_ptr(), &acts, run_rows);
  const at::Tensor cbc = cb.contiguous(), scbc = scb.contiguous();
  Int8LinearArgs a{};
  a.cb = cbc.data_ptr<int8_t>();
  a.scb = scbc.data_ptr<float>();
  a.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  a.n_rows = n_out;
  a.acts = &acts;
  a.out = out.data_ptr();
  a.out_type = x_type;
  a.lora = lora.epilogue();
  if (gemm_min_rows > 0 && m >= gemm_min_rows) {
    // Many rows of x: the exact int32 product from torch._int_mm (oneDNN: AMX tiles or VNNI, far
    // ahead of a GEMV once the weight is reused across rows), then the same epilogue.
    const at::Tensor codes = at::from_blob(acts.codes, {m, k}, {acts.k_padded, 1}, x.options().dtype(at::kChar));
    const at::Tensor c = at::_int_mm(codes, cbc.t()).contiguous();
    const int32_t* c_ptr = c.data_ptr<int32_t>();
    parallel_chunks(n_out, chunk_for(n_out, 64, 256), n_out * m * 16,
                    [&](int64_t n0, int64_t n1) { int8_linear_epilogue_cpu(a, c_ptr, n0, n1); });
  } else {
    parallel_chunks(n_out, chunk_for(n_out, 4, 256), n_out * k * m, [&](int64_t n0, int64_t n1) { int8_linear_cpu(a, n0, n1); });
  }
  return out.view(output_shape(x, n_out));
}

}  // namespace

void bind_bnb_cpu(pybind11::module_& m) {
  m.def("quantize_4bit", &quantize_4bit, "4-bit NF4/FP4 quantization (CPU): (packed uint8 [ceil(n/2)], absmax)",
        py::arg("x"), py::arg("code"), py::arg("blocksize"));
  m.def("dequantize_4bit", &dequantize_4bit, "4-bit NF4/FP4 dequantization of n values (CPU)", py::arg("packed"),
        py::arg("absmax"), py::arg("code"), py::arg("blocksize"), py::arg("n"), py::arg("dtype"));
  m.def("matmul_4bit", &matmul_4bit,
        "x @ W^T + bias (+ lora_scale * lora_s @ lora_b^T) for a 4-bit W [out_features, K] (CPU; GEMV up to 16 rows)",
        py::arg("x"), py::arg("packed"), py::arg("absmax"), py::arg("code"), py::arg("blocksize"),
        py::arg("out_features"), py::arg("bias"), py::arg("lora_s") = py::none(), py::arg("lora_b") = py::none(),
        py::arg("lora_scale") = 0.0);
  m.def("int8_linear", &int8_linear, "LLM.int8 forward x @ W^T + bias (+ lora_scale * lora_s @ lora_b^T), W = CB * SCB / 127 (CPU)", py::arg("x"),
        py::arg("cb"), py::arg("scb"), py::arg("bias"), py::arg("threshold"), py::arg("lora_s") = py::none(),
        py::arg("lora_b") = py::none(), py::arg("lora_scale") = 0.0, py::arg("gemm_min_rows") = 0);
  m.def("bnb_cpu_isa", [] { return std::string(bnb_cpu_isa()); },
        "instruction set of the 4-bit / int8 CPU kernels: avx512-vnni, avx512 or portable");
  m.def("bnb_cpu_set_bf16_kernel_min_rows", &bnb_cpu_set_bf16_kernel_min_rows,
        "rows of bfloat16 x from which the 4-bit GEMV uses its vdpbf16ps kernel (-1: by CPU, the default; for "
        "tests); returns the previous setting", py::arg("rows"));
  m.def("bnb_cpu_force_portable", &bnb_cpu_force_portable,
        "make the 4-bit / int8 CPU kernels take their portable path (for tests)", py::arg("on"));
}

}  // namespace lightllm
