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
// place; -inf at slots past the map. Rows past L get no bias (their values are never used). A
// lane's two adjacent slots lie in one run unless runs are one key long, so the outer bias (the
// only per-slot gather) is loaded once for both.
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
  const bool pairs_share_run = walk.inner_log2 >= 1;
#pragma unroll
  for (int nt = 0; nt < NTILES; ++nt) {
    const int slot = 8 * nt + 2 * quad;
    const int outer[2] = {outer0 + (slot >> walk.inner_log2),
                          outer0 + ((slot + 1) >> walk.inner_log2)};
    const bool ok[2] = {slots.ok[nt][0] && outer[0] < walk.outer_size,
                        slots.ok[nt][1] && outer[1] < walk.outer_size};
    for (int r = 0; r < 2; ++r) {
      float outer_value[2] = {0.0f, 0.0f};
      if (bias.outer != nullptr && rows.ok[r]) {
        outer_value[0] = ok[0] ? bias.outer_at(rows.index[r], outer[0]) : 0.0f;
        outer_value[1] = pairs_share_run ? outer_value[0]
            : ok[1]                      ? bias.outer_at(rows.index[r], outer[1])
                                         : 0.0f;
      }
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s[nt][2 * r + e] = ok[e] ? scale * s[nt][2 * r + e] + slots.value[r][nt][e] + outer_value[e]
                                 : neg_inf<float>();
      }
    }
  }
}

} // namespace aanet_kernels::cuda::detail
