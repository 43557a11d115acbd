// CUDA implementations of aanet_kernels::attention_2d_fwd / attention_2d_bwd: input checks,
// output allocation, dispatch to the kernel launchers by dtype and padded head dim.
//
// Inputs are read through their strides (no copies); biases arrive as stride-0 expanded views.
// Outputs are contiguous. Launches go to the current stream of q's device.
#include "../attention_2d.h"
#include "attention_2d_cuda.h"
#include "attention_2d_params.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

namespace aanet_kernels {

namespace {

// Both head dims are padded up to one compiled tile size.
int padded_head_dim(int64_t dkh, int64_t dvh) {
  const int64_t needed = std::max(dkh, dvh);
  for (const int size : cuda::kHeadDims) {
    if (needed <= size) {
      return size;
    }
  }
  TORCH_CHECK(
      false, "q, v: the cuda backend supports head dims up to 128, got dkh=", dkh,
      ", dvh=", dvh);
  return 0;
}

void check_cuda_inputs(const at::Tensor& q) {
  TORCH_CHECK(
      q.is_cuda(), "q: the cuda backend expects CUDA tensors, got device ", q.device());
  const at::ScalarType dtype = q.scalar_type();
  if (dtype == at::kHalf || dtype == at::kBFloat16) {
    const int device = q.get_device();
    int major = 0;
    int minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    TORCH_CHECK(
        major >= 8, "q: ", dtype,
        " on the cuda backend runs on tensor cores (mma.sync) and needs compute capability "
        ">= 8.0; "
        "device ", device, " has ", major, ".", minor, ". Use float32 or another backend.");
  }
  TORCH_CHECK(
      q.size(0) <= 65535 && q.size(1) <= 65535,
      "q: the cuda backend launches one grid layer per batch and head, so B and Nh must be at "
      "most 65535, got B=", q.size(0), ", Nh=", q.size(1));
  TORCH_CHECK(
      q.size(2) <= std::numeric_limits<int>::max() / 2, "q: L = ", q.size(2),
      " is too large for the cuda backend (at most ", std::numeric_limits<int>::max() / 2, ")");
}

cuda::Attention2dParams make_params(
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    const std::optional<at::Tensor>& bias_h,
    const std::optional<at::Tensor>& bias_w,
    int64_t height,
    int64_t width,
    double scale) {
  return cuda::input_params(
      q, k, v, expand_bias(bias_h, q, height), expand_bias(bias_w, q, width), height, width,
      scale);
}

// Calls f.template operator()<D>() with the compiled head dim D that padded_head_dim returned.
template <typename F>
decltype(auto) with_head_dim(int head_dim, F&& f) {
  switch (head_dim) {
    case 16:
      return f.template operator()<16>();
    case 32:
      return f.template operator()<32>();
    case 64:
      return f.template operator()<64>();
    default:
      return f.template operator()<128>();
  }
}

std::tuple<at::Tensor, at::Tensor> attention_2d_fwd_cuda(
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    const std::optional<at::Tensor>& bias_h,
    const std::optional<at::Tensor>& bias_w,
    int64_t height,
    int64_t width,
    double scale) {
  check_attention_2d_inputs(q, k, v, bias_h, bias_w, height, width, scale);
  check_cuda_inputs(q);
  const int head_dim = padded_head_dim(q.size(3), v.size(3));
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse =
      at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(lse_dtype(q.scalar_type())));
  if (q.numel() == 0) {
    return {out, lse};
  }
  cuda::Attention2dParams p = make_params(q, k, v, bias_h, bias_w, height, width, scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "attention_2d_fwd_cuda",
      [&] {
        with_head_dim(head_dim, [&]<int D>() {
          cuda::launch_attention_2d_fwd<scalar_t, D>(p, stream);
        });
      });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_2d_bwd_cuda(
    const at::Tensor& grad_out,
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    const std::optional<at::Tensor>& bias_h,
    const std::optional<at::Tensor>& bias_w,
    const at::Tensor& out,
    const at::Tensor& lse,
    int64_t height,
    int64_t width,
    double scale) {
  check_attention_2d_inputs(q, k, v, bias_h, bias_w, height, width, scale);
  check_cuda_inputs(q);
  check_attention_2d_backward_inputs(grad_out, q, v, out, lse);
  const int head_dim = padded_head_dim(q.size(3), v.size(3));
  const c10::cuda::CUDAGuard guard(q.device());

  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), q.options());
  at::Tensor dv = at::empty(v.sizes(), q.options());
  // Bias gradients accumulate in the accumulator dtype (fp32 for half/bf16), zero-initialized.
  const auto acc_options = q.options().dtype(accumulator_dtype(q.scalar_type()));
  at::Tensor dbias_h = bias_h.has_value()
      ? at::zeros({q.size(0), q.size(1), q.size(2), height}, acc_options)
      : at::empty({0}, q.options());
  at::Tensor dbias_w = bias_w.has_value()
      ? at::zeros({q.size(0), q.size(1), q.size(2), width}, acc_options)
      : at::empty({0}, q.options());
  if (q.numel() == 0) {
    return {dq, dk, dv, dbias_h.to(q.scalar_type()), dbias_w.to(q.scalar_type())};
  }

  const at::Tensor lse_c = lse.contiguous();
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, acc_options);
  cuda::Attention2dParams p = make_params(q, k, v, bias_h, bias_w, height, width, scale);
  p.lse = lse_c.data_ptr();
  p.grad_out = cuda::view4(grad_out);
  p.out_in = cuda::view4(out);
  p.delta = delta.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dbias_h = bias_h.has_value() ? dbias_h.data_ptr() : nullptr;
  p.dbias_w = bias_w.has_value() ? dbias_w.data_ptr() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "attention_2d_bwd_cuda",
      [&] {
        with_head_dim(head_dim, [&]<int D>() {
          cuda::launch_attention_2d_bwd<scalar_t, D>(p, stream);
        });
      });
  return {dq, dk, dv, dbias_h.to(q.scalar_type()), dbias_w.to(q.scalar_type())};
}

// The most shared memory one block of the forward's (or the backward's) kernels asks for, on
// `dtype` at head dims (dkh, dvh): a device runs them only where its opt-in limit per block is at
// least this. Host arithmetic (no GPU needed): aanet_kernels/limits.py compares it with the
// device's limit, so that backend="auto" passes over a call this backend would refuse.
int64_t attention_2d_cuda_smem_bytes(
    at::ScalarType dtype,
    int64_t dkh,
    int64_t dvh,
    bool backward) {
  const int head_dim = padded_head_dim(dkh, dvh);
  size_t bytes = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "attention_2d_cuda_smem_bytes", [&] {
        bytes = with_head_dim(head_dim, [&]<int D>() {
          return backward ? cuda::attention_2d_bwd_smem_bytes<scalar_t, D>()
                          : cuda::attention_2d_fwd_smem_bytes<scalar_t, D>();
        });
      });
  return static_cast<int64_t>(bytes);
}

} // namespace

TORCH_LIBRARY_IMPL(aanet_kernels, CUDA, m) {
  m.impl("attention_2d_fwd", &attention_2d_fwd_cuda);
  m.impl("attention_2d_bwd", &attention_2d_bwd_cuda);
}

// No tensor arguments, so a catch-all kernel: defined only where the CUDA kernels are built.
TORCH_LIBRARY_FRAGMENT(aanet_kernels, m) {
  m.def(
      "attention_2d_cuda_smem_bytes(ScalarType dtype, int dkh, int dvh, bool backward) -> int",
      &attention_2d_cuda_smem_bytes);
}

} // namespace aanet_kernels
