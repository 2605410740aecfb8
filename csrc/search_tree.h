// Nearest-code search over a sorted 256-entry map, shared by the CPU and CUDA kernels.
//
// The 255 midpoints between neighbouring map values are stored in breadth-first (Eytzinger)
// order: node t (1..255) sits at level L = floor(log2 t), position p = t - 2^L, and holds the
// midpoint of in-order rank (2p + 1) * 2^(7 - L) - 1. Walking t -> 2t + (node < v) eight times
// ends at leaf 256 + (number of midpoints below v), which is the code. Each level is contiguous,
// so a warp's lookups at one level hit few shared-memory banks, unlike a plain sorted array whose
// pivots of one level all fall in the same bank. Comparisons with NaN are false: NaN gives code 0.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LIGHTLLM_HD __host__ __device__ __forceinline__
#else
#define LIGHTLLM_HD inline
#endif

namespace lightllm {

// Sorted-rank of the midpoint held by tree node t (1 <= t <= 255).
LIGHTLLM_HD int eytzinger_rank(int t) {
  int level = 0;
  while ((t >> (level + 1)) != 0) ++level;
  const int p = t - (1 << level);
  return ((2 * p + 1) << (7 - level)) - 1;
}

// Midpoint i of the map, computed exactly as the reference does: (map[i] + map[i+1]) * 0.5.
LIGHTLLM_HD float map_midpoint(const float* map, int i) { return (map[i] + map[i + 1]) * 0.5f; }

// max that keeps a NaN once it has seen one (fmaxf would drop it).
LIGHTLLM_HD float nan_propagating_max(float m, float a) { return (a > m || a != a) ? a : m; }

struct MidpointTree {
  float node[256];  // node[0] unused

  explicit MidpointTree(const float* map) {
    node[0] = 0.0f;
    for (int t = 1; t < 256; ++t) node[t] = map_midpoint(map, eytzinger_rank(t));
  }

  uint8_t search_one(float v) const {
    unsigned t = 1;
    for (int level = 0; level < 8; ++level) t = 2 * t + (node[t] < v ? 1u : 0u);
    return static_cast<uint8_t>(t - 256);
  }

  // LANES independent searches advanced level by level, so their loads overlap.
  template <int LANES>
  void search(const float* v, uint8_t* out) const {
    unsigned t[LANES];
    for (int l = 0; l < LANES; ++l) t[l] = 1;
    for (int level = 0; level < 8; ++level)
      for (int l = 0; l < LANES; ++l) t[l] = 2 * t[l] + (node[t[l]] < v[l] ? 1u : 0u);
    for (int l = 0; l < LANES; ++l) out[l] = static_cast<uint8_t>(t[l] - 256);
  }
};

}  // namespace lightllm
