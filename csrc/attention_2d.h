// Declarations shared by the op registration (ops.cpp) and the device kernels (cpu/, cuda/).
//
// Contract (README, "The op"): for queries i and keys j = y * width + x,
//   S[i, j] = scale * q_i . k_j + bias_h[i, y] + bias_w[i, x],   out = softmax_j(S) @ v,
//   lse[i] = logsumexp_j S[i, j]  (dtype lse_dtype; -inf for a fully masked row, whose output
//   and gradients are zero).
// Shapes: q, k (B, Nh, L, dkh); v (B, Nh, L, dvh); bias_h (B|1, Nh|1, L, height);
// bias_w (B|1, Nh|1, L, width); L = height * width. Outputs are contiguous.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace aanet_kernels {

// Validates shapes, dtypes, devices and the scale; every message names the argument.
void check_attention_2d_inputs(
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    const std::optional<at::Tensor>& bias_h,
    const std::optional<at::Tensor>& bias_w,
    int64_t height,
    int64_t width,
    double scale);

// The backward's extra inputs: grad_out and out as the forward output (shape, dtype and device),
// lse as the forward statistics (shape (B, Nh, L), dtype lse_dtype, device of q).
void check_attention_2d_backward_inputs(
    const at::Tensor& grad_out,
    const at::Tensor& q,
    const at::Tensor& v,
    const at::Tensor& out,
    const at::Tensor& lse);

// Returns the bias expanded (as a stride-0 view where broadcast) to (B, Nh, L, size), or an
// undefined tensor when absent, so kernels can always index it with four strides.
at::Tensor expand_bias(const std::optional<at::Tensor>& bias, const at::Tensor& q, int64_t size);

// Dtype of the kernels' accumulators and softmax arithmetic: float64 for float64 inputs, float32
// for the others.
at::ScalarType accumulator_dtype(at::ScalarType input_dtype);

// Dtype of the saved log-sum-exp: float64 for float32 and float64 inputs, float32 for
// half/bfloat16. An fp32 lse of a row whose logits are near 1e3 is off by up to ulp(1e3) / 2 =
// 3e-5, and the backward's P = exp(S - lse) inherits that as a relative error, far above an fp32
// softmax's own; the fp32 backwards therefore split the fp64 lse into two fp32 parts
// (P = exp((S - hi) - lo)). For half/bfloat16 the input rounding is far coarser: fp32 suffices.
at::ScalarType lse_dtype(at::ScalarType input_dtype);

std::tuple<at::Tensor, at::Tensor> attention_2d_fwd_cpu(
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    const std::optional<at::Tensor>& bias_h,
    const std::optional<at::Tensor>& bias_w,
    int64_t height,
    int64_t width,
    double scale);

// Gradients (dq, dk, dv, dbias_h, dbias_w); a bias gradient is (B, Nh, L, size) at full size
// (the Python autograd sums it back to a broadcast shape) or a 0-element tensor when absent.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_2d_bwd_cpu(
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
    double scale);

} // namespace aanet_kernels
