// Backward kernels, as in FlashAttention-2 and Triton's fused-attention tutorial:
//   1. delta[i] = sum_d dO[i, d] * O[i, d]
//   2. per key tile: dV = sum_i P^T dO, dK = scale * sum_i dS^T Q   (recomputing P from lse)
//   3. per query tile: dQ = scale * sum_j dS K, and the bias gradients
//        dbias_h[i, y] = sum_{j in key row y} dS[i, j],  dbias_w[i, x] = sum_{j in key column x} dS[i, j]
// with P = exp(S - lse) and dS = P * (dP - delta), dP = dO V^T. Each block owns the rows it writes
// and visits tiles in a fixed order, so every gradient is deterministic (no atomics).
// Passes 2 and 3 here stage every tile in shared memory (fp32/fp64); fp16/bf16 take the
// register-resident kernels of attention_2d_bwd_mma.cuh.
#pragma once

#include "attention_2d_bwd_mma.cuh"
#include "attention_2d_common.cuh"

#include <algorithm>
#include <array>

namespace aanet_kernels::cuda::detail {

// Shared-memory layout of both backward kernels; kRes rows are the block's resident rows (keys
// for dK/dV, queries for dQ), the others stream through in tiles of kStream rows.
template <typename T, int D, bool KEYS_RESIDENT>
struct BwdSmem {
  using A = AccOf<T>;
  using Cfg = Tiles<T, D>;
  static constexpr int BM = Cfg::kBwdM, BN = Cfg::kBwdN;  // query rows, key rows per step
  static constexpr int kRes = KEYS_RESIDENT ? BN : BM;
  static constexpr int kLdT = D + Cfg::kPadT;   // Q, dO, K, V
  static constexpr int kLdA = D + Cfg::kPadA;   // the two resident accumulators (dK, dV or dQ)
  static constexpr int kLdS = BN + Cfg::kPadA;  // S and dP (BM x BN)
  static constexpr int kLdP = BN + Cfg::kPadT;  // P and dS in T (BM x BN)
  static constexpr size_t kQ = 0;
  static constexpr size_t kDO = kQ + smem_align(sizeof(T) * BM * kLdT);
  static constexpr size_t kK = kDO + smem_align(sizeof(T) * BM * kLdT);
  static constexpr size_t kV = kK + smem_align(sizeof(T) * BN * kLdT);
  static constexpr size_t kAcc0 = kV + smem_align(sizeof(T) * BN * kLdT);
  static constexpr size_t kAcc1 = kAcc0 + smem_align(sizeof(A) * kRes * kLdA);
  static constexpr size_t kS = kAcc1 + (KEYS_RESIDENT ? smem_align(sizeof(A) * kRes * kLdA) : 0);
  static constexpr size_t kDP = kS + smem_align(sizeof(A) * BM * kLdS);
  static constexpr size_t kP = kDP + smem_align(sizeof(A) * BM * kLdS);
  static constexpr size_t kDS = kP + smem_align(sizeof(T) * BM * kLdP);
  // lse (StatOf<T>) as two A parts, hi = A(lse) and lo = A(lse - hi): P = exp((S - hi) - lo).
  static constexpr size_t kLseHi = kDS + smem_align(sizeof(T) * BM * kLdP);
  static constexpr size_t kLseLo = kLseHi + smem_align(sizeof(A) * BM);
  static constexpr size_t kDelta = kLseLo + smem_align(sizeof(A) * BM);
  static constexpr size_t kKeyY = kDelta + smem_align(sizeof(A) * BM);  // key_coordinates
  static constexpr size_t kKeyX = kKeyY + smem_align(sizeof(int) * BN);
  static constexpr size_t kBytes = kKeyX + smem_align(sizeof(int) * BN);
};

// delta = rowsum(dO * O), G consecutive lanes per (b, h, i) row: lane g sums elements g, g + G,
// ..., then a butterfly over the group. With one thread per row, neighbouring lanes read
// addresses a whole row apart (a sector each at head dims 64 and 128); a group reads
// consecutive elements, coalesced when the head dim is contiguous. The summation order is fixed,
// so delta is deterministic.
template <int D>
constexpr int delta_lanes_per_row() {
  return D / 2 < 32 ? D / 2 : 32;
}

template <typename T, int G>
__global__ void attention_2d_delta_kernel(const Attention2dParams p) {
  using A = AccOf<T>;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.length;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  const int lane = static_cast<int>(threadIdx.x % G);
  A sum = A(0);
  if (row < rows) {
    const int i = static_cast<int>(row % p.length);
    const int h = static_cast<int>((row / p.length) % p.heads);
    const int b = static_cast<int>(row / (static_cast<int64_t>(p.length) * p.heads));
    const T* d_out = head_ptr<T>(p.grad_out, b, h) + i * p.grad_out.stride[2];
    const T* out = head_ptr<T>(p.out_in, b, h) + i * p.out_in.stride[2];
    for (int d = lane; d < p.dvh; d += G) {
      sum += to_acc(d_out[d * p.grad_out.stride[3]]) * to_acc(out[d * p.out_in.stride[3]]);
    }
  }
  sum = group_sum<G>(sum);  // no early return above: every lane of the warp takes part
  if (row < rows && lane == 0) {
    static_cast<A*>(p.delta)[row] = sum;
  }
}

// Loads the query-side tiles of rows [m0, m0 + BM): Q, dO, lse (-inf past L, so P = 0 there)
// and delta.
template <typename T, int D, bool KEYS_RESIDENT>
__device__ __forceinline__ void load_query_side(
    const Attention2dParams& p,
    int b,
    int h,
    int m0,
    unsigned char* smem) {
  using A = AccOf<T>;
  using S = BwdSmem<T, D, KEYS_RESIDENT>;
  constexpr int NT = Tiles<T, D>::kThreads;
  const int len = p.length;
  load_tile<T, S::BM, D, NT>(
      reinterpret_cast<T*>(smem + S::kQ), S::kLdT, head_ptr<T>(p.q, b, h), p.q.stride[2],
      p.q.stride[3], m0, len, p.dkh);
  load_tile<T, S::BM, D, NT>(
      reinterpret_cast<T*>(smem + S::kDO), S::kLdT, head_ptr<T>(p.grad_out, b, h),
      p.grad_out.stride[2], p.grad_out.stride[3], m0, len, p.dvh);
  const int64_t row0 = (static_cast<int64_t>(b) * p.heads + h) * len;
  using Stat = StatOf<T>;
  A* s_lse_hi = reinterpret_cast<A*>(smem + S::kLseHi);
  A* s_lse_lo = reinterpret_cast<A*>(smem + S::kLseLo);
  A* s_delta = reinterpret_cast<A*>(smem + S::kDelta);
  for (int r = threadIdx.x; r < S::BM; r += NT) {
    const int i = m0 + r;
    const Stat lse = i < len ? static_cast<const Stat*>(p.lse)[row0 + i] : neg_inf<Stat>();
    const A hi = static_cast<A>(lse);
    s_lse_hi[r] = hi;
    s_lse_lo[r] = lse == neg_inf<Stat>() ? A(0) : static_cast<A>(lse - static_cast<Stat>(hi));
    s_delta[r] = i < len ? static_cast<const A*>(p.delta)[row0 + i] : A(0);
  }
}

template <typename T, int D, bool KEYS_RESIDENT>
__device__ __forceinline__ void load_key_side(
    const Attention2dParams& p,
    int b,
    int h,
    int n0,
    unsigned char* smem) {
  using S = BwdSmem<T, D, KEYS_RESIDENT>;
  constexpr int NT = Tiles<T, D>::kThreads;
  load_tile<T, S::BN, D, NT>(
      reinterpret_cast<T*>(smem + S::kK), S::kLdT, head_ptr<T>(p.k, b, h), p.k.stride[2],
      p.k.stride[3], n0, p.length, p.dkh);
  load_tile<T, S::BN, D, NT>(
      reinterpret_cast<T*>(smem + S::kV), S::kLdT, head_ptr<T>(p.v, b, h), p.v.stride[2],
      p.v.stride[3], n0, p.length, p.dvh);
  key_coordinates<S::BN, NT>(
      reinterpret_cast<int*>(smem + S::kKeyY), reinterpret_cast<int*>(smem + S::kKeyX), n0,
      p.width);
}

// With Q, dO, K, V, lse and delta of one (query tile, key tile) pair in shared memory:
// S = Q K^T and dP = dO V^T, then P and dS elementwise. P goes to s_p (T); dS to s_ds (T) and,
// in acc precision, over S (for the bias gradients). Ends with a barrier.
template <typename T, int D, bool KEYS_RESIDENT>
__device__ __forceinline__ void probs_and_dlogits(
    const Attention2dParams& p,
    int b,
    int h,
    int m0,
    int n0,
    unsigned char* smem) {
  using A = AccOf<T>;
  using Cfg = Tiles<T, D>;
  using S = BwdSmem<T, D, KEYS_RESIDENT>;
  constexpr int NT = Cfg::kThreads;
  constexpr int BM = S::BM;
  constexpr int BN = S::BN;
  const T* s_q = reinterpret_cast<const T*>(smem + S::kQ);
  const T* s_do = reinterpret_cast<const T*>(smem + S::kDO);
  const T* s_k = reinterpret_cast<const T*>(smem + S::kK);
  const T* s_v = reinterpret_cast<const T*>(smem + S::kV);
  A* s_s = reinterpret_cast<A*>(smem + S::kS);
  A* s_dp = reinterpret_cast<A*>(smem + S::kDP);
  T* s_p = reinterpret_cast<T*>(smem + S::kP);
  T* s_ds = reinterpret_cast<T*>(smem + S::kDS);
  const A* s_lse_hi = reinterpret_cast<const A*>(smem + S::kLseHi);
  const A* s_lse_lo = reinterpret_cast<const A*>(smem + S::kLseLo);
  const A* s_delta = reinterpret_cast<const A*>(smem + S::kDelta);
  const int* s_key_y = reinterpret_cast<const int*>(smem + S::kKeyY);
  const int* s_key_x = reinterpret_cast<const int*>(smem + S::kKeyX);

  block_gemm<T, A, true, false, NT>(
      s_s, S::kLdS, s_q, S::kLdT, s_k, S::kLdT, BM, BN, round_up(p.dkh, Cfg::kStep), false);
  block_gemm<T, A, true, false, NT>(
      s_dp, S::kLdS, s_do, S::kLdT, s_v, S::kLdT, BM, BN, round_up(p.dvh, Cfg::kStep), false);
  __syncthreads();

  const int len = p.length;
  const A scale = static_cast<A>(p.scale);
  const T* bias_h = p.bias_h.ptr ? head_ptr<T>(p.bias_h, b, h) : nullptr;
  const T* bias_w = p.bias_w.ptr ? head_ptr<T>(p.bias_w, b, h) : nullptr;
  for (int idx = threadIdx.x; idx < BM * BN; idx += NT) {
    const int r = idx / BN;
    const int c = idx % BN;
    const int i = m0 + r;
    const int j = n0 + c;
    const A lse_hi = s_lse_hi[r];
    A prob = A(0);
    // lse = -inf marks a fully masked row (or a row past L): its probabilities are all zero.
    if (i < len && j < len && lse_hi != neg_inf<A>()) {
      const A logit = scale * s_s[r * S::kLdS + c] +
          bias_at<T, A>(bias_h, bias_w, p.bias_h, p.bias_w, i, s_key_y[c], s_key_x[c]);
      prob = exp_acc((logit - lse_hi) - s_lse_lo[r]);
    }
    const A dlogit = prob * (s_dp[r * S::kLdS + c] - s_delta[r]);
    s_p[r * S::kLdP + c] = from_acc<T>(prob);
    s_ds[r * S::kLdP + c] = from_acc<T>(dlogit);
    s_s[r * S::kLdS + c] = dlogit;
  }
  __syncthreads();
}

// dK, dV for key rows [n0, n0 + BN).
template <typename T, int D>
__global__ void __launch_bounds__(Tiles<T, D>::kThreads)
    attention_2d_bwd_dkdv_kernel(const Attention2dParams p) {
  using A = AccOf<T>;
  using Cfg = Tiles<T, D>;
  using S = BwdSmem<T, D, true>;
  constexpr int NT = Cfg::kThreads;
  constexpr int BM = S::BM;
  constexpr int BN = S::BN;
  extern __shared__ __align__(128) unsigned char smem[];
  const T* s_q = reinterpret_cast<const T*>(smem + S::kQ);
  const T* s_do = reinterpret_cast<const T*>(smem + S::kDO);
  A* s_dk = reinterpret_cast<A*>(smem + S::kAcc0);
  A* s_dv = reinterpret_cast<A*>(smem + S::kAcc1);
  const T* s_p = reinterpret_cast<const T*>(smem + S::kP);
  const T* s_ds = reinterpret_cast<const T*>(smem + S::kDS);

  const int n0 = blockIdx.x * BN;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int len = p.length;
  const int dk_pad = round_up(p.dkh, Cfg::kStep);
  const int dv_pad = round_up(p.dvh, Cfg::kStep);

  load_key_side<T, D, true>(p, b, h, n0, smem);
  zero_tile<A, BN, D, NT>(s_dk, S::kLdA);
  zero_tile<A, BN, D, NT>(s_dv, S::kLdA);
  for (int m0 = 0; m0 < len; m0 += BM) {
    load_query_side<T, D, true>(p, b, h, m0, smem);
    __syncthreads();
    probs_and_dlogits<T, D, true>(p, b, h, m0, n0, smem);
    // dV += P^T dO and dK += dS^T Q (P and dS read transposed).
    block_gemm<T, A, false, true, NT>(
        s_dv, S::kLdA, s_p, S::kLdP, s_do, S::kLdT, BN, dv_pad, BM, true);
    block_gemm<T, A, false, true, NT>(
        s_dk, S::kLdA, s_ds, S::kLdP, s_q, S::kLdT, BN, dk_pad, BM, true);
    __syncthreads();
  }

  const A scale = static_cast<A>(p.scale);
  const int64_t row0 = (static_cast<int64_t>(b) * p.heads + h) * len;
  T* dk = static_cast<T*>(p.dk);
  T* dv = static_cast<T*>(p.dv);
  for (int idx = threadIdx.x; idx < BN * D; idx += NT) {
    const int r = idx / D;
    const int d = idx % D;
    const int j = n0 + r;
    if (j < len && d < p.dkh) {
      dk[(row0 + j) * p.dkh + d] = from_acc<T>(scale * s_dk[r * S::kLdA + d]);
    }
    if (j < len && d < p.dvh) {
      dv[(row0 + j) * p.dvh + d] = from_acc<T>(s_dv[r * S::kLdA + d]);
    }
  }
}

// dQ and the bias gradients for query rows [m0, m0 + BM).
template <typename T, int D>
__global__ void __launch_bounds__(Tiles<T, D>::kThreads)
    attention_2d_bwd_dq_kernel(const Attention2dParams p) {
  using A = AccOf<T>;
  using Cfg = Tiles<T, D>;
  using S = BwdSmem<T, D, false>;
  constexpr int NT = Cfg::kThreads;
  constexpr int BM = S::BM;
  constexpr int BN = S::BN;
  extern __shared__ __align__(128) unsigned char smem[];
  const T* s_k = reinterpret_cast<const T*>(smem + S::kK);
  A* s_dq = reinterpret_cast<A*>(smem + S::kAcc0);
  const A* s_dlogit = reinterpret_cast<const A*>(smem + S::kS);
  const T* s_ds = reinterpret_cast<const T*>(smem + S::kDS);

  const int m0 = blockIdx.x * BM;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int len = p.length;
  const int width = p.width;
  const int dk_pad = round_up(p.dkh, Cfg::kStep);
  const int64_t row0 = (static_cast<int64_t>(b) * p.heads + h) * len;
  A* dbias_h = p.dbias_h ? static_cast<A*>(p.dbias_h) + row0 * p.height : nullptr;
  A* dbias_w = p.dbias_w ? static_cast<A*>(p.dbias_w) + row0 * width : nullptr;

  load_query_side<T, D, false>(p, b, h, m0, smem);
  zero_tile<A, BM, D, NT>(s_dq, S::kLdA);
  for (int n0 = 0; n0 < len; n0 += BN) {
    load_key_side<T, D, false>(p, b, h, n0, smem);
    __syncthreads();
    probs_and_dlogits<T, D, false>(p, b, h, m0, n0, smem);
    // dQ += dS K.
    block_gemm<T, A, true, true, NT>(
        s_dq, S::kLdA, s_ds, S::kLdP, s_k, S::kLdT, BM, dk_pad, BN, true);

    const int n_end = min(n0 + BN, len);
    if (dbias_h != nullptr) {
      // Key rows y_first..y_last meet this tile; row y covers keys [y * width, (y + 1) * width).
      const int y_first = n0 / width;
      const int n_y = (n_end - 1) / width - y_first + 1;
      for (int idx = threadIdx.x; idx < BM * n_y; idx += NT) {
        const int r = idx / n_y;
        const int y = y_first + idx % n_y;
        const int i = m0 + r;
        if (i >= len) {
          continue;
        }
        const int j_end = min(n_end, (y + 1) * width);
        A sum = A(0);
        for (int j = max(n0, y * width); j < j_end; ++j) {
          sum += s_dlogit[r * S::kLdS + (j - n0)];
        }
        dbias_h[static_cast<int64_t>(i) * p.height + y] += sum;
      }
    }
    if (dbias_w != nullptr) {
      // Keys n0 + s, s < min(width, tile length), have distinct columns (n0 + s) % width; the
      // tile's other keys of that column follow every width keys.
      const int n_x = min(width, n_end - n0);
      for (int idx = threadIdx.x; idx < BM * n_x; idx += NT) {
        const int r = idx / n_x;
        const int s = idx % n_x;
        const int i = m0 + r;
        if (i >= len) {
          continue;
        }
        A sum = A(0);
        for (int j = n0 + s; j < n_end; j += width) {
          sum += s_dlogit[r * S::kLdS + (j - n0)];
        }
        dbias_w[static_cast<int64_t>(i) * width + (n0 + s) % width] += sum;
      }
    }
    __syncthreads();
  }

  const A scale = static_cast<A>(p.scale);
  T* dq = static_cast<T*>(p.dq);
  for (int idx = threadIdx.x; idx < BM * D; idx += NT) {
    const int r = idx / D;
    const int d = idx % D;
    const int i = m0 + r;
    if (i < len && d < p.dkh) {
      dq[(row0 + i) * p.dkh + d] = from_acc<T>(scale * s_dq[r * S::kLdA + d]);
    }
  }
}

// The backward's three launches, in stream order: delta (a lane group per query row), dK/dV (a
// block per key tile), dQ and the bias gradients (a block per query tile).
template <typename T, int D>
std::array<KernelLaunch, 3> backward_launches(const Attention2dParams& p) {
  constexpr unsigned kDeltaThreads = 256;
  constexpr int kDeltaLanes = delta_lanes_per_row<D>();
  const int64_t delta_threads = static_cast<int64_t>(p.batch) * p.heads * p.length * kDeltaLanes;
  const KernelLaunch delta{
      attention_2d_delta_kernel<T, kDeltaLanes>,
      dim3(static_cast<unsigned>((delta_threads + kDeltaThreads - 1) / kDeltaThreads)),
      kDeltaThreads, 0};
  if constexpr (kTensorCore<T>) {
    using S = BwdMmaTiles<T, D>;
    return {
        delta,
        KernelLaunch{attention_2d_bwd_dkdv_mma_kernel<T, D>,
                     dim3(S::dkdv_blocks(p), p.heads, p.batch), S::kThreads, S::kKvBytes},
        KernelLaunch{attention_2d_bwd_dq_mma_kernel<T, D>, dim3(S::dq_blocks(p), p.heads, p.batch),
                     S::kThreads, S::kDqBytes}};
  } else {
    using SKV = BwdSmem<T, D, true>;
    using SQ = BwdSmem<T, D, false>;
    constexpr unsigned kThreads = Tiles<T, D>::kThreads;
    return {
        delta,
        KernelLaunch{attention_2d_bwd_dkdv_kernel<T, D>, tile_grid(p.length, SKV::BN, p),
                     kThreads, SKV::kBytes},
        KernelLaunch{attention_2d_bwd_dq_kernel<T, D>, tile_grid(p.length, SQ::BM, p), kThreads,
                     SQ::kBytes}};
  }
}

} // namespace aanet_kernels::cuda::detail

// Launchers need nvcc; a host compiler sees only the kernels and their launch plans
// (csrc/cuda/emulation/ runs them on the CPU to check the index math without a GPU).
#if defined(__CUDACC__)

namespace aanet_kernels::cuda {

template <typename scalar_t, int D>
void launch_attention_2d_bwd(const Attention2dParams& params, cudaStream_t stream) {
  using T = typename detail::DeviceTypeOf<scalar_t>::type;
  for (const detail::KernelLaunch& plan : detail::backward_launches<T, D>(params)) {
    detail::launch(plan, params, stream);
  }
}

template <typename scalar_t, int D>
size_t attention_2d_bwd_smem_bytes() {
  using T = typename detail::DeviceTypeOf<scalar_t>::type;
  size_t bytes = 0;
  for (const detail::KernelLaunch& plan :
       detail::backward_launches<T, D>(detail::one_position_params())) {
    bytes = std::max(bytes, plan.smem_bytes);
  }
  return bytes;
}

} // namespace aanet_kernels::cuda

#define AANET_INSTANTIATE_ATTENTION_2D_BWD_D(scalar_t, D)                                     \
  template void aanet_kernels::cuda::launch_attention_2d_bwd<scalar_t, D>(                   \
      const aanet_kernels::cuda::Attention2dParams&, cudaStream_t);                          \
  template size_t aanet_kernels::cuda::attention_2d_bwd_smem_bytes<scalar_t, D>();
#define AANET_INSTANTIATE_ATTENTION_2D_BWD(scalar_t)                                          \
  AANET_INSTANTIATE_ATTENTION_2D_BWD_D(scalar_t, 16)                                          \
  AANET_INSTANTIATE_ATTENTION_2D_BWD_D(scalar_t, 32)                                          \
  AANET_INSTANTIATE_ATTENTION_2D_BWD_D(scalar_t, 64)                                          \
  AANET_INSTANTIATE_ATTENTION_2D_BWD_D(scalar_t, 128)

#endif // defined(__CUDACC__)
