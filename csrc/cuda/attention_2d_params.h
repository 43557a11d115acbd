// Attention2dParams over ATen tensors, for the op implementations (attention_2d_cuda.cpp) and the
// host emulation (emulation/), so both hand the kernels the same views.
#pragma once

#include "attention_2d_cuda.h"

#include <ATen/core/Tensor.h>

namespace aanet_kernels::cuda {

// The view of a 4-D tensor; the null view for an undefined one (an absent bias).
inline Tensor4 view4(const at::Tensor& t) {
  Tensor4 view;
  if (!t.defined()) {
    return view;
  }
  view.ptr = t.data_ptr();
  for (int d = 0; d < 4; ++d) {
    view.stride[d] = t.stride(d);
  }
  return view;
}

// The inputs and sizes of one call; biases already expanded to (B, Nh, L, height|width), or
// undefined. The caller sets the outputs.
inline Attention2dParams input_params(
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    const at::Tensor& bias_h,
    const at::Tensor& bias_w,
    int64_t height,
    int64_t width,
    double scale) {
  Attention2dParams p;
  p.q = view4(q);
  p.k = view4(k);
  p.v = view4(v);
  p.bias_h = view4(bias_h);
  p.bias_w = view4(bias_w);
  p.batch = static_cast<int>(q.size(0));
  p.heads = static_cast<int>(q.size(1));
  p.length = static_cast<int>(q.size(2));
  p.height = static_cast<int>(height);
  p.width = static_cast<int>(width);
  p.dkh = static_cast<int>(q.size(3));
  p.dvh = static_cast<int>(v.size(3));
  p.scale = scale;
  return p;
}

} // namespace aanet_kernels::cuda
