// Schema of the aanet_kernels ops and the shared input checks. Device kernels register
// themselves with TORCH_LIBRARY_IMPL in cpu/ and cuda/; fakes and autograd live in Python
// (aanet_kernels/ops.py), following pytorch/extension-cpp.
#include "attention_2d.h"

#include <ATen/ATen.h>
#include <c10/util/safe_numerics.h>
#include <Python.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>

// An empty module: importing aanet_kernels._C runs the static registrations below.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace aanet_kernels {

namespace {

void check_bias(
    const std::optional<at::Tensor>& bias,
    const char* name,
    const char* size_name,
    const at::Tensor& q,
    int64_t size) {
  if (!bias.has_value()) {
    return;
  }
  const at::Tensor& b = *bias;
  TORCH_CHECK(
      b.scalar_type() == q.scalar_type(), name, ": expected dtype ", q.scalar_type(),
      " (the dtype of q), got ", b.scalar_type());
  TORCH_CHECK(
      b.device() == q.device(), name, ": expected device ", q.device(),
      " (the device of q), got ", b.device());
  const bool ok = b.dim() == 4 && (b.size(0) == 1 || b.size(0) == q.size(0)) &&
      (b.size(1) == 1 || b.size(1) == q.size(1)) && b.size(2) == q.size(2) &&
      b.size(3) == size;
  TORCH_CHECK(
      ok, name, ": expected shape (", q.size(0), ", ", q.size(1), ", ", q.size(2), ", ", size,
      ") = (B, Nh, L, ", size_name, "), B and Nh may be 1 to broadcast, got ", b.sizes());
}

} // namespace

void check_attention_2d_inputs(
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    const std::optional<at::Tensor>& bias_h,
    const std::optional<at::Tensor>& bias_w,
    int64_t height,
    int64_t width,
    double scale) {
  TORCH_CHECK(q.dim() == 4, "q: expected a 4-D tensor (B, Nh, L, dkh), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "k: expected a 4-D tensor (B, Nh, L, dkh), got shape ", k.sizes());
  TORCH_CHECK(v.dim() == 4, "v: expected a 4-D tensor (B, Nh, L, dvh), got shape ", v.sizes());
  const at::ScalarType dtype = q.scalar_type();
  TORCH_CHECK(
      dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
      "q: expected float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(
      k.scalar_type() == q.scalar_type(), "k: expected dtype ", q.scalar_type(),
      " (the dtype of q), got ", k.scalar_type());
  TORCH_CHECK(
      v.scalar_type() == q.scalar_type(), "v: expected dtype ", q.scalar_type(),
      " (the dtype of q), got ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device(), "k: expected device ", q.device(), ", got ", k.device());
  TORCH_CHECK(v.device() == q.device(), "v: expected device ", q.device(), ", got ", v.device());
  TORCH_CHECK(
      height >= 1 && width >= 1, "height, width: expected positive, got ", height, ", ", width);
  // The product is checked for overflow: the schema takes any int64 sizes, and a wrapped
  // height * width could equal L.
  int64_t map_positions = 0;
  const bool positions_overflow = c10::mul_overflows(height, width, &map_positions);
  TORCH_CHECK(
      !positions_overflow && q.size(2) == map_positions, "q: L = ", q.size(2),
      " does not equal height * width = ", height, " * ", width, " = ",
      positions_overflow ? std::string("more than int64 holds") : std::to_string(map_positions));
  TORCH_CHECK(
      k.sizes() == q.sizes(), "k: expected shape ", q.sizes(), " (the shape of q), got ",
      k.sizes());
  TORCH_CHECK(
      v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2),
      "v: expected shape (", q.size(0), ", ", q.size(1), ", ", q.size(2),
      ", dvh) to match q's (B, Nh, L), got ", v.sizes());
  TORCH_CHECK(
      q.size(3) >= 1 && v.size(3) >= 1, "q, v: head dims must be at least 1, got dkh=",
      q.size(3), ", dvh=", v.size(3));
  TORCH_CHECK(std::isfinite(scale), "scale: expected a finite number, got ", scale);
  // fp16/bf16/fp32 inputs compute their logits in float32, where a larger scale is inf.
  constexpr double float32_max = std::numeric_limits<float>::max();
  TORCH_CHECK(
      q.scalar_type() == at::kDouble || std::abs(scale) <= float32_max,
      "scale: expected a magnitude of at most ", float32_max, " for ", q.scalar_type(),
      " inputs (their logits are computed in float32, where it would be inf), got ", scale);
  check_bias(bias_h, "bias_h", "height", q, height);
  check_bias(bias_w, "bias_w", "width", q, width);
}

void check_attention_2d_backward_inputs(
    const at::Tensor& grad_out,
    const at::Tensor& q,
    const at::Tensor& v,
    const at::Tensor& out,
    const at::Tensor& lse) {
  TORCH_CHECK(
      grad_out.sizes() == v.sizes() && grad_out.scalar_type() == q.scalar_type() &&
          grad_out.device() == q.device(),
      "grad_out: expected shape ", v.sizes(), ", dtype ", q.scalar_type(), " and device ",
      q.device(), " (those of the output), got ", grad_out.sizes(), ", ",
      grad_out.scalar_type(), ", ", grad_out.device());
  TORCH_CHECK(
      out.sizes() == v.sizes() && out.scalar_type() == q.scalar_type() &&
          out.device() == q.device(),
      "out: expected the forward output, shape ", v.sizes(), ", dtype ", q.scalar_type(),
      ", device ", q.device(), ", got ", out.sizes(), ", ", out.scalar_type(), ", ",
      out.device());
  const at::ScalarType stats_dtype = lse_dtype(q.scalar_type());
  TORCH_CHECK(
      lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
          lse.size(2) == q.size(2) && lse.scalar_type() == stats_dtype &&
          lse.device() == q.device(),
      "lse: expected the forward log-sum-exp, shape (", q.size(0), ", ", q.size(1), ", ",
      q.size(2), "), dtype ", stats_dtype, ", device ", q.device(), ", got ", lse.sizes(),
      ", ", lse.scalar_type(), ", ", lse.device());
}

at::Tensor expand_bias(const std::optional<at::Tensor>& bias, const at::Tensor& q, int64_t size) {
  if (!bias.has_value()) {
    return at::Tensor();
  }
  return bias->expand({q.size(0), q.size(1), q.size(2), size});
}

at::ScalarType accumulator_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

at::ScalarType lse_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble || input_dtype == at::kFloat ? at::kDouble : at::kFloat;
}

TORCH_LIBRARY(aanet_kernels, m) {
  m.def(
      "attention_2d_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias_h, Tensor? bias_w, "
      "SymInt height, SymInt width, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_2d_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? bias_h, "
      "Tensor? bias_w, Tensor out, Tensor lse, SymInt height, SymInt width, float scale) -> "
      "(Tensor dq, Tensor dk, Tensor dv, Tensor dbias_h, Tensor dbias_w)");
}

} // namespace aanet_kernels
