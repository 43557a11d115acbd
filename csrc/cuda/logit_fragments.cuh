// The logits of a warp's 16 query rows against one KeyWalk key tile, held in mma accumulator
// layout (warp_mma.cuh): value v of n-tile nt of a lane belongs to query row lane / 4 + 8 (v / 2)
// of the warp and to key slot 8 nt + 2 (lane % 4) + v % 2 of the tile. Shared by the fp16/bf16
// forward and dQ kernels.
#pragma once

#include "warp_mma.cuh"

namespace aanet_kernels::cuda::detail {

// The two bias tables of one (batch, head) in the walk's terms: `outer` is indexed by a run's
// outer coordinate, `inner` along the run (bias_h and bias_w, or the other way round).
template <typename T>
struct WalkBias {
  Tensor4 outer_table, inner_table;
  const T* outer = nullptr;
  const T* inner = nullptr;

  __device__ WalkBias(const Attention2dParams& p, const KeyWalk& walk, int b, int h)
      : outer_table(walk.transposed ? p.bias_w : p.bias_h),
        inner_table(walk.transposed ? p.bias_h : p.bias_w) {
    outer = outer_table.ptr ? head_ptr<T>(outer_table, b, h) : nullptr;
    inner = inner_table.ptr ? head_ptr<T>(inner_table, b, h) : nullptr;
  }

  __device__ float outer_at(int i, int o) const {
    return to_acc(outer[i * outer_table.stride[2] + o * outer_table.stride[3]]);
  }
  __device__ float inner_at(int i, int x) const {
    return to_acc(inner[i * inner_table.stride[2] + x * inner_table.stride[3]]);
  }
};

// A lane's two query rows, m0 + 16 warp + lane / 4 (+ 8), and whether they exist.
struct LaneRows {
  int index[2];
  bool ok[2];

  __device__ LaneRows(int m0, int warp, int lane, int length) {
    for (int r = 0; r < 2; ++r) {
      index[r] = m0 + 16 * warp + lane / 4 + 8 * r;
      ok[r] = index[r] < length;
    }
  }
};

// The inner bias of a lane's slots for one inner chunk (the same for every tile of the chunk,
// since a slot's inner coordinate repeats every run), and which slots exist (ok).
template <int NTILES>
struct InnerSlots {
  float value[2][NTILES][2];
  bool ok[NTILES][2];

  template <typename T>
  __device__ void load(
      const WalkBias<T>& bias,
      const KeyWalk& walk,
      const LaneRows& rows,
      int inner0,
      int quad) {
    const int run_mask = (1 << walk.inner_log2) - 1;
#pragma unroll
    for (int nt = 0; nt < NTILES; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int inner = inner0 + ((8 * nt + 2 * quad + e) & run_mask);
        ok[nt][e] = inner < walk.inner_size;
        for (int r = 0; r < 2; ++r) {
          value[r][nt][e] = bias.inner != nullptr && rows.ok[r] && ok[nt][e]
              ? bias.inner_at(rows.index[r], inner)
              : 0.0f;
        }
      }
    }
  }
};

// s = scale * (q . k) + inner bias + outer bias for the tile whose runs start at outer0, in
// place; -inf at slots past the map. Rows past L get no bias (their values are never used).
template <typename T, int NTILES>
__device__ __forceinline__ void bias_and_mask(
    float (&s)[NTILES][4],
    float scale,
    const InnerSlots<NTILES>& slots,
    const WalkBias<T>& bias,
    const KeyWalk& walk,
    const LaneRows& rows,
    int outer0,
    int quad) {
#pragma unroll
  for (int nt = 0; nt < NTILES; ++nt) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int outer = outer0 + ((8 * nt + 2 * quad + e) >> walk.inner_log2);
      const bool ok = slots.ok[nt][e] && outer < walk.outer_size;
      for (int r = 0; r < 2; ++r) {
        float logit = neg_inf<float>();
        if (ok) {
          logit = scale * s[nt][2 * r + e] + slots.value[r][nt][e];
          if (bias.outer != nullptr && rows.ok[r]) {
            logit += bias.outer_at(rows.index[r], outer);
          }
        }
        s[nt][2 * r + e] = logit;
      }
    }
  }
}

} // namespace aanet_kernels::cuda::detail
