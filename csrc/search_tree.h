// Nearest-code search over a sorted 256-entry map, shared by the CPU and CUDA kernels.
//
// The code of a normalized value v is the number of midpoints m_i = (map[i] + map[i+1]) * 0.5
// with m_i < v (so the nearest map value; ties take the lower index; NaN gives 0).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LIGHTLLM_HD __host__ __device__ __forceinline__
#else
#define LIGHTLLM_HD inline
#endif

namespace lightllm {

// Midpoint i of the map, computed exactly as the reference does: (map[i] + map[i+1]) * 0.5.
LIGHTLLM_HD float map_midpoint(const float* map, int i) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(__fadd_rn(map[i], map[i + 1]), 0.5f);  // _rn: never contracted into an FMA
#else
  return (map[i] + map[i + 1]) * 0.5f;
#endif
}

// max that keeps a NaN once it has seen one (fmaxf would drop it).
LIGHTLLM_HD float nan_propagating_max(float m, float a) { return (a > m || a != a) ? a : m; }

// ---- Eytzinger tree (CUDA kernel, and the CPU fallback for unusual maps) ---------------------
// The 255 midpoints stored breadth-first: node t (1..255) sits at level L = floor(log2 t),
// position p = t - 2^L, and holds the midpoint of sorted rank (2p + 1) * 2^(7 - L) - 1. Walking
// t -> 2t + (node < v) eight times ends at leaf 256 + code. Each level is contiguous, so a warp's
// lookups at one level touch few shared-memory banks, unlike a plain sorted array whose pivots of
// one level all fall in the same bank. Comparisons with NaN are false, so NaN walks to code 0.
LIGHTLLM_HD int eytzinger_rank(int t) {
  int level = 0;
  while ((t >> (level + 1)) != 0) ++level;
  const int p = t - (1 << level);
  return ((2 * p + 1) << (7 - level)) - 1;
}

#if !defined(__CUDACC__)
// ---- CPU search: a bucket table on the float's bits, then at most a few comparisons ----------
// A float's bits, with the sign folded, order like the floats themselves. The top 14 of those
// bits (sign, exponent, 5 mantissa bits: 32 buckets per binade) index a table holding the number of
// midpoints below the bucket; the few midpoints inside a bucket are then counted with branch-free
// comparisons. For the dynamic maps a bucket holds at most 2 midpoints, so a code costs a table
// load and two compares instead of an 8-level search; maps that crowd more than kMaxSteps
// midpoints into one bucket use the Eytzinger tree instead.
class CodeSearch {
 public:
  static constexpr int kBucketBits = 14;
  static constexpr int kMaxSteps = 4;

  explicit CodeSearch(const float* map) {
    for (int i = 0; i < 255; ++i) mid_[i] = map_midpoint(map, i);
    mid_[255] = __builtin_inff();  // sentinel: the scan never walks past code 255
    tree_[0] = 0.0f;
    for (int t = 1; t < 256; ++t) tree_[t] = mid_[eytzinger_rank(t)];
    // Midpoints are sorted, so their buckets are too: one sweep gives, per bucket, the number of
    // midpoints below it (start_) and the most midpoints any bucket holds (steps_).
    int below = 0, most = 0;
    for (uint32_t b = 0; b < kBuckets; ++b) {
      start_[b] = static_cast<uint8_t>(below);
      int in_bucket = 0;
      while (below < 255 && bucket_of(mid_[below]) == b) { ++below; ++in_bucket; }
      most = in_bucket > most ? in_bucket : most;
    }
    steps_ = most;
  }

  bool use_table() const { return steps_ <= kMaxSteps; }

  // Codes for n values v[i] = x[i] * inv.
  void encode(const float* x, float inv, uint8_t* out, int64_t n) const {
    if (use_table()) {
      switch (steps_) {
        case 0: encode_table<0>(x, inv, out, n); break;
        case 1: encode_table<1>(x, inv, out, n); break;
        case 2: encode_table<2>(x, inv, out, n); break;
        case 3: encode_table<3>(x, inv, out, n); break;
        default: encode_table<4>(x, inv, out, n); break;
      }
    } else {
      encode_tree(x, inv, out, n);
    }
  }

 private:
  static constexpr uint32_t kBuckets = 1u << kBucketBits;

  static uint32_t key_of(float v) {
    v += 0.0f;  // -0 becomes +0, so keys order exactly as the floats compare
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  static uint32_t bucket_of(float v) { return key_of(v) >> (32 - kBucketBits); }

  template <int STEPS>
  void encode_table(const float* x, float inv, uint8_t* out, int64_t n) const {
    for (int64_t i = 0; i < n; ++i) {
      const float v = x[i] * inv;
      unsigned c = start_[bucket_of(v)];
      for (int s = 0; s < STEPS; ++s) c += mid_[c] < v ? 1u : 0u;
      out[i] = v == v ? static_cast<uint8_t>(c) : 0;  // NaN's key is meaningless: code 0
    }
  }

  void encode_tree(const float* x, float inv, uint8_t* out, int64_t n) const {
    constexpr int kLanes = 16;  // independent searches interleaved to hide load latency
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      unsigned t[kLanes];
      float v[kLanes];
      for (int l = 0; l < kLanes; ++l) { v[l] = x[i + l] * inv; t[l] = 1; }
      for (int level = 0; level < 8; ++level)
        for (int l = 0; l < kLanes; ++l) t[l] = 2 * t[l] + (tree_[t[l]] < v[l] ? 1u : 0u);
      for (int l = 0; l < kLanes; ++l) out[i + l] = static_cast<uint8_t>(t[l] - 256);
    }
    for (; i < n; ++i) {
      const float v = x[i] * inv;
      unsigned t = 1;
      for (int level = 0; level < 8; ++level) t = 2 * t + (tree_[t] < v ? 1u : 0u);
      out[i] = static_cast<uint8_t>(t - 256);
    }
  }

  float mid_[256];
  float tree_[256];
  uint8_t start_[kBuckets];
  int steps_ = 0;
};
#endif  // !__CUDACC__

}  // namespace lightllm
