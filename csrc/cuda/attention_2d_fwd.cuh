// Forward kernels: flash-style online softmax over key tiles, the two bias tables added per tile,
// log-sum-exp saved for backward. One block per (query tile, head, batch).
//
// - fp16/bf16: attention_2d_fwd_mma_kernel, register-resident (FlashAttention-2's structure):
//   each warp owns 16 query rows; logits, probabilities and the output accumulator stay in mma
//   fragments (warp_mma.cuh); Q, K and V tiles pass through shared memory, each stored once,
//   row-major (P V reads V through ldmatrix.trans). Key tiles follow KeyWalk, so bias
//   coordinates come from shifts and the inner bias table sits in registers.
// - fp32/fp64: attention_2d_fwd_kernel, every tile in shared memory and FMA loops (no TF32).
#pragma once

#include "attention_2d_common.cuh"
#include "logit_fragments.cuh"

namespace aanet_kernels::cuda::detail {

// Shared-memory layout of the forward kernel (byte offsets; one definition for host and device).
template <typename T, int D>
struct FwdSmem {
  using A = AccOf<T>;
  using Cfg = Tiles<T, D>;
  static constexpr int BM = Cfg::kFwdM, BN = Cfg::kFwdN;
  static constexpr int kLdT = D + Cfg::kPadT;   // Q, K, V
  static constexpr int kLdS = BN + Cfg::kPadA;  // S (logits, then shifted logits)
  static constexpr int kLdP = BN + Cfg::kPadT;  // P (probabilities in T, the PV operand)
  static constexpr int kLdO = D + Cfg::kPadA;   // O accumulator
  static constexpr size_t kQ = 0;
  static constexpr size_t kK = kQ + smem_align(sizeof(T) * BM * kLdT);
  static constexpr size_t kV = kK + smem_align(sizeof(T) * BN * kLdT);
  static constexpr size_t kS = kV + smem_align(sizeof(T) * BN * kLdT);
  static constexpr size_t kP = kS + smem_align(sizeof(A) * BM * kLdS);
  static constexpr size_t kO = kP + smem_align(sizeof(T) * BM * kLdP);
  static constexpr size_t kKeyY = kO + smem_align(sizeof(A) * BM * kLdO);  // key_coordinates
  static constexpr size_t kKeyX = kKeyY + smem_align(sizeof(int) * BN);
  static constexpr size_t kBytes = kKeyX + smem_align(sizeof(int) * BN);
};

template <typename T, int D>
__global__ void __launch_bounds__(Tiles<T, D>::kThreads)
    attention_2d_fwd_kernel(const Attention2dParams p) {
  using A = AccOf<T>;
  using Cfg = Tiles<T, D>;
  using S = FwdSmem<T, D>;
  constexpr int NT = Cfg::kThreads;
  constexpr int BM = S::BM;
  constexpr int BN = S::BN;
  constexpr int G = NT / BM;  // threads per query row in the softmax step

  extern __shared__ __align__(128) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem + S::kQ);
  T* s_k = reinterpret_cast<T*>(smem + S::kK);
  T* s_v = reinterpret_cast<T*>(smem + S::kV);
  A* s_s = reinterpret_cast<A*>(smem + S::kS);
  T* s_p = reinterpret_cast<T*>(smem + S::kP);
  A* s_o = reinterpret_cast<A*>(smem + S::kO);
  int* s_key_y = reinterpret_cast<int*>(smem + S::kKeyY);
  int* s_key_x = reinterpret_cast<int*>(smem + S::kKeyX);

  const int m0 = blockIdx.x * BM;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int len = p.length;
  const int dk_pad = round_up(p.dkh, Cfg::kStep);
  const int dv_pad = round_up(p.dvh, Cfg::kStep);
  const A scale = static_cast<A>(p.scale);

  const T* q = head_ptr<T>(p.q, b, h);
  const T* k = head_ptr<T>(p.k, b, h);
  const T* v = head_ptr<T>(p.v, b, h);
  const T* bias_h = p.bias_h.ptr ? head_ptr<T>(p.bias_h, b, h) : nullptr;
  const T* bias_w = p.bias_w.ptr ? head_ptr<T>(p.bias_w, b, h) : nullptr;

  load_tile<T, BM, D, NT>(s_q, S::kLdT, q, p.q.stride[2], p.q.stride[3], m0, len, p.dkh);
  zero_tile<A, BM, D, NT>(s_o, S::kLdO);

  const int r = threadIdx.x / G;  // this thread's query row within the tile
  const int lane = threadIdx.x % G;
  const int i = m0 + r;
  A row_max = neg_inf<A>();  // running max of the row's logits
  A row_sum = A(0);          // running sum of exp(logit - row_max)

  for (int n0 = 0; n0 < len; n0 += BN) {
    load_tile<T, BN, D, NT>(s_k, S::kLdT, k, p.k.stride[2], p.k.stride[3], n0, len, p.dkh);
    load_tile<T, BN, D, NT>(s_v, S::kLdT, v, p.v.stride[2], p.v.stride[3], n0, len, p.dvh);
    key_coordinates<BN, NT>(s_key_y, s_key_x, n0, p.width);
    __syncthreads();
    // S = Q K^T (K read transposed).
    block_gemm<T, A, true, false, NT>(
        s_s, S::kLdS, s_q, S::kLdT, s_k, S::kLdT, BM, BN, dk_pad, false);
    __syncthreads();

    // Logits of row r: scale, bias, mask; then the online-softmax update.
    A tile_max = neg_inf<A>();
    for (int c = lane; c < BN; c += G) {
      const int j = n0 + c;
      A logit = neg_inf<A>();
      if (j < len) {
        logit = scale * s_s[r * S::kLdS + c];
        if (i < len) {
          logit += bias_at<T, A>(bias_h, bias_w, p.bias_h, p.bias_w, i, s_key_y[c], s_key_x[c]);
        }
      }
      s_s[r * S::kLdS + c] = logit;
      tile_max = fmax(tile_max, logit);
    }
    tile_max = group_max<G>(tile_max);
    const A new_max = fmax(row_max, tile_max);
    // A row with no finite logit yet shifts by 0, so exp(-inf - 0) = 0 instead of NaN.
    const A shift = new_max == neg_inf<A>() ? A(0) : new_max;
    const A alpha = exp_acc(row_max - shift);
    A tile_sum = A(0);
    for (int c = lane; c < BN; c += G) {
      const A prob = exp_acc(s_s[r * S::kLdS + c] - shift);
      s_p[r * S::kLdP + c] = from_acc<T>(prob);
      tile_sum += prob;
    }
    tile_sum = group_sum<G>(tile_sum);
    row_sum = row_sum * alpha + tile_sum;
    row_max = new_max;
    for (int d = lane; d < dv_pad; d += G) {
      s_o[r * S::kLdO + d] *= alpha;
    }
    __syncthreads();
    // O += P V.
    block_gemm<T, A, true, true, NT>(
        s_o, S::kLdO, s_p, S::kLdP, s_v, S::kLdT, BM, dv_pad, BN, true);
    __syncthreads();
  }

  if (i < len) {
    const int64_t row = (static_cast<int64_t>(b) * p.heads + h) * len + i;
    const A inv = row_sum > A(0) ? A(1) / row_sum : A(0);
    T* out = static_cast<T*>(p.out) + row * p.dvh;
    for (int d = lane; d < p.dvh; d += G) {
      out[d] = from_acc<T>(s_o[r * S::kLdO + d] * inv);
    }
    if (lane == 0) {
      using Stat = StatOf<T>;
      static_cast<Stat*>(p.lse)[row] = row_sum > A(0)
          ? static_cast<Stat>(row_max) + static_cast<Stat>(log_acc(row_sum))
          : neg_inf<Stat>();
    }
  }
}

// Tile shapes of the register-resident forward (fp16/bf16). Leading dims are padded by 8
// elements so that the 32-bit fragment loads of a warp hit 32 distinct banks and the eight row
// addresses of an ldmatrix phase eight distinct 16-byte bank groups.
template <typename T, int D>
struct FwdMmaTiles {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int BM = 16 * kWarps;           // query rows per block, 16 per warp
  static constexpr int BN = D <= 64 ? 64 : 32;     // keys per tile
  static constexpr int kNTiles = BN / 8;           // n-tiles of the logits per warp
  static constexpr int kDTiles = D / 8;            // n-tiles of the output per warp
  // Blocks per SM the register budget must allow. Left free, ptxas (sm_90) takes 168, 192, 210
  // and 206 registers at head dims 16, 32, 64 and 128 (3, 2, 2, 2 blocks of 128 threads); asked
  // for 4 blocks at 16 and 3 above, it fits 128 and 168 without a spill on sm_90 (sm_80 keeps an
  // 8-byte stack frame at head dims 64 and 128: benchmarks/results/kernel_resources_sm80_sm90.md).
  static constexpr int kMinBlocks = D <= 16 ? 4 : 3;
  static constexpr int kLd = D + 8;                // s_q, s_k, s_v: [row][head dim]
  static_assert(is_fragment_row_pitch<T>(kLd), "s_q, s_k, s_v rows: ldmatrix alignment, banks");
  static constexpr size_t kQ = 0;
  static constexpr size_t kK = kQ + smem_align(sizeof(T) * BM * kLd);
  static constexpr size_t kV = kK + smem_align(sizeof(T) * BN * kLd);
  static constexpr size_t kBytes = kV + smem_align(sizeof(T) * BN * kLd);
};

template <typename T, int D>
__global__ void __launch_bounds__(FwdMmaTiles<T, D>::kThreads, FwdMmaTiles<T, D>::kMinBlocks)
    attention_2d_fwd_mma_kernel(const Attention2dParams p) {
  using S = FwdMmaTiles<T, D>;
  constexpr int NT = S::kThreads;
  constexpr int BM = S::BM;
  constexpr int BN = S::BN;

  extern __shared__ __align__(128) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem + S::kQ);
  T* s_k = reinterpret_cast<T*>(smem + S::kK);
  T* s_v = reinterpret_cast<T*>(smem + S::kV);

  const int m0 = blockIdx.x * BM;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int len = p.length;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int quad = lane % 4;
  const float scale = static_cast<float>(p.scale);
  const int dk_steps = round_up(p.dkh, 16) / 16;  // k-steps of Q K^T
  const int dv_tiles = round_up(p.dvh, 8) / 8;    // n-tiles of P V

  const KeyWalk walk = KeyWalk::of(p.height, p.width, BN);
  const WalkBias<T> bias(p, walk, b, h);
  const LaneRows rows(m0, warp, lane, len);
  const T* k = head_ptr<T>(p.k, b, h);
  const T* v = head_ptr<T>(p.v, b, h);

  load_tile<T, BM, D, NT>(s_q, S::kLd, head_ptr<T>(p.q, b, h), p.q.stride[2], p.q.stride[3], m0,
                          len, p.dkh);
  __syncthreads();
  uint32_t q_frag[D / 16][4];
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    load_a_fragment(q_frag[ks], s_q, S::kLd, 16 * warp, 16 * ks, lane);
  }

  float acc[S::kDTiles][4] = {};  // output accumulator, unnormalised
  float row_max[2] = {neg_inf<float>(), neg_inf<float>()};
  float row_sum[2] = {0.0f, 0.0f};  // this lane's share; the quad's four are summed at the end

  const int run = 1 << walk.inner_log2;
  for (int inner0 = 0; inner0 < walk.inner_size; inner0 += run) {
    InnerSlots<S::kNTiles> slots;
    slots.load(bias, walk, rows, inner0, quad);

    for (int outer0 = 0; outer0 < walk.outer_size; outer0 += walk.runs_per_tile(BN)) {
      const auto key_of = [&](int c) { return walk.key(outer0, inner0, c); };
      __syncthreads();  // the previous tile's fragments are read
      load_rows<T, BN, D, NT>(s_k, S::kLd, k, p.k.stride[2], p.k.stride[3], p.dkh, key_of);
      load_rows<T, BN, D, NT>(s_v, S::kLd, v, p.v.stride[2], p.v.stride[3], p.dvh, key_of);
      __syncthreads();

      float logits[S::kNTiles][4] = {};
      mma_a_by_tile<T>(logits, q_frag, s_k, S::kLd, dk_steps, S::kNTiles, lane);
      bias_and_mask(logits, scale, slots, bias, walk, rows, outer0, quad);
      float tile_max[2] = {neg_inf<float>(), neg_inf<float>()};
#pragma unroll
      for (int nt = 0; nt < S::kNTiles; ++nt) {
#pragma unroll
        for (int v4 = 0; v4 < 4; ++v4) {
          tile_max[v4 / 2] = fmaxf(tile_max[v4 / 2], logits[nt][v4]);
        }
      }

      // Online softmax; the four lanes of a quad hold one row between them.
      float alpha[2];
      float shift[2];
      for (int r = 0; r < 2; ++r) {
        const float new_max = fmaxf(row_max[r], group_max<4>(tile_max[r]));
        // A row with no finite logit yet shifts by 0, so exp(-inf - 0) = 0 instead of NaN.
        shift[r] = new_max == neg_inf<float>() ? 0.0f : new_max;
        alpha[r] = exp_acc(row_max[r] - shift[r]);
        row_max[r] = new_max;
        row_sum[r] *= alpha[r];
      }
#pragma unroll
      for (int nt = 0; nt < S::kNTiles; ++nt) {
#pragma unroll
        for (int v4 = 0; v4 < 4; ++v4) {
          const float prob = exp_acc(logits[nt][v4] - shift[v4 / 2]);
          logits[nt][v4] = prob;
          row_sum[v4 / 2] += prob;
        }
      }
#pragma unroll
      for (int dt = 0; dt < S::kDTiles; ++dt) {
#pragma unroll
        for (int v4 = 0; v4 < 4; ++v4) {
          acc[dt][v4] *= alpha[v4 / 2];
        }
      }

      // acc += P V, P straight from the logit registers.
      mma_accumulators_by_tile<T>(acc, logits, s_v, S::kLd, dv_tiles, lane);
    }
  }

  for (int r = 0; r < 2; ++r) {
    const float total = group_sum<4>(row_sum[r]);
    if (!rows.ok[r]) {
      continue;
    }
    const int64_t row = (static_cast<int64_t>(b) * p.heads + h) * len + rows.index[r];
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    store_accumulator_row(static_cast<T*>(p.out) + row * p.dvh, acc, r, inv, p.dvh, lane);
    if (quad == 0) {
      static_cast<float*>(p.lse)[row] =
          total > 0.0f ? row_max[r] + log_acc(total) : neg_inf<float>();
    }
  }
}

// The forward's one launch: a block per BM query tile, per head and batch element.
template <typename T, int D>
KernelLaunch forward_launch(const Attention2dParams& p) {
  if constexpr (kTensorCore<T>) {
    using S = FwdMmaTiles<T, D>;
    return {attention_2d_fwd_mma_kernel<T, D>, tile_grid(p.length, S::BM, p), S::kThreads,
            S::kBytes};
  } else {
    using S = FwdSmem<T, D>;
    return {attention_2d_fwd_kernel<T, D>, tile_grid(p.length, S::BM, p), Tiles<T, D>::kThreads,
            S::kBytes};
  }
}

} // namespace aanet_kernels::cuda::detail

// Launchers need nvcc; a host compiler sees only the kernels and their launch plans
// (csrc/cuda/emulation/ runs them on the CPU to check the index math without a GPU).
#if defined(__CUDACC__)

namespace aanet_kernels::cuda {

template <typename scalar_t, int D>
void launch_attention_2d_fwd(const Attention2dParams& params, cudaStream_t stream) {
  using T = typename detail::DeviceTypeOf<scalar_t>::type;
  detail::launch(detail::forward_launch<T, D>(params), params, stream);
}

template <typename scalar_t, int D>
size_t attention_2d_fwd_smem_bytes() {
  using T = typename detail::DeviceTypeOf<scalar_t>::type;
  return detail::forward_launch<T, D>(detail::one_position_params()).smem_bytes;
}

} // namespace aanet_kernels::cuda

// Explicit instantiation for all padded head dims of one input type (used by the fwd_*.cu files).
#define AANET_INSTANTIATE_ATTENTION_2D_FWD_D(scalar_t, D)                                     \
  template void aanet_kernels::cuda::launch_attention_2d_fwd<scalar_t, D>(                   \
      const aanet_kernels::cuda::Attention2dParams&, cudaStream_t);                          \
  template size_t aanet_kernels::cuda::attention_2d_fwd_smem_bytes<scalar_t, D>();
#define AANET_INSTANTIATE_ATTENTION_2D_FWD(scalar_t)                                          \
  AANET_INSTANTIATE_ATTENTION_2D_FWD_D(scalar_t, 16)                                          \
  AANET_INSTANTIATE_ATTENTION_2D_FWD_D(scalar_t, 32)                                          \
  AANET_INSTANTIATE_ATTENTION_2D_FWD_D(scalar_t, 64)                                          \
  AANET_INSTANTIATE_ATTENTION_2D_FWD_D(scalar_t, 128)

#endif // defined(__CUDACC__)
