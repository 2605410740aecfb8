// Argument checks shared by the two bindings files (bindings.cpp for lightllm._C, bindings_cuda.cpp
// for lightllm._C_cuda), the only translation units that see at::Tensor. Kernel files never
// include this: every .cu that includes torch headers costs about a minute of compile.
#pragma once

#include <torch/extension.h>

#include "blockwise.h"  // FloatType

namespace lightllm {

inline FloatType float_type_of(at::ScalarType t, const char* op, const char* what) {
  switch (t) {
    case at::kFloat: return FloatType::kFloat32;
    case at::kHalf: return FloatType::kFloat16;
    case at::kBFloat16: return FloatType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", what, " must be float32, float16 or bfloat16, got ", t);
  }
}

inline void check_blocksize(const char* op, int64_t blocksize) {
  TORCH_CHECK(blocksize >= 64 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0, op,
              ": blocksize must be a power of two from 64 to 4096, got ", blocksize);
}

inline void check_map(const char* op, const at::Tensor& map, const at::Tensor& like) {
  TORCH_CHECK(map.scalar_type() == at::kFloat && map.dim() == 1 && map.numel() == 256, op,
              ": code must be a 1-D float32 tensor of 256 values, got ", map.scalar_type(), " of shape ",
              map.sizes());
  TORCH_CHECK(map.device() == like.device(), op, ": code is on ", map.device(), " but the data is on ",
              like.device());
}

// The number of 8-bit blocks of n values, checked against absmax for dequantization.
inline void check_dequantize_args(const char* op, const at::Tensor& codes, const at::Tensor& absmax,
                                  const at::Tensor& map, int64_t blocksize) {
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
}

}  // namespace lightllm
