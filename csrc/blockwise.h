// Block-wise 8-bit quantization kernels (bitsandbytes semantics): host launchers only.
// No torch headers here: the bindings files (bindings.cpp, bindings_cuda.cpp) alone see at::Tensor.
//
// Semantics shared by every backend (the Python reference in lightllm/ops/blockwise.py is the
// definition):
//   absmax[b] = max |x| over block b (NaN if the block holds a NaN)
//   v         = x * (absmax == 0 ? 0 : 1 / absmax)           (IEEE division, then one multiply)
//   code      = number of midpoints m_i = (map[i] + map[i+1]) * 0.5 with m_i < v
//               (the nearest map value; ties go to the lower index; NaN gives 0)
//   dequant   = map[code] * absmax, rounded once to the output dtype
#pragma once

#include <cstdint>
#include <memory>

namespace lightllm {

enum class FloatType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// CPU: the code search for a map (~17 KB of tables, cached for the last few maps), then
// quantize_blockwise_cpu handles blocks [block_begin, block_end); callers run ranges in parallel.
class CodeSearch;
std::shared_ptr<const CodeSearch> code_search_for(const float* map);
void quantize_blockwise_cpu(const void* x, FloatType x_type, const CodeSearch& search, uint8_t* codes,
                            float* absmax, int64_t n, int64_t blocksize, int64_t block_begin,
                            int64_t block_end);
void dequantize_blockwise_cpu(const uint8_t* codes, const float* absmax, const float* map, void* out,
                              FloatType out_type, int64_t n, int64_t blocksize, int64_t block_begin,
                              int64_t block_end);

#ifdef LIGHTLLM_WITH_CUDA
// CUDA: one launch on `stream` for the whole tensor. Returns the launch's error code.
// `stream` is a cudaStream_t; void* keeps CUDA headers out of this header.
int launch_quantize_blockwise(const void* x, FloatType x_type, const float* map, uint8_t* codes,
                              float* absmax, int64_t n, int64_t blocksize, void* stream);
int launch_dequantize_blockwise(const uint8_t* codes, const float* absmax, const float* map,
                                void* out, FloatType out_type, int64_t n, int64_t blocksize,
                                void* stream);
const char* cuda_error_string(int error);
#endif

}  // namespace lightllm
