// Forward kernel: flash-style online softmax over key tiles, the two bias tables added per tile
// by key row (j / width) and key column (j % width), log-sum-exp saved for backward.
// One block per (query tile, head, batch).
#pragma once

#include "attention_2d_common.cuh"

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
      static_cast<A*>(p.lse)[row] = row_sum > A(0) ? row_max + log_acc(row_sum) : neg_inf<A>();
    }
  }
}

} // namespace aanet_kernels::cuda::detail

// Launchers need nvcc; a host compiler sees only the kernels (csrc/cuda/emulation/ runs them on
// the CPU to check the index math without a GPU).
#if defined(__CUDACC__)

namespace aanet_kernels::cuda {

template <typename scalar_t, int D>
void launch_attention_2d_fwd(const Attention2dParams& params, cudaStream_t stream) {
  using T = typename detail::DeviceTypeOf<scalar_t>::type;
  using S = detail::FwdSmem<T, D>;
  auto kernel = detail::attention_2d_fwd_kernel<T, D>;
  detail::prepare_smem(kernel, S::kBytes);
  kernel<<<detail::tile_grid(params.length, S::BM, params), detail::Tiles<T, D>::kThreads,
           S::kBytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

} // namespace aanet_kernels::cuda

// Explicit instantiation for all padded head dims of one input type (used by the fwd_*.cu files).
#define AANET_INSTANTIATE_ATTENTION_2D_FWD(scalar_t)                                          \
  template void aanet_kernels::cuda::launch_attention_2d_fwd<scalar_t, 16>(                  \
      const aanet_kernels::cuda::Attention2dParams&, cudaStream_t);                          \
  template void aanet_kernels::cuda::launch_attention_2d_fwd<scalar_t, 32>(                  \
      const aanet_kernels::cuda::Attention2dParams&, cudaStream_t);                          \
  template void aanet_kernels::cuda::launch_attention_2d_fwd<scalar_t, 64>(                  \
      const aanet_kernels::cuda::Attention2dParams&, cudaStream_t);                          \
  template void aanet_kernels::cuda::launch_attention_2d_fwd<scalar_t, 128>(                 \
      const aanet_kernels::cuda::Attention2dParams&, cudaStream_t);

#endif // defined(__CUDACC__)
