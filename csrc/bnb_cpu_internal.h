// Shared by fourbit_cpu.cpp and int8_cpu.cpp only: the run-time instruction-set choice.
#pragma once

namespace lightllm {
bool bnb_use_avx512();  // AVX-512 F/BW/VL/DQ present and not forced off
bool bnb_use_vnni();    // ... and AVX-512 VNNI
bool bnb_use_avx512_bf16();  // ... and AVX-512 BF16
}  // namespace lightllm
