// Warp-level tensor-core tiles held in registers: the m16n8k16 MMA of sm_80+ (fp16/bf16 inputs,
// fp32 accumulators) and the helpers that build its operand fragments.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"); lane
// = 4 * group + quad, group = lane / 4 in 0..7, quad = lane % 4 in 0..3:
//   A (16 x 16, row-major), 4 registers of two elements each:
//     a[0] = A[group][2q, 2q+1]      a[1] = A[group + 8][2q, 2q+1]
//     a[2] = A[group][2q+8, 2q+9]    a[3] = A[group + 8][2q+8, 2q+9]
//   B (16 x 8, "col"), 2 registers:  b[0] = B[2q, 2q+1][group]   b[1] = B[2q+8, 2q+9][group]
//   C, D (16 x 8, fp32), 4 values:   c[0], c[1] = C[group][2q, 2q+1]  c[2], c[3] = C[group+8][..]
// So the accumulators of two adjacent n-tiles, rounded and packed pairwise, are the A operand of
// the next product (how the forward feeds P to P V without shared memory). B comes from shared
// memory in either layout of the same row-major [row][head dim] tile: as [n][k] (K for Q K^T) with
// one 32-bit load per register, or as [k][n] (V for P V, K for dS K) through ldmatrix.trans, so
// no operand is stored twice or read from global memory twice.
//
// Host emulation (csrc/cuda/emulation/) defines AANET_KERNELS_HOST_EMULATION and supplies
// emulated_mma_m16n8k16 and emulated_ldmatrix_trans, which exchange a warp's fragments (or row
// addresses) through memory and apply the PTX ISA's layouts, so the fragment index math here is
// checked on a machine without a GPU.
#pragma once

#include "attention_2d_common.cuh"

#include <cstdint>
#include <cstring>

namespace aanet_kernels::cuda::detail {

// The row pitch (in elements) of a [row][head dim] shared tile the fragments are read from:
// ldmatrix needs every row 16-byte aligned, and an odd number of 16-byte units per row puts the
// 8 rows one ldmatrix matrix reads (and the 8 groups of a 32-bit fragment load) in 8 different
// bank quads, so neither read conflicts. The tile structs static_assert it.
template <typename T>
constexpr bool is_fragment_row_pitch(int pitch) {
  const size_t bytes = sizeof(T) * static_cast<size_t>(pitch);
  return bytes % 16 == 0 && (bytes / 16) % 2 == 1;
}

// Two adjacent elements of a shared-memory tile (even index) as one register.
template <typename T>
__device__ __forceinline__ uint32_t load_pair(const T* ptr) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const uint32_t*>(ptr);
#else
  uint32_t bits;
  std::memcpy(&bits, ptr, sizeof(bits));
  return bits;
#endif
}

// Two fp32 values rounded to T and packed, the lower-indexed element in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  static_assert(sizeof(T) == 2, "tensor-core operands are 16-bit");
  const T parts[2] = {from_acc<T>(lo), from_acc<T>(hi)};
  uint32_t bits;
  std::memcpy(&bits, parts, sizeof(bits));
  return bits;
}

// d += A * B for one 16 x 8 x 16 tile; every lane of the warp must call.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(
    float (&d)[4],
    const uint32_t (&a)[4],
    const uint32_t (&b)[2]) {
#if defined(AANET_KERNELS_HOST_EMULATION)
  emulated_mma_m16n8k16<T>(d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // the host refuses fp16/bf16 below compute capability 8.0 (attention_2d_cuda.cpp)
#endif
}

// A fragment of rows row0 .. row0 + 15, columns k0 .. k0 + 15 of a row-major tile (leading dim ld).
template <typename T>
__device__ __forceinline__ void load_a_fragment(
    uint32_t (&a)[4],
    const T* tile,
    int ld,
    int row0,
    int k0,
    int lane) {
  const T* top = tile + (row0 + lane / 4) * ld + k0 + 2 * (lane % 4);
  a[0] = load_pair(top);
  a[1] = load_pair(top + 8 * ld);
  a[2] = load_pair(top + 8);
  a[3] = load_pair(top + 8 * ld + 8);
}

// B fragment for B[k][n] = tile[n0 + n][k0 + k] (a row-major [n][k] tile, leading dim ld).
template <typename T>
__device__ __forceinline__ void load_b_fragment(
    uint32_t (&b)[2],
    const T* tile,
    int ld,
    int n0,
    int k0,
    int lane) {
  const T* row = tile + (n0 + lane / 4) * ld + k0 + 2 * (lane % 4);
  b[0] = load_pair(row);
  b[1] = load_pair(row + 8);
}

// ldmatrix.sync.aligned.m8n8.xN.trans.b16: N 8 x 8 matrices of 16-bit elements, matrix m's rows
// addressed by lanes 8m .. 8m + 7 (16-byte aligned). Transposed on the way, so register m of lane
// 4 g + q holds rows 2q, 2q + 1 of column g of matrix m: with matrices of 8 k-rows by 8 n-columns
// of a row-major [k][n] tile, that is the B fragment layout above.
template <int N>
__device__ __forceinline__ void ldmatrix_trans(uint32_t (&r)[N], const void* row) {
  static_assert(N == 2 || N == 4, "ldmatrix .x2 or .x4");
#if defined(AANET_KERNELS_HOST_EMULATION)
  emulated_ldmatrix_trans<N>(r, row);
#elif defined(__CUDA_ARCH__)
  const auto addr = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if constexpr (N == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
#endif
}

// The A fragment of k-step t from the accumulators of n-tiles 2t and 2t + 1, rounded to T.
template <typename T>
__device__ __forceinline__ void accumulators_as_a(
    uint32_t (&a)[4],
    const float (&left)[4],
    const float (&right)[4]) {
  a[0] = pack_pair<T>(left[0], left[1]);
  a[1] = pack_pair<T>(left[2], left[3]);
  a[2] = pack_pair<T>(right[0], right[1]);
  a[3] = pack_pair<T>(right[2], right[3]);
}

// c[nt] += A B for the n-tiles nt < n_tiles of B[k][n] = tile[8 nt + n][k] (a row-major [n][k]
// shared tile) and the k-steps ks < k_steps of the A fragments a[ks] (16 rows x 16 k each).
template <typename T, int KSTEPS, int NTILES>
__device__ __forceinline__ void mma_a_by_tile(
    float (&c)[NTILES][4],
    const uint32_t (&a)[KSTEPS][4],
    const T* tile,
    int ld,
    int k_steps,
    int n_tiles,
    int lane) {
#pragma unroll
  for (int ks = 0; ks < KSTEPS; ++ks) {
#pragma unroll
    for (int nt = 0; nt < NTILES; ++nt) {
      if (ks < k_steps && nt < n_tiles) {
        uint32_t b[2];
        load_b_fragment(b, tile, ld, 8 * nt, 16 * ks, lane);
        mma_m16n8k16<T>(c[nt], a[ks], b);
      }
    }
  }
}

// c[nt] += A B with A the accumulators acc (16 rows x 8 KTILES, rounded to T: k-step t is
// n-tiles 2t and 2t + 1), B[k][n] = tile[k][8 nt + n] (a row-major [k][n] shared tile, rows and
// leading dim 16-byte aligned), for the n-tiles nt < n_tiles. One ldmatrix.x4 gives the B
// fragments of two n-tiles: lanes 0-15 address rows k0 .. k0 + 15 at column 8 nt, lanes 16-31
// the same rows at 8 nt + 8 (ignored by the .x2 of an odd last tile).
template <typename T, int KTILES, int NTILES>
__device__ __forceinline__ void mma_accumulators_by_tile(
    float (&c)[NTILES][4],
    const float (&acc)[KTILES][4],
    const T* tile,
    int ld,
    int n_tiles,
    int lane) {
  static_assert(KTILES % 2 == 0, "k-steps of 16 are pairs of accumulator tiles");
  static_assert(NTILES % 2 == 0, "B fragments are loaded for pairs of n-tiles");
#pragma unroll
  for (int kt = 0; kt < KTILES / 2; ++kt) {
    uint32_t a[4];
    accumulators_as_a<T>(a, acc[2 * kt], acc[2 * kt + 1]);
    const T* rows = tile + (16 * kt + lane % 16) * ld + 8 * (lane / 16);
#pragma unroll
    for (int nt = 0; nt < NTILES; nt += 2) {
      if (nt + 1 < n_tiles) {
        uint32_t b[4];
        ldmatrix_trans(b, rows + 8 * nt);
        mma_m16n8k16<T>(c[nt], a, {b[0], b[1]});
        mma_m16n8k16<T>(c[nt + 1], a, {b[2], b[3]});
      } else if (nt < n_tiles) {
        uint32_t b[2];
        ldmatrix_trans(b, rows + 8 * nt);
        mma_m16n8k16<T>(c[nt], a, b);
      }
    }
  }
}

// dst[d] = scale * (accumulator row r of acc) for the columns d < n this lane holds
// (8 nt + 2 quad + {0, 1}); r = 0 is row lane / 4 of the 16, r = 1 row lane / 4 + 8.
template <typename T, int NTILES>
__device__ __forceinline__ void store_accumulator_row(
    T* dst,
    const float (&acc)[NTILES][4],
    int r,
    float scale,
    int n,
    int lane) {
#pragma unroll
  for (int nt = 0; nt < NTILES; ++nt) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int d = 8 * nt + 2 * (lane % 4) + e;
      if (d < n) {
        dst[d] = from_acc<T>(scale * acc[nt][2 * r + e]);
      }
    }
  }
}

} // namespace aanet_kernels::cuda::detail
