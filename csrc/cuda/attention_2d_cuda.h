// Host-side interface between the op implementations (attention_2d_cuda.cpp, compiled by the C++
// compiler) and the kernel launchers (the *.cu files, compiled by nvcc). Pointers are untyped here
// so this header needs no CUDA type; each launcher is instantiated for
// scalar_t in {c10::Half, c10::BFloat16, float, double} and D in {16, 32, 64, 128}, the head dim
// both dkh and dvh are padded up to (one tile shape serves both).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace aanet_kernels::cuda {

// A strided 4-D input (B, Nh, rows, cols); strides in elements. ptr is null for an absent bias.
struct Tensor4 {
  const void* ptr = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};
};

// Everything a launcher reads or writes. Outputs and workspaces are contiguous.
struct Attention2dParams {
  Tensor4 q, k, v;            // (B, Nh, L, dkh|dvh), strided
  Tensor4 bias_h, bias_w;     // expanded to (B, Nh, L, height|width), stride 0 where broadcast
  int batch = 0, heads = 0, length = 0, height = 0, width = 0, dkh = 0, dvh = 0;
  double scale = 1.0;
  // forward outputs: out (B, Nh, L, dvh) in scalar_t, lse (B, Nh, L) in StatOf<scalar_t>
  void* out = nullptr;
  void* lse = nullptr;  // written by forward, read (contiguous) by backward
  // backward inputs
  Tensor4 grad_out;     // (B, Nh, L, dvh), strided
  Tensor4 out_in;       // the forward output, strided, for delta = rowsum(dO * O)
  // backward outputs and workspace: delta (B, Nh, L) and dbias_* (B, Nh, L, size) in the
  // accumulator type (dbias_* zero-initialized, null when the bias is absent); dq/dk/dv in scalar_t
  void* delta = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  void* dbias_h = nullptr;
  void* dbias_w = nullptr;
};

// Padded head dims with compiled kernels.
constexpr int kHeadDims[] = {16, 32, 64, 128};

template <typename scalar_t, int D>
void launch_attention_2d_fwd(const Attention2dParams& params, cudaStream_t stream);

template <typename scalar_t, int D>
void launch_attention_2d_bwd(const Attention2dParams& params, cudaStream_t stream);

// The most dynamic shared memory one block of the forward's (backward's) launches asks for: a
// device runs them only where its opt-in limit per block allows as much.
template <typename scalar_t, int D>
size_t attention_2d_fwd_smem_bytes();

template <typename scalar_t, int D>
size_t attention_2d_bwd_smem_bytes();

} // namespace aanet_kernels::cuda
