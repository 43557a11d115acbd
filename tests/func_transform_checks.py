"""Checks of ``attention_2d`` under ``torch.func`` transforms (``vmap``, ``grad``, ``vjp``,
``jvp``, ``jacrev``, ``jacfwd``, ``hessian``) and forward-mode autograd, shared by the CPU, GPU and
Triton-interpreter suites. Each compares a backend with the reference path on fresh random
inputs: by the same transform, or by plain autograd element by element."""

from __future__ import annotations

import contextlib
import unittest.mock
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap
from torch.utils._pytree import tree_leaves

import aanet_kernels as ak
from aanet_kernels import reference
from tests.attention_cases import Case, make_inputs

CASE = Case(2, 3, 3, 5, 8, 4)  # H != W, dkh != dvh, L = 15 (no block size)
TINY = Case(1, 1, 2, 3, 2, 2)  # small enough for whole Jacobians
SCALE = 0.6


def attention(backend: str, case: Case) -> Callable[..., Tensor]:
    def attend(q, k, v, bias_h, bias_w):  # type: ignore[no-untyped-def]
        return ak.attention_2d(
            q, k, v, bias_h, bias_w, height=case.height, width=case.width, scale=SCALE,
            backend=backend,
        )  # fmt: skip

    return attend


def assert_close(actual: Tensor, expected: Tensor, tolerance: float) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().clamp_min(1.0)
    error = ((actual.double() - expected.double()).abs().max() / scale).item()
    assert error < tolerance, f"relative error {error:.3g} >= {tolerance:.1g}"


def stacked_inputs(size: int, dtype: torch.dtype, device: str) -> list[Tensor]:
    """``size`` independent draws of CASE's five inputs, stacked along a new dim 0."""
    draws = [make_inputs(CASE, dtype, device, seed=40 + i) for i in range(size)]
    return [torch.stack(parts) for parts in zip(*draws, strict=True)]


def check_vmap(backend: str, device: str, dtype: torch.dtype, tolerance: float) -> None:
    """vmap with q, v, bias_h batched at dim 0, k at dim 2, and bias_w unbatched and broadcast
    over the batch (B = 1): equal to the reference element by element, in one folded call (the
    warning PyTorch gives when it falls back to a loop over the elements is an error here)."""
    q, k, v, bias_h, bias_w = stacked_inputs(3, dtype, device)
    shared_bias_w = bias_w[0, :1]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*performance drop.*")
        out = vmap(attention(backend, CASE), in_dims=(0, 2, 0, 0, None))(
            q, k.movedim(0, 2), v, bias_h, shared_bias_w
        )
    expected = torch.stack([
        attention("reference", CASE)(q[i], k[i], v[i], bias_h[i], shared_bias_w)
        for i in range(3)
    ])  # fmt: skip
    assert_close(out, expected, tolerance)


def check_grad(backend: str, device: str, dtype: torch.dtype, tolerance: float) -> None:
    """torch.func.grad and vjp of all five inputs against autograd through the reference."""
    inputs = make_inputs(CASE, dtype, device, seed=50)
    weight = torch.randn(CASE.batch, CASE.heads, CASE.length, CASE.dvh, dtype=dtype, device=device)

    def loss(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        return lambda *x: (fn(*x) * weight).sum()

    grads = grad(loss(attention(backend, CASE)), argnums=(0, 1, 2, 3, 4))(*inputs)
    leaves = [t.clone().requires_grad_() for t in inputs]
    expected = torch.autograd.grad(loss(attention("reference", CASE))(*leaves), leaves)
    for actual, wanted in zip(grads, expected, strict=True):
        assert_close(actual, wanted, tolerance)
    out, pullback = vjp(attention(backend, CASE), *inputs)
    for actual, wanted in zip(pullback(weight), expected, strict=True):
        assert_close(actual, wanted, tolerance)


def check_per_sample_grads(backend: str, device: str, dtype: torch.dtype, tolerance: float) -> None:
    """vmap(grad(...)), the per-sample gradients of DP-SGD: each sample's q, k, v its own, the
    bias tables shared parameters; equal to one autograd call per sample on the reference."""
    q, k, v, bias_h, bias_w = stacked_inputs(4, dtype, device)
    bias_h, bias_w = bias_h[0, :1], bias_w[0, :1]  # shared: (1, Nh, L, H) and (1, Nh, L, W)

    def sample_loss(fn, q, k, v, bias_h, bias_w):  # type: ignore[no-untyped-def]
        return fn(q, k, v, bias_h, bias_w).square().sum()

    attend = attention(backend, CASE)
    per_sample = vmap(
        grad(lambda *x: sample_loss(attend, *x), argnums=(0, 3, 4)),
        in_dims=(0, 0, 0, None, None),
    )(q, k, v, bias_h, bias_w)
    for i in range(q.shape[0]):
        leaves = [q[i].clone().requires_grad_(), bias_h.clone().requires_grad_()]
        leaves.append(bias_w.clone().requires_grad_())
        value = sample_loss(attention("reference", CASE), leaves[0], k[i], v[i], *leaves[1:])
        for batched, wanted in zip(per_sample, torch.autograd.grad(value, leaves), strict=True):
            assert_close(batched[i], wanted, tolerance)


def check_forward_mode(backend: str, device: str, dtype: torch.dtype, tolerance: float) -> None:
    """torch.func.jvp with tangents on all five inputs, and torch.autograd.forward_ad with a
    tangent on q alone, against torch.func.jvp of the reference."""
    primals = make_inputs(CASE, dtype, device, seed=60)
    tangents = make_inputs(CASE, dtype, device, seed=61)
    out, tangent = jvp(attention(backend, CASE), primals, tangents)
    expected_out, expected = jvp(attention("reference", CASE), primals, tangents)
    assert_close(out, expected_out, tolerance)
    assert_close(tangent, expected, tolerance)

    q_only = (tangents[0],) + tuple(torch.zeros_like(t) for t in primals[1:])
    _, expected = jvp(attention("reference", CASE), primals, q_only)
    with fwAD.dual_level():
        dual_q = fwAD.make_dual(primals[0], tangents[0])
        dual_out = attention(backend, CASE)(dual_q, *primals[1:])
        found = fwAD.unpack_dual(dual_out).tangent
    assert found is not None, "forward-mode AD lost the tangent"
    assert_close(found, expected, tolerance)


def check_jacobians(backend: str, device: str, dtype: torch.dtype, tolerance: float) -> None:
    """jacrev and jacfwd in every input, on a tiny case, against jacrev of the reference."""
    inputs = make_inputs(TINY, dtype, device, seed=70)
    argnums = (0, 1, 2, 3, 4)
    expected = jacrev(attention("reference", TINY), argnums=argnums)(*inputs)
    for transform in (jacrev, jacfwd):
        found = transform(attention(backend, TINY), argnums=argnums)(*inputs)
        for actual, wanted in zip(found, expected, strict=True):
            assert_close(actual, wanted, tolerance)


def check_second_order(backend: str, device: str, dtype: torch.dtype, tolerance: float) -> None:
    """grad of grad (a gradient penalty, through both biases and q) and torch.func.hessian
    (forward over reverse) in q and bias_h, on a tiny case, against the same on the reference."""
    q, k, v, bias_h, bias_w = make_inputs(TINY, dtype, device, seed=80)

    def penalty(backend: str) -> Callable[..., Tensor]:
        def value(q, bias_h, bias_w):  # type: ignore[no-untyped-def]
            inner = grad(lambda *x: attention(backend, TINY)(x[0], k, v, *x[1:]).sin().sum())
            return inner(q, bias_h, bias_w).square().sum()

        return value

    def objective(backend: str) -> Callable[..., Tensor]:
        return lambda q, bias_h: attention(backend, TINY)(q, k, v, bias_h, bias_w).sin().sum()

    argnums = (0, 1, 2)
    found = grad(penalty(backend), argnums=argnums)(q, bias_h, bias_w)
    expected = grad(penalty("reference"), argnums=argnums)(q, bias_h, bias_w)
    for actual, wanted in zip(found, expected, strict=True):
        assert_close(actual, wanted, tolerance)
    found = hessian(objective(backend), argnums=(0, 1))(q, bias_h)
    expected = hessian(objective("reference"), argnums=(0, 1))(q, bias_h)
    for actual, wanted in zip(tree_leaves(found), tree_leaves(expected), strict=True):
        assert_close(actual, wanted, tolerance)


def check_gradcheck_every_mode(
    backend: str, device: str, dtype: torch.dtype, tolerance: float
) -> None:
    """PyTorch's own numerical oracle in every mode it has: reverse and forward mode, batched
    (vmapped) gradients of both, undefined output gradients, and second derivatives reverse over
    reverse and forward over reverse (fast mode: random projections of the Jacobians, so that the
    interpreter can afford it). ``tolerance`` is unused: gradcheck has its own, in fp64."""
    inputs = tuple(t.requires_grad_() for t in make_inputs(TINY, torch.float64, device, seed=90))
    attend = attention(backend, TINY)
    assert torch.autograd.gradcheck(
        attend, inputs, check_forward_ad=True, check_batched_grad=True,
        check_batched_forward_grad=True, check_undefined_grad=True, fast_mode=True,
    )  # fmt: skip
    assert torch.autograd.gradgradcheck(
        attend, inputs, check_fwd_over_rev=True, check_rev_over_rev=True, check_batched_grad=True,
        fast_mode=True,
    )  # fmt: skip


CHECKS = [
    check_vmap,
    check_grad,
    check_per_sample_grads,
    check_forward_mode,
    check_jacobians,
    check_second_order,
    check_gradcheck_every_mode,
]


@contextlib.contextmanager
def refusing_the_reference_path() -> Iterator[None]:
    """The reference path made to fail while inside: for the checks that a first derivative uses
    the fused backward."""

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the reference path was used for a first derivative")

    with unittest.mock.patch.object(reference, "attention_2d_reference", refuse):
        yield


REVERSE_TRANSFORMS = ("grad", "vjp", "jacrev", "vmap_grad", "hessian")


def reverse_transform(transform: str, backend: str, fixed: tuple) -> Callable[..., object]:
    """``(q, bias_h) -> ...`` under ``transform`` of attention on TINY, with ``fixed = (k, v,
    bias_w, weight)`` held constant (``weight`` weighs the output in the losses and is the vjp's
    cotangent)."""
    k, v, bias_w, weight = fixed
    attend = attention(backend, TINY)

    def out(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return attend(x, k, v, b, bias_w)

    def loss(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (out(x, b) * weight).square().sum()

    if transform == "grad":
        return grad(loss, argnums=(0, 1))
    if transform == "vjp":
        return lambda x, b: vjp(out, x, b)[1](weight)
    if transform == "jacrev":
        return jacrev(out, argnums=(0, 1))
    if transform == "vmap_grad":  # per-sample gradients: q and bias_h stacked along a new dim
        per_sample = vmap(grad(loss, argnums=(0, 1)))
        return lambda x, b: per_sample(torch.stack([x, -0.5 * x]), torch.stack([b, b.flip(-1)]))
    return lambda x, b: hessian(lambda y: out(y, b).sum())(x)


def check_reverse_mode_inside_compile(backend: str, device: str, transform: str) -> None:
    """grad, vjp, jacrev, vmap(grad) and hessian inside torch.compile(fullgraph=True) over a fused
    backend: until 2026-12-01 Dynamo refused them (the autograd.Function that
    torch.library.register_autograd generates has no setup_context for torch.func,
    pytorch/pytorch#168393). Against the same transform over the reference path in eager, fp64;
    first derivatives must not touch the reference path (it is made to fail)."""
    q, k, v, bias_h, bias_w = make_inputs(TINY, torch.float64, device, seed=63)
    gen = torch.Generator().manual_seed(64)
    weight = torch.randn(q.shape[:-1] + v.shape[-1:], generator=gen, dtype=torch.float64)
    fixed = (k, v, bias_w, weight.to(device))
    expected = reverse_transform(transform, "reference", fixed)(q, bias_h)
    torch._dynamo.reset()
    compiled = torch.compile(
        reverse_transform(transform, backend, fixed), fullgraph=True, backend="aot_eager"
    )
    with contextlib.ExitStack() as stack:
        if transform != "hessian":  # a second derivative goes through the reference by design
            stack.enter_context(refusing_the_reference_path())
        found = compiled(q, bias_h)
    for got, want in zip(tree_leaves(found), tree_leaves(expected), strict=True):
        assert got.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
