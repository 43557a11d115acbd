// Device building blocks shared by the forward and backward kernels: type traits, tile shapes and
// a block-wide FMA tile GEMM for the fp32/fp64 kernels (fp16/bf16 run on mma.sync, warp_mma.cuh),
// shared-memory tile loads, row-group reductions and the key walk.
//
// Every tile lives in shared memory, row-major, with a padded leading dimension. Operand tiles
// (Q, K, V, dO, P, dS) are stored in the input type T; accumulators (S, dP, O, dQ, dK, dV) in the
// accumulator type A (fp32, or fp64 for fp64 inputs). Out-of-range rows and head-dim columns are
// zero-filled on load, so padded products contribute nothing.
#pragma once

#include "attention_2d_cuda.h"

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <type_traits>

namespace aanet_kernels::cuda::detail {

// c10 scalar type -> CUDA device type (same bit layout).
template <typename T>
struct DeviceTypeOf {
  using type = T;
};
template <>
struct DeviceTypeOf<c10::Half> {
  using type = __half;
};
template <>
struct DeviceTypeOf<c10::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
using AccOf = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
constexpr bool kTensorCore = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

// The saved log-sum-exp's type (lse_dtype in attention_2d.h): fp64 for fp32 and fp64 inputs,
// which the backward splits into two AccOf parts, fp32 for fp16/bf16.
template <typename T>
using StatOf = std::conditional_t<kTensorCore<T>, float, double>;

__device__ __forceinline__ float to_acc(__half x) {
  return __half2float(x);
}
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
__device__ __forceinline__ float to_acc(float x) {
  return x;
}
__device__ __forceinline__ double to_acc(double x) {
  return x;
}

template <typename T, typename A>
__device__ __forceinline__ T from_acc(A x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return static_cast<T>(x);
  }
}

__device__ __forceinline__ float exp_acc(float x) {
  return expf(x);
}
__device__ __forceinline__ double exp_acc(double x) {
  return exp(x);
}
__device__ __forceinline__ float log_acc(float x) {
  return logf(x);
}
__device__ __forceinline__ double log_acc(double x) {
  return log(x);
}

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -static_cast<A>(INFINITY);
}

__host__ __device__ constexpr int round_up(int x, int multiple) {
  return (x + multiple - 1) / multiple * multiple;
}

// Byte offsets of shared-memory buffers are kept 128-byte aligned.
__host__ __device__ constexpr size_t smem_align(size_t bytes) {
  return (bytes + 127) / 128 * 128;
}

// Tile shapes of the shared-memory (fp32/fp64) kernels for padded head dim D.
//   kFwdM x kFwdN: query rows per block x keys per step, forward.
//   kBwdM x kBwdN: query rows x key rows of one step in both backward kernels.
//   kStep: the granularity head dims and tile sides are padded to.
//   kPadT / kPadA: leading-dimension padding of operand / accumulator tiles (bank conflicts).
template <typename T, int D>
struct Tiles {
  static constexpr bool kF64 = std::is_same_v<T, double>;
  static constexpr int kThreads = 128;
  static constexpr int kFwdM = kF64 ? 16 : 32;
  static constexpr int kFwdN = kF64 ? 16 : 32;
  static constexpr int kBwdM = 16;
  static constexpr int kBwdN = kF64 ? 16 : 32;
  static constexpr int kStep = 16;
  static constexpr int kPadT = 1;
  static constexpr int kPadA = 1;
  static_assert(kThreads % kFwdM == 0 && kThreads % kBwdM == 0, "row groups must tile the block");
  static_assert(kThreads / kFwdM <= 32, "a row group must fit in a warp");
};

// Pointer to element (b, h, 0, 0) of a strided 4-D tensor.
template <typename T>
__device__ __forceinline__ const T* head_ptr(const Tensor4& t, int b, int h) {
  return static_cast<const T*>(t.ptr) + b * t.stride[0] + h * t.stride[1];
}

// dst(r, c) = src[row_index(r) * row_stride + c * col_stride] for rows with row_index(r) >= 0
// and columns c < n_cols, zero elsewhere, stored at dst[r * ld + c]. Consecutive threads walk
// the source along its unit stride, so the global reads coalesce for both layouts AAConv2d hands
// over (q/k/v split out of an NCHW map have unit stride along positions, contiguous ones along
// the head dim).
template <typename T, int ROWS, int COLS, int NT, typename RowIndex>
__device__ __forceinline__ void load_rows(
    T* dst,
    int ld,
    const T* src,
    int64_t row_stride,
    int64_t col_stride,
    int n_cols,
    RowIndex row_index) {
  const bool rows_fastest = row_stride == 1 && col_stride != 1;
  for (int idx = threadIdx.x; idx < ROWS * COLS; idx += NT) {
    const int r = rows_fastest ? idx % ROWS : idx / COLS;
    const int c = rows_fastest ? idx / ROWS : idx % COLS;
    const int row = row_index(r);
    T value = from_acc<T>(0.0f);
    if (row >= 0 && c < n_cols) {
      value = src[row * row_stride + c * col_stride];
    }
    dst[r * ld + c] = value;
  }
}

// dst[r][c] = src[row0 + r][c] for rows < n_rows and columns < n_cols, zero elsewhere.
template <typename T, int ROWS, int COLS, int NT>
__device__ __forceinline__ void load_tile(
    T* dst,
    int ld,
    const T* src,
    int64_t row_stride,
    int64_t col_stride,
    int row0,
    int n_rows,
    int n_cols) {
  load_rows<T, ROWS, COLS, NT>(dst, ld, src, row_stride, col_stride, n_cols, [=](int r) {
    return row0 + r < n_rows ? row0 + r : -1;
  });
}

template <typename A, int ROWS, int COLS, int NT>
__device__ __forceinline__ void zero_tile(A* dst, int ld) {
  for (int idx = threadIdx.x; idx < ROWS * COLS; idx += NT) {
    dst[(idx / COLS) * ld + idx % COLS] = A(0);
  }
}

// C (m x n, ld ldc) = [C +] A (m x kdim) * B (kdim x n), all in shared memory.
// A_ROW: A(i, kk) = a[i * lda + kk], else a[kk * lda + i]  (the transpose of a row-major tile).
// B_ROW: B(kk, j) = b[kk * ldb + j], else b[j * ldb + kk].
// Called by all NT threads, each computing whole outputs with FMA loops; no barrier inside.
template <typename T, typename A, bool A_ROW, bool B_ROW, int NT>
__device__ __forceinline__ void block_gemm(
    A* c,
    int ldc,
    const T* a,
    int lda,
    const T* b,
    int ldb,
    int m,
    int n,
    int kdim,
    bool accumulate) {
  for (int idx = threadIdx.x; idx < m * n; idx += NT) {
    const int i = idx / n;
    const int j = idx % n;
    A sum = accumulate ? c[i * ldc + j] : A(0);
    for (int kk = 0; kk < kdim; ++kk) {
      const A x = to_acc(A_ROW ? a[i * lda + kk] : a[kk * lda + i]);
      const A y = to_acc(B_ROW ? b[kk * ldb + j] : b[j * ldb + kk]);
      sum += x * y;
    }
    c[i * ldc + j] = sum;
  }
}

// Reductions over a group of G consecutive lanes (G a power of two <= 32); every lane of the
// group gets the same result (xor butterfly), and every lane of the warp must call.
template <int G, typename A>
__device__ __forceinline__ A group_max(A x) {
#pragma unroll
  for (int offset = G / 2; offset > 0; offset /= 2) {
    x = fmax(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}

template <int G, typename A>
__device__ __forceinline__ A group_sum(A x) {
#pragma unroll
  for (int offset = G / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

// Key row y = j / width and column x = j % width of the keys j = n0 + c of one key tile, written
// once per tile into shared memory, so that the per-logit bias lookups need no integer division.
template <int N, int NT>
__device__ __forceinline__ void key_coordinates(int* s_y, int* s_x, int n0, int width) {
  for (int c = threadIdx.x; c < N; c += NT) {
    const int j = n0 + c;
    const int y = j / width;
    s_y[c] = y;
    s_x[c] = j - y * width;
  }
}

// Logit bias of query i (< L) and the key in row y, column x: bias_h[i, y] + bias_w[i, x].
template <typename T, typename A>
__device__ __forceinline__ A bias_at(
    const T* bias_h,
    const T* bias_w,
    const Tensor4& p_h,
    const Tensor4& p_w,
    int i,
    int y,
    int x) {
  A value = A(0);
  if (bias_h != nullptr) {
    value += to_acc(bias_h[i * p_h.stride[2] + y * p_h.stride[3]]);
  }
  if (bias_w != nullptr) {
    value += to_acc(bias_w[i * p_w.stride[2] + x * p_w.stride[3]]);
  }
  return value;
}

// How a kernel with key tiles of block_n keys walks the (height x width) key grid: a tile is
// block_n >> inner_log2 runs of 1 << inner_log2 consecutive keys along the inner dim, so every
// key's coordinates come from shifts and the inner bias table is the same for every run of a
// tile. The inner dim is the image row (bias_w indexed along it), or, for a map that fills the
// tiles better that way (narrow and tall: 70 x 1 would fill 1 slot in 16 of each run), the image
// column, with the two bias tables trading places. A tile never spans two inner chunks; keys past
// the map are masked.
struct KeyWalk {
  int outer_size = 0, inner_size = 0;      // e.g. height, width
  int outer_stride = 0, inner_stride = 0;  // key j = outer * outer_stride + inner * inner_stride
  int inner_log2 = 0;                      // run length 1 << inner_log2 <= block_n
  bool transposed = false;                 // inner dim = image column; bias_h is the inner table

  __host__ __device__ static int run_log2(int size, int block_n) {
    int log2 = 0;
    while ((1 << log2) < size && (1 << log2) < block_n) {
      ++log2;
    }
    return log2;
  }

  __host__ __device__ static KeyWalk make(
      int outer, int inner, int outer_stride, int inner_stride, int block_n, bool transposed) {
    return {outer, inner, outer_stride, inner_stride, run_log2(inner, block_n), transposed};
  }

  __host__ __device__ static KeyWalk of(int height, int width, int block_n) {
    const KeyWalk rows = make(height, width, width, 1, block_n, false);
    const KeyWalk columns = make(width, height, 1, width, block_n, true);
    return columns.tiles(block_n) < rows.tiles(block_n) ? columns : rows;
  }

  __host__ __device__ int runs_per_tile(int block_n) const {
    return block_n >> inner_log2;
  }

  __host__ __device__ int tiles(int block_n) const {
    const int run = 1 << inner_log2;
    const int runs = runs_per_tile(block_n);
    return ((inner_size + run - 1) / run) * ((outer_size + runs - 1) / runs);
  }

  // Key index of slot c of the tile starting at (outer0, inner0), or -1 past the map.
  __host__ __device__ int key(int outer0, int inner0, int c) const {
    const int outer = outer0 + (c >> inner_log2);
    const int inner = inner0 + (c & ((1 << inner_log2) - 1));
    return outer < outer_size && inner < inner_size ? outer * outer_stride + inner * inner_stride
                                                    : -1;
  }
};

// Up to 48 KiB of shared memory every device gives; beyond, it must fit the device's opt-in
// limit and the kernel must opt in.
template <typename Kernel>
void prepare_smem(Kernel kernel, size_t bytes) {
  constexpr size_t kDefaultLimit = 48 * 1024;
  if (bytes <= kDefaultLimit) {
    return;
  }
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int limit = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(
      bytes <= static_cast<size_t>(limit), "attention_2d (cuda backend): a tile needs ", bytes,
      " bytes of shared memory, device ", device, " allows ", limit,
      " per block; use a smaller head dim or another backend");
  C10_CUDA_CHECK(cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

inline dim3 tile_grid(int length, int rows_per_block, const Attention2dParams& p) {
  return dim3((length + rows_per_block - 1) / rows_per_block, p.heads, p.batch);
}

// One kernel launch: the kernel, its grid, threads per block and dynamic shared memory. The
// launchers and the host emulation (emulation/) both launch what forward_launch and
// backward_launches return, so the emulation runs the grids a GPU runs.
struct KernelLaunch {
  void (*kernel)(Attention2dParams);
  dim3 grid;
  unsigned threads;
  size_t smem_bytes;
};

// A call on one position of one head. Launch plans built for it give each kernel's shared
// memory, which the tile shapes fix at compile time whatever the call's sizes.
inline Attention2dParams one_position_params() {
  Attention2dParams p;
  p.batch = p.heads = p.length = p.height = p.width = p.dkh = p.dvh = 1;
  return p;
}

#if defined(__CUDACC__)
// Launches `plan` on `stream` and checks the launch.
inline void launch(const KernelLaunch& plan, const Attention2dParams& params, cudaStream_t stream) {
  prepare_smem(plan.kernel, plan.smem_bytes);
  plan.kernel<<<plan.grid, plan.threads, plan.smem_bytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

} // namespace aanet_kernels::cuda::detail
