// Register-resident backward kernels for fp16/bf16 (mma.sync, warp_mma.cuh), the same two passes
// as attention_2d_bwd.cuh (after the delta kernel there):
//   dK/dV: a block owns one KeyWalk tile of 64 keys, 16 per warp, and streams query tiles: the
//     transposed logits S^T = K Q^T and dP^T = V dO^T sit in registers with keys as rows, so
//     P^T and dS^T feed dV += P^T dO and dK += dS^T Q straight from the accumulators.
//   dQ: a block owns 64 queries, 16 per warp, and walks KeyWalk tiles as the forward does:
//     dQ += dS K from registers; dS goes through shared memory only when a bias is present, for
//     the bias gradients (a run's sum for the outer table, a sum over runs for the inner one).
// K, V fragments (dK/dV) or Q, dO fragments (dQ) are loaded once per block. Each streamed tile
// is read from global memory once, into a row-major [row][head dim] tile that serves as B both
// ways (warp_mma.cuh): [n][k] for S^T, dP^T (dK/dV) and S, dP (dQ), [k][n] for the products
// that take the logits as A. Every gradient entry
// has one owning block that visits tiles in a fixed order: deterministic, no atomics.
#pragma once

#include "logit_fragments.cuh"

namespace aanet_kernels::cuda::detail {

template <typename T, int D>
struct BwdMmaTiles {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kDTiles = D / 8;  // n-tiles of a head-dim accumulator
  static constexpr int kLdRow = D + 8;   // [row][head dim] tiles
  static_assert(is_fragment_row_pitch<T>(kLdRow), "[row][head dim] tiles: ldmatrix alignment, banks");

  // dK/dV kernel: kKeys keys per block, query tiles of kQueries.
  static constexpr int kKeys = 16 * kWarps;
  static constexpr int kQueries = D <= 64 ? 32 : 16;
  static constexpr size_t kKvK = 0;
  static constexpr size_t kKvV = kKvK + smem_align(sizeof(T) * kKeys * kLdRow);
  static constexpr size_t kKvQ = kKvV + smem_align(sizeof(T) * kKeys * kLdRow);
  static constexpr size_t kKvDo = kKvQ + smem_align(sizeof(T) * kQueries * kLdRow);
  static constexpr size_t kKvOuter = kKvDo + smem_align(sizeof(T) * kQueries * kLdRow);
  static constexpr size_t kKvInner = kKvOuter + smem_align(sizeof(float) * kQueries * kKeys);
  static constexpr size_t kKvLse = kKvInner + smem_align(sizeof(float) * kQueries * kKeys);
  static constexpr size_t kKvDelta = kKvLse + smem_align(sizeof(float) * kQueries);
  static constexpr size_t kKvBytes = kKvDelta + smem_align(sizeof(float) * kQueries);

  // dQ kernel: kRows queries per block, key tiles of kTile.
  static constexpr int kRows = 16 * kWarps;
  static constexpr int kTile = D <= 64 ? 32 : 16;
  static constexpr int kNTiles = kTile / 8;
  static constexpr int kLdDs = kTile + 1;  // fp32 dS, for the bias gradients
  // Blocks per SM the dQ kernel's register budget must allow. Left free, ptxas (sm_90) takes
  // 141, 143, 180 and 232 registers at head dims 16, 32, 64 and 128 (3, 3, 2, 2 blocks of 128
  // threads); asked for 4, 4 and 3 blocks it fits 128, 128 and 168 without a spill (3 blocks at
  // 128 spill). dK/dV takes 116, 125, 214 and 255: 4 blocks at 16 and 32 as it is, and 3 blocks
  // at 64 or 128 spill.
  static constexpr int kDqMinBlocks = D <= 32 ? 4 : D == 64 ? 3 : 1;
  static constexpr size_t kDqQ = 0;
  static constexpr size_t kDqDo = kDqQ + smem_align(sizeof(T) * kRows * kLdRow);
  static constexpr size_t kDqK = kDqDo + smem_align(sizeof(T) * kRows * kLdRow);
  static constexpr size_t kDqV = kDqK + smem_align(sizeof(T) * kTile * kLdRow);
  static constexpr size_t kDqDs = kDqV + smem_align(sizeof(T) * kTile * kLdRow);
  static constexpr size_t kDqInner = kDqDs + smem_align(sizeof(float) * kRows * kLdDs);
  static constexpr size_t kDqBytes = kDqInner + smem_align(sizeof(float) * kRows * kTile);

  // Grid widths (x; y = heads, z = batch) of backward_launches.
  __host__ __device__ static int dkdv_blocks(const Attention2dParams& p) {
    return KeyWalk::of(p.height, p.width, kKeys).tiles(kKeys);
  }
  __host__ __device__ static int dq_blocks(const Attention2dParams& p) {
    return (p.length + kRows - 1) / kRows;
  }
};

// (lse, delta) of query i of the (b, h) slice starting at row0; lse = -inf past L, so P = 0.
__device__ __forceinline__ void row_statistics(
    const Attention2dParams& p,
    int64_t row0,
    int i,
    float& lse,
    float& delta) {
  const bool ok = i < p.length;
  lse = ok ? static_cast<const float*>(p.lse)[row0 + i] : neg_inf<float>();
  delta = ok ? static_cast<const float*>(p.delta)[row0 + i] : 0.0f;
}

template <typename T, int D>
__global__ void __launch_bounds__(BwdMmaTiles<T, D>::kThreads)
    attention_2d_bwd_dkdv_mma_kernel(const Attention2dParams p) {
  using S = BwdMmaTiles<T, D>;
  constexpr int NT = S::kThreads;
  constexpr int BN = S::kKeys;
  constexpr int BM = S::kQueries;
  constexpr int kQTiles = BM / 8;  // n-tiles over the query tile

  extern __shared__ __align__(128) unsigned char smem[];
  T* s_k = reinterpret_cast<T*>(smem + S::kKvK);
  T* s_v = reinterpret_cast<T*>(smem + S::kKvV);
  T* s_q = reinterpret_cast<T*>(smem + S::kKvQ);
  T* s_do = reinterpret_cast<T*>(smem + S::kKvDo);
  float* s_outer = reinterpret_cast<float*>(smem + S::kKvOuter);  // [query][run of the tile]
  float* s_inner = reinterpret_cast<float*>(smem + S::kKvInner);  // [query][slot of a run]
  float* s_lse = reinterpret_cast<float*>(smem + S::kKvLse);
  float* s_delta = reinterpret_cast<float*>(smem + S::kKvDelta);

  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int len = p.length;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int quad = lane % 4;
  const float scale = static_cast<float>(p.scale);
  const int dk_steps = round_up(p.dkh, 16) / 16;
  const int dv_steps = round_up(p.dvh, 16) / 16;
  const int dk_tiles = round_up(p.dkh, 8) / 8;
  const int dv_tiles = round_up(p.dvh, 8) / 8;
  const int64_t row0 = (static_cast<int64_t>(b) * p.heads + h) * len;

  // This block's key tile: tiles are numbered outer-fastest within each inner chunk.
  const KeyWalk walk = KeyWalk::of(p.height, p.width, BN);
  const int runs = walk.runs_per_tile(BN);
  const int run = 1 << walk.inner_log2;
  const int outer_tiles = (walk.outer_size + runs - 1) / runs;
  const int inner0 = (static_cast<int>(blockIdx.x) / outer_tiles) * run;
  const int outer0 = (static_cast<int>(blockIdx.x) % outer_tiles) * runs;
  const WalkBias<T> bias(p, walk, b, h);
  const auto key_of = [&](int c) { return walk.key(outer0, inner0, c); };

  // This lane's two keys: slots 16 warp + lane / 4 (+ 8) of the tile.
  int slot[2];
  int key[2];
  for (int r = 0; r < 2; ++r) {
    slot[r] = 16 * warp + lane / 4 + 8 * r;
    key[r] = key_of(slot[r]);
  }

  load_rows<T, BN, D, NT>(s_k, S::kLdRow, head_ptr<T>(p.k, b, h), p.k.stride[2], p.k.stride[3],
                          p.dkh, key_of);
  load_rows<T, BN, D, NT>(s_v, S::kLdRow, head_ptr<T>(p.v, b, h), p.v.stride[2], p.v.stride[3],
                          p.dvh, key_of);
  __syncthreads();
  uint32_t k_frag[D / 16][4];
  uint32_t v_frag[D / 16][4];
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    load_a_fragment(k_frag[ks], s_k, S::kLdRow, 16 * warp, 16 * ks, lane);
    load_a_fragment(v_frag[ks], s_v, S::kLdRow, 16 * warp, 16 * ks, lane);
  }

  float dk[S::kDTiles][4] = {};
  float dv[S::kDTiles][4] = {};
  const T* q = head_ptr<T>(p.q, b, h);
  const T* d_out = head_ptr<T>(p.grad_out, b, h);
  for (int m0 = 0; m0 < len; m0 += BM) {
    const auto query_of = [=](int r) { return m0 + r < len ? m0 + r : -1; };
    __syncthreads();  // the previous query tile's fragments are read
    load_rows<T, BM, D, NT>(s_q, S::kLdRow, q, p.q.stride[2], p.q.stride[3], p.dkh, query_of);
    load_rows<T, BM, D, NT>(s_do, S::kLdRow, d_out, p.grad_out.stride[2], p.grad_out.stride[3],
                            p.dvh, query_of);
    // The biases of these queries against this tile's runs (outer) and run slots (inner).
    for (int idx = threadIdx.x; idx < BM * BN; idx += NT) {
      const int r = idx / BN;
      const int c = idx % BN;
      const int i = m0 + r;
      const bool row_ok = i < len;
      s_outer[idx] = bias.outer != nullptr && row_ok && c < runs && outer0 + c < walk.outer_size
          ? bias.outer_at(i, outer0 + c)
          : 0.0f;
      s_inner[idx] = bias.inner != nullptr && row_ok && c < run && inner0 + c < walk.inner_size
          ? bias.inner_at(i, inner0 + c)
          : 0.0f;
    }
    for (int r = threadIdx.x; r < BM; r += NT) {
      row_statistics(p, row0, m0 + r, s_lse[r], s_delta[r]);
    }
    __syncthreads();

    float probs[kQTiles][4] = {};   // S^T, then P^T
    float dprobs[kQTiles][4] = {};  // dP^T, then dS^T
    mma_a_by_tile<T>(probs, k_frag, s_q, S::kLdRow, dk_steps, kQTiles, lane);
    mma_a_by_tile<T>(dprobs, v_frag, s_do, S::kLdRow, dv_steps, kQTiles, lane);
#pragma unroll
    for (int nt = 0; nt < kQTiles; ++nt) {
#pragma unroll
      for (int v4 = 0; v4 < 4; ++v4) {
        const int r = v4 / 2;  // which of the lane's keys
        const int c = 8 * nt + 2 * quad + v4 % 2;  // query within the tile
        const float lse = s_lse[c];
        float prob = 0.0f;
        if (key[r] >= 0 && lse != neg_inf<float>()) {
          const float logit = scale * probs[nt][v4] +
              s_outer[c * BN + (slot[r] >> walk.inner_log2)] +
              s_inner[c * BN + (slot[r] & (run - 1))];
          prob = exp_acc(logit - lse);
        }
        probs[nt][v4] = prob;
        dprobs[nt][v4] = prob * (dprobs[nt][v4] - s_delta[c]);
      }
    }
    mma_accumulators_by_tile<T>(dv, probs, s_do, S::kLdRow, dv_tiles, lane);
    mma_accumulators_by_tile<T>(dk, dprobs, s_q, S::kLdRow, dk_tiles, lane);
  }

  T* dk_out = static_cast<T*>(p.dk);
  T* dv_out = static_cast<T*>(p.dv);
  for (int r = 0; r < 2; ++r) {
    if (key[r] < 0) {
      continue;
    }
    const int64_t row = row0 + key[r];
    store_accumulator_row(dk_out + row * p.dkh, dk, r, scale, p.dkh, lane);
    store_accumulator_row(dv_out + row * p.dvh, dv, r, 1.0f, p.dvh, lane);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(BwdMmaTiles<T, D>::kThreads, BwdMmaTiles<T, D>::kDqMinBlocks)
    attention_2d_bwd_dq_mma_kernel(const Attention2dParams p) {
  using S = BwdMmaTiles<T, D>;
  constexpr int NT = S::kThreads;
  constexpr int BM = S::kRows;
  constexpr int BN = S::kTile;

  extern __shared__ __align__(128) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem + S::kDqQ);
  T* s_do = reinterpret_cast<T*>(smem + S::kDqDo);
  T* s_k = reinterpret_cast<T*>(smem + S::kDqK);
  T* s_v = reinterpret_cast<T*>(smem + S::kDqV);
  float* s_ds = reinterpret_cast<float*>(smem + S::kDqDs);
  float* s_inner_grad = reinterpret_cast<float*>(smem + S::kDqInner);

  const int m0 = blockIdx.x * BM;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int len = p.length;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int quad = lane % 4;
  const float scale = static_cast<float>(p.scale);
  const int dk_steps = round_up(p.dkh, 16) / 16;
  const int dv_steps = round_up(p.dvh, 16) / 16;
  const int dk_tiles = round_up(p.dkh, 8) / 8;
  const int64_t row0 = (static_cast<int64_t>(b) * p.heads + h) * len;

  const KeyWalk walk = KeyWalk::of(p.height, p.width, BN);
  const int runs = walk.runs_per_tile(BN);
  const int run = 1 << walk.inner_log2;
  const WalkBias<T> bias(p, walk, b, h);
  const LaneRows rows(m0, warp, lane, len);
  // Bias gradients (B, Nh, L, size) in fp32, in the walk's terms; null when that bias is absent.
  float* dbias_outer = static_cast<float*>(walk.transposed ? p.dbias_w : p.dbias_h);
  float* dbias_inner = static_cast<float*>(walk.transposed ? p.dbias_h : p.dbias_w);
  dbias_outer = dbias_outer ? dbias_outer + row0 * walk.outer_size : nullptr;
  dbias_inner = dbias_inner ? dbias_inner + row0 * walk.inner_size : nullptr;
  const bool bias_grads = dbias_outer != nullptr || dbias_inner != nullptr;

  load_tile<T, BM, D, NT>(s_q, S::kLdRow, head_ptr<T>(p.q, b, h), p.q.stride[2], p.q.stride[3],
                          m0, len, p.dkh);
  load_tile<T, BM, D, NT>(s_do, S::kLdRow, head_ptr<T>(p.grad_out, b, h), p.grad_out.stride[2],
                          p.grad_out.stride[3], m0, len, p.dvh);
  __syncthreads();
  uint32_t q_frag[D / 16][4];
  uint32_t do_frag[D / 16][4];
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    load_a_fragment(q_frag[ks], s_q, S::kLdRow, 16 * warp, 16 * ks, lane);
    load_a_fragment(do_frag[ks], s_do, S::kLdRow, 16 * warp, 16 * ks, lane);
  }
  float lse[2];
  float delta[2];
  for (int r = 0; r < 2; ++r) {
    row_statistics(p, row0, rows.index[r], lse[r], delta[r]);
  }

  float dq[S::kDTiles][4] = {};
  const T* k = head_ptr<T>(p.k, b, h);
  const T* v = head_ptr<T>(p.v, b, h);
  for (int inner0 = 0; inner0 < walk.inner_size; inner0 += run) {
    InnerSlots<S::kNTiles> slots;
    slots.load(bias, walk, rows, inner0, quad);
    // This thread's entries (query r, run slot x) of the inner gradient, the same every tile.
    for (int idx = threadIdx.x; idx < BM * run; idx += NT) {
      s_inner_grad[idx] = 0.0f;
    }

    for (int outer0 = 0; outer0 < walk.outer_size; outer0 += runs) {
      const auto key_of = [&](int c) { return walk.key(outer0, inner0, c); };
      __syncthreads();  // the previous tile's fragments and dS are read
      load_rows<T, BN, D, NT>(s_k, S::kLdRow, k, p.k.stride[2], p.k.stride[3], p.dkh, key_of);
      load_rows<T, BN, D, NT>(s_v, S::kLdRow, v, p.v.stride[2], p.v.stride[3], p.dvh, key_of);
      __syncthreads();

      float logits[S::kNTiles][4] = {};  // S, then P, then dS
      float dprobs[S::kNTiles][4] = {};  // dP
      mma_a_by_tile<T>(logits, q_frag, s_k, S::kLdRow, dk_steps, S::kNTiles, lane);
      mma_a_by_tile<T>(dprobs, do_frag, s_v, S::kLdRow, dv_steps, S::kNTiles, lane);
      bias_and_mask(logits, scale, slots, bias, walk, rows, outer0, quad);
#pragma unroll
      for (int nt = 0; nt < S::kNTiles; ++nt) {
#pragma unroll
        for (int v4 = 0; v4 < 4; ++v4) {
          const int r = v4 / 2;
          // lse = -inf marks a fully masked row (or a row past L): all its weights are zero.
          const float prob = lse[r] == neg_inf<float>() ? 0.0f : exp_acc(logits[nt][v4] - lse[r]);
          logits[nt][v4] = prob * (dprobs[nt][v4] - delta[r]);
        }
      }
      mma_accumulators_by_tile<T>(dq, logits, s_k, S::kLdRow, dk_tiles, lane);

      if (bias_grads) {
#pragma unroll
        for (int nt = 0; nt < S::kNTiles; ++nt) {
#pragma unroll
          for (int v4 = 0; v4 < 4; ++v4) {
            const int r = 16 * warp + lane / 4 + 8 * (v4 / 2);
            s_ds[r * S::kLdDs + 8 * nt + 2 * quad + v4 % 2] = logits[nt][v4];
          }
        }
        __syncthreads();
        // Outer gradient: each run of the tile is one outer coordinate; sum its existing slots.
        for (int idx = threadIdx.x; dbias_outer != nullptr && idx < BM * runs; idx += NT) {
          const int r = idx / runs;
          const int k_run = idx % runs;
          const int i = m0 + r;
          if (i < len && outer0 + k_run < walk.outer_size) {
            float sum = 0.0f;
            for (int x = 0; x < run && inner0 + x < walk.inner_size; ++x) {
              sum += s_ds[r * S::kLdDs + k_run * run + x];
            }
            dbias_outer[static_cast<int64_t>(i) * walk.outer_size + outer0 + k_run] += sum;
          }
        }
        // Inner gradient: slot x of every existing run of the tile, into this thread's entry.
        for (int idx = threadIdx.x; dbias_inner != nullptr && idx < BM * run; idx += NT) {
          const int r = idx / run;
          const int x = idx % run;
          float sum = 0.0f;
          for (int k_run = 0; k_run < runs && outer0 + k_run < walk.outer_size; ++k_run) {
            sum += s_ds[r * S::kLdDs + k_run * run + x];
          }
          s_inner_grad[idx] += sum;
        }
      }
    }

    for (int idx = threadIdx.x; dbias_inner != nullptr && idx < BM * run; idx += NT) {
      const int i = m0 + idx / run;
      const int inner = inner0 + idx % run;
      if (i < len && inner < walk.inner_size) {
        dbias_inner[static_cast<int64_t>(i) * walk.inner_size + inner] = s_inner_grad[idx];
      }
    }
  }

  T* dq_out = static_cast<T*>(p.dq);
  for (int r = 0; r < 2; ++r) {
    if (!rows.ok[r]) {
      continue;
    }
    const int64_t row = row0 + rows.index[r];
    store_accumulator_row(dq_out + row * p.dkh, dq, r, scale, p.dkh, lane);
  }
}

} // namespace aanet_kernels::cuda::detail
