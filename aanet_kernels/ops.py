"""The ``attention_2d`` op: fake implementations, autograd, and the public entry point.

The compiled ops ``torch.ops.aanet_kernels.attention_2d_fwd`` / ``attention_2d_bwd`` are declared in
``csrc/ops.cpp``. This module registers, on top of them, the fake (meta) implementations that
``torch.compile`` and ``torch.export`` trace with, and autograd (``_autograd``). The autograd serves
the Triton ops too (``aanet_kernels/_triton``), whose fakes ``triton_op`` derives from their Python
bodies; a test holds those to the shapes and dtypes of the fakes here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from aanet_kernels import reference
from aanet_kernels._autograd import Bias, attention_2d_autograd
from aanet_kernels._checks import check_attention_2d_inputs
from aanet_kernels._extension import extension_loaded
from aanet_kernels.backends import resolve_backend_for_call


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The fused kernels accumulate and run the softmax in fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The saved log-sum-exp is fp64 for fp32 and fp64 inputs, fp32 for fp16/bf16.

    An fp32 lse of logits near 1e3 is off by up to 3e-5 (half an fp32 ulp), and the backward's
    ``P = exp(S - lse)`` takes that as a relative error, several times an fp32 softmax's own; from
    an fp64 lse the fp32 backwards compute ``exp((S - hi) - lo)`` with ``hi + lo`` its two fp32
    parts, ``S - hi`` exact where ``P`` is large. fp16/bf16 inputs are far coarser than that.
    """
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def check_same_device(q: Tensor, **tensors: Tensor | None) -> None:
    """Raise unless every tensor given is on ``q``'s device, as the C++ ops do. The fakes need
    this too: a meta tensor among CPU ones sends an eager call of the op to them (the Meta key
    wins the dispatch), and they would return uninitialised CPU memory as the result."""
    for name, t in tensors.items():
        if t is not None and t.device != q.device:
            raise RuntimeError(
                f"{name}: expected device {q.device} (the device of q), got {t.device}"
            )


def fake_attention_2d_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias_h: Bias,
    bias_w: Bias,
    height: int,
    width: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    check_same_device(q, k=k, v=v, bias_h=bias_h, bias_w=bias_w)
    # The C++ kernels' checks, which a call on meta tensors never reaches: without them it
    # returned an output for any shapes and dtypes (an int32 one for int32 inputs).
    check_attention_2d_inputs(q, k, v, bias_h, bias_w, height, width, scale)
    batch, heads, length, _ = q.shape
    out = q.new_empty((batch, heads, length, v.shape[-1]))
    lse = q.new_empty((batch, heads, length), dtype=lse_dtype(q.dtype))
    return out, lse


def fake_attention_2d_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias_h: Bias,
    bias_w: Bias,
    out: Tensor,
    lse: Tensor,
    height: int,
    width: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_same_device(
        q, grad_out=grad_out, k=k, v=v, bias_h=bias_h, bias_w=bias_w, out=out, lse=lse
    )
    check_attention_2d_inputs(q, k, v, bias_h, bias_w, height, width, scale)
    batch, heads, length, _ = q.shape
    # What check_attention_2d_backward_inputs (csrc/ops.cpp) asks of the backward's extra inputs.
    for name, t in (("grad_out", grad_out), ("out", out)):
        if t.shape != v.shape or t.dtype != q.dtype:
            raise ValueError(
                f"{name}: expected shape {tuple(v.shape)} and dtype {q.dtype} (those of the "
                f"output), got {tuple(t.shape)}, {t.dtype}"
            )
    if lse.shape != (batch, heads, length) or lse.dtype != lse_dtype(q.dtype):
        raise ValueError(
            f"lse: expected the forward log-sum-exp, shape {(batch, heads, length)}, dtype "
            f"{lse_dtype(q.dtype)}, got {tuple(lse.shape)}, {lse.dtype}"
        )
    # An absent bias gets an empty (0-element) gradient: op schemas cannot return None.
    dbias_h = q.new_empty((batch, heads, length, height) if bias_h is not None else (0,))
    dbias_w = q.new_empty((batch, heads, length, width) if bias_w is not None else (0,))
    return q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape), dbias_h, dbias_w


# The differentiable forward of the compiled ops (CPU and CUDA), when the extension is there.
extension_attention_2d = None
if extension_loaded():
    torch.library.register_fake("aanet_kernels::attention_2d_fwd")(fake_attention_2d_fwd)
    torch.library.register_fake("aanet_kernels::attention_2d_bwd")(fake_attention_2d_bwd)
    extension_attention_2d = attention_2d_autograd(
        torch.ops.aanet_kernels.attention_2d_fwd.default,
        torch.ops.aanet_kernels.attention_2d_bwd.default,
    )


# What autocast casts to its dtype (``cached_cast``'s rule: floating, but not fp64).
_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def autocast_inputs(*tensors: object) -> tuple[object, ...]:
    """Under autocast for the device of the first tensor, the floating tensors among ``tensors``
    (fp64 excepted) cast to the autocast dtype, as for ``F.scaled_dot_product_attention``; else
    ``tensors`` as they are. Anything that is not a tensor is passed on for the checks to name.

    The op has no autocast kernel of its own, so without this the fused backends would run fp32
    inputs in fp32 and return fp32 where the reference's matmuls, autocast themselves, run and
    return the autocast dtype; and mixed fp32/bf16 inputs, which autocast would reconcile, would
    be refused. Meta tensors have no autocast (``is_autocast_enabled`` refuses
    their device type)."""
    first = tensors[0]
    if not isinstance(first, Tensor) or first.device.type == "meta":
        return tensors
    device = first.device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(
        t.to(dtype) if isinstance(t, Tensor) and t.dtype in _AUTOCAST_ELIGIBLE else t
        for t in tensors
    )


def attention_2d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias_h: Tensor | None = None,
    bias_w: Tensor | None = None,
    *,
    height: int,
    width: int,
    scale: float = 1.0,
    backend: str = "auto",
) -> Tensor:
    """Fused 2D relative-position attention.

    ``softmax_j(scale * q_i . k_j + bias_h[i, j // width] + bias_w[i, j % width]) @ v``

    Args:
        q, k: ``(B, Nh, L, dkh)`` with ``L = height * width`` (row-major positions).
        v: ``(B, Nh, L, dvh)``.
        bias_h: ``(B, Nh, L, height)`` or ``None``; B and Nh may be 1 to broadcast.
        bias_w: ``(B, Nh, L, width)`` or ``None``; B and Nh may be 1 to broadcast.
        scale: multiplies ``q . k`` only (the biases are added as given).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Under ``torch.autocast`` the fp16/bf16/fp32 inputs are cast to the autocast dtype first (on
    every backend, as ``F.scaled_dot_product_attention`` is), so the output has that dtype.

    Returns:
        ``(B, Nh, L, dvh)``. A query whose logits are all ``-inf`` gets zeros (and zero gradients).
    """
    q, k, v, bias_h, bias_w = autocast_inputs(q, k, v, bias_h, bias_w)
    height, width = check_attention_2d_inputs(q, k, v, bias_h, bias_w, height, width, scale)
    scale = float(scale)
    inputs = (q, k, v, bias_h, bias_w)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    name = resolve_backend_for_call(backend, q, k, v, needs_grad)
    if name == "reference":
        return reference.attention_2d_reference(
            q, k, v, bias_h, bias_w, height=height, width=width, scale=scale
        )
    if name == "triton":
        from aanet_kernels._triton import attention_2d_triton

        return attention_2d_triton(q, k, v, bias_h, bias_w, height, width, scale)
    return extension_attention_2d(q, k, v, bias_h, bias_w, height, width, scale)
