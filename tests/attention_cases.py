"""Shared test inputs for every attention_2d backend: awkward shapes and fresh random tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from aanet_kernels import attention_2d, attention_2d_reference


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    height: int
    width: int
    dkh: int
    dvh: int
    bias: str = "hw"  # which tables are present: "hw", "h", "w" or ""

    @property
    def length(self) -> int:
        return self.height * self.width

    def __str__(self) -> str:
        return (
            f"B{self.batch}xNh{self.heads}_{self.height}x{self.width}"
            f"_dk{self.dkh}_dv{self.dvh}_{self.bias or 'nobias'}"
        )


# The design's awkward shapes: H != W, odd sizes, L = 1, L not a multiple of any block,
# dkh != dvh, head dims of 1, 3, 20 and 64, batch x heads of 1, each bias on its own, and maps wider
# and taller than the Triton kernels' key tile under the interpreter (16): the kernels walk the
# 3 x 37 map by rows of 3 tiles, the 37 x 3 one by columns of 3 tiles (the tables trade places).
AWKWARD_CASES = [
    Case(1, 1, 1, 1, 3, 1),
    Case(2, 3, 3, 5, 8, 4),
    Case(1, 2, 7, 7, 1, 3),
    Case(2, 1, 5, 3, 20, 20, "h"),
    Case(1, 2, 4, 9, 3, 64, "w"),
    Case(2, 2, 6, 11, 64, 8),
    Case(1, 1, 9, 13, 16, 1, ""),
    Case(3, 2, 8, 8, 17, 5),
    Case(1, 2, 3, 37, 8, 6),
    Case(1, 2, 37, 3, 8, 6),
]


def make_inputs(
    case: Case,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    *,
    bias_scale: float = 1.0,
    requires_grad: bool = False,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Fresh random (never zero) q, k, v, bias_h, bias_w for ``case``."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> Tensor:
        t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
        return t.to(device).requires_grad_(requires_grad)

    b, n, length = case.batch, case.heads, case.length
    q = rand(b, n, length, case.dkh)
    k = rand(b, n, length, case.dkh)
    v = rand(b, n, length, case.dvh)
    bias_h = rand(b, n, length, case.height, scale=bias_scale) if "h" in case.bias else None
    bias_w = rand(b, n, length, case.width, scale=bias_scale) if "w" in case.bias else None
    return q, k, v, bias_h, bias_w


def check_grid_limit(backend: str, axis: str, dtype: torch.dtype, device: str) -> None:
    """GPU kernels put heads and batch on grid axes 1 and 2 (at most 65535 each): 65535 slices
    along ``axis`` run forward and backward, each program on its own (batch, head). Rule: error
    against fp64 at most twice the reference path's own in ``dtype``, plus a small floor (a
    program on the wrong slice would be off by the values themselves)."""
    shape = (65535, 2, 2, 8) if axis == "batch" else (2, 65535, 2, 8)
    gen = torch.Generator().manual_seed(7)
    exact = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    floor = 1e-5 if dtype == torch.float32 else 2e-2

    def outputs(method: str, precision: torch.dtype) -> list[Tensor]:
        inputs = [t.to(device, precision).requires_grad_() for t in exact]
        run = attention_2d_reference if method == "reference" else attention_2d
        extra = {} if method == "reference" else {"backend": method}
        out = run(*inputs, None, None, height=1, width=2, **extra)
        grads = torch.autograd.grad(out.float().square().sum(), inputs)
        return [t.double().cpu() for t in (out, *grads)]

    want = outputs("reference", torch.float64)
    own = outputs("reference", dtype)
    got = outputs(backend, dtype)
    for name, g, o, w in zip(("out", "dq", "dk", "dv"), got, own, want, strict=True):
        size = max(1.0, w.abs().max().item())
        limit = 2 * (o - w).abs().max().item() + floor * size
        assert (g - w).abs().max().item() <= limit, name


def check_on_second_device(backend: str) -> None:
    """Inputs on ``cuda:1`` while ``cuda:0`` is current (a model moved to a second GPU): the output
    and gradients are right and stay on ``cuda:1``. Triton launches on the current device unless
    told otherwise, so a backend without a device guard faults or reads the wrong memory here."""
    case = Case(2, 3, 5, 7, 16, 8)
    exact = make_inputs(case, torch.float64, seed=11)
    torch.cuda.set_device(0)
    inputs = [t.to("cuda:1", torch.float32).requires_grad_() for t in exact]
    out = attention_2d(*inputs, height=case.height, width=case.width, backend=backend)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    want_inputs = [t.requires_grad_() for t in exact]
    want = attention_2d_reference(*want_inputs, height=case.height, width=case.width)
    want_grads = torch.autograd.grad(want.square().sum(), want_inputs)
    assert torch.cuda.current_device() == 0
    for got, expected in zip((out, *grads), (want, *want_grads), strict=True):
        assert got.device == torch.device("cuda:1")
        torch.testing.assert_close(got.double().cpu(), expected, rtol=1e-4, atol=1e-5)


# fp32 gradients at large logits: both the kernels and PyTorch's fp32 reference inherit the
# rounding of logits near ``magnitude`` (|S| * 6e-8), so the kernels should not add more. The
# saved log-sum-exp rounded to fp32 did: up to 3x PyTorch's error in dQ at 1e3-1e4 (ops.lse_dtype).
LARGE_LOGIT_CASE = Case(2, 2, 5, 6, 8, 8)
LARGE_LOGIT_MAGNITUDES = (1e2, 1e3, 1e4)


def check_fp32_gradients_at_large_logits(compute, magnitude: float, seed: int = 0) -> None:
    """``compute(q, k, v, bias_h, bias_w, grad_out)`` returns ``out, dq, dk, dv, dbias_h,
    dbias_w`` of fp32 inputs at :data:`LARGE_LOGIT_CASE` with scale 1. Rule: each within 1.5x
    PyTorch's own fp32 error against fp64, plus 1e-5 of its size (the fused backwards' ``delta =
    rowsum(dO * O)`` leaves rounding noise where the softmax saturates, README "Backends")."""
    case = LARGE_LOGIT_CASE
    q, k, v, bh, bw = make_inputs(case, torch.float32, seed=seed)
    bh = bh * magnitude
    gen = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(case.batch, case.heads, case.length, case.dvh, generator=gen)

    def reference(dtype: torch.dtype) -> list[Tensor]:
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v, bh, bw)]
        out = attention_2d_reference(*inputs, height=case.height, width=case.width)
        return [out, *torch.autograd.grad(out, inputs, grad_out.to(dtype))]

    want, own = reference(torch.float64), reference(torch.float32)
    got = compute(q, k, v, bh, bw, grad_out)
    names = ("out", "dq", "dk", "dv", "dbias_h", "dbias_w")
    for name, g, o, w in zip(names, got, own, want, strict=True):
        error = (g.double().cpu() - w).abs().max().item()
        torch_error = (o.double() - w).abs().max().item()
        limit = 1.5 * torch_error + 1e-5 * max(1.0, w.abs().max().item())
        assert error <= limit, (name, magnitude, error, torch_error)


def attention_2d_gradients(backend: str, device: str | torch.device = "cpu"):
    """A ``compute`` for :func:`check_fp32_gradients_at_large_logits` through the public op."""

    def compute(*tensors: Tensor) -> list[Tensor]:
        *inputs, grad_out = [t.to(device) for t in tensors]
        inputs = [t.requires_grad_() for t in inputs]
        case = LARGE_LOGIT_CASE
        out = attention_2d(*inputs, height=case.height, width=case.width, backend=backend)
        return [out, *torch.autograd.grad(out, inputs, grad_out)]

    return compute
