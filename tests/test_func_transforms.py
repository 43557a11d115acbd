"""attention_2d under torch.func transforms and forward-mode autograd, on the CPU kernel and (on
a GPU) the CUDA and Triton kernels; the Triton kernels under the interpreter in
tests/triton_interpret. The forward-mode formula of the reference path is checked against
PyTorch's own forward-mode differentiation of it."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import grad, jvp, vjp, vmap

import aanet_kernels as ak
from aanet_kernels import reference
from aanet_kernels._extension import extension_loaded
from tests import func_transform_checks as checks
from tests.attention_cases import AWKWARD_CASES, Case, make_inputs
from tests.property_cases import budget

OPS = torch.ops.aanet_kernels
needs_extension = pytest.mark.skipif(not extension_loaded(), reason="aanet_kernels._C not built")
BACKENDS = [
    pytest.param("cpu", "cpu", marks=needs_extension),
    pytest.param("cuda", "cuda", marks=[pytest.mark.gpu, needs_extension]),
    pytest.param("triton", "cuda", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("check", checks.CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_transform_matches_reference(check, backend: str, device: str) -> None:
    check(backend, device, torch.float64, 1e-10)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_vmap_in_float32(backend: str, device: str) -> None:
    checks.check_vmap(backend, device, torch.float32, 1e-5)


@needs_extension
def test_vmap_of_the_bare_ops_folds_into_the_batch() -> None:
    """torch.ops.aanet_kernels.attention_2d_fwd/bwd under vmap (no autograd involved): one call on
    the folded batch, equal to the op per element; an absent bias gets an empty placeholder."""
    case = Case(2, 2, 3, 4, 5, 3, "h")
    draws = [make_inputs(case, seed=80 + i) for i in range(3)]
    q, k, v, bias_h = (torch.stack([d[n] for d in draws]) for n in range(4))
    geometry = (case.height, case.width, 0.5)
    with warnings.catch_warnings():  # PyTorch warns when it falls back to a per-element loop
        warnings.filterwarnings("error", message=".*performance drop.*")
        out, lse = vmap(lambda *t: OPS.attention_2d_fwd(*t, None, *geometry))(q, k, v, bias_h)
        grad_out = torch.randn_like(out)
        grads = vmap(lambda *t: OPS.attention_2d_bwd(*t[:5], None, *t[5:], *geometry))(
            grad_out, q, k, v, bias_h, out, lse
        )
    for i in range(3):
        out_i, lse_i = OPS.attention_2d_fwd(q[i], k[i], v[i], bias_h[i], None, *geometry)
        torch.testing.assert_close(out[i], out_i, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse[i], lse_i, rtol=1e-12, atol=1e-12)
        grads_i = OPS.attention_2d_bwd(
            grad_out[i], q[i], k[i], v[i], bias_h[i], None, out_i, lse_i, *geometry
        )
        for batched, single in zip(grads[:4], grads_i[:4], strict=True):
            torch.testing.assert_close(batched[i], single, rtol=1e-12, atol=1e-12)
    assert grads[4].shape == (3, 0)  # the empty placeholder, stacked by vmap's out_dims=0


@pytest.mark.parametrize("case", AWKWARD_CASES, ids=str)
def test_reference_jvp_matches_forward_mode_autograd(case: Case) -> None:
    """The explicit forward-mode formula against torch.func.jvp through the reference's own ATen
    ops, with every other input held constant."""
    primals = make_inputs(case, seed=90)
    free = [i for i, t in enumerate(primals) if t is not None][::2]  # the others held constant
    tangents = [t if i in free else None for i, t in enumerate(make_inputs(case, seed=91))]

    def attend(*moving):  # type: ignore[no-untyped-def]
        full = list(primals)
        for i, t in zip(free, moving, strict=True):
            full[i] = t
        return reference.attention_2d_reference(
            *full, height=case.height, width=case.width, scale=0.7
        )

    _, expected = jvp(attend, tuple(primals[i] for i in free), tuple(tangents[i] for i in free))
    found = reference.attention_2d_reference_jvp(
        primals, tuple(tangents), height=case.height, width=case.width, scale=0.7
    )
    torch.testing.assert_close(found, expected, rtol=1e-10, atol=1e-12)


def test_reference_jvp_of_a_fully_masked_row_is_zero() -> None:
    """A query whose logits are all -inf gets a zero output, and a zero tangent."""
    case = Case(1, 1, 2, 3, 4, 2)
    q, k, v, bias_h, bias_w = make_inputs(case, seed=92)
    bias_h[..., 1, :] = float("-inf")
    tangents = make_inputs(case, seed=93)
    found = ak.attention_2d(
        q, k, v, bias_h, bias_w, height=2, width=3, backend="reference"
    )  # the output row is zero...
    dout = reference.attention_2d_reference_jvp(
        (q, k, v, bias_h, bias_w), tangents, height=2, width=3
    )
    assert torch.equal(found[..., 1, :], torch.zeros_like(found[..., 1, :]))
    assert torch.equal(dout[..., 1, :], torch.zeros_like(dout[..., 1, :]))  # ...and so its tangent
    assert dout[..., 0, :].abs().min() > 0


@needs_extension
def test_first_derivatives_use_the_fused_backward() -> None:
    """grad, vjp, vmap(grad) and backward(create_graph=True) never fall back to the reference
    path (which would build the L x L logits): the reference is made to fail, and they still run."""
    q, k, v, bias_h, bias_w = checks.stacked_inputs(3, torch.float64, "cpu")
    attend = checks.attention("cpu", checks.CASE)

    def loss(*x: torch.Tensor) -> torch.Tensor:
        return attend(*x).sum()

    with checks.refusing_the_reference_path():
        grad(loss, argnums=(0, 3))(q[0], k[0], v[0], bias_h[0], bias_w[0])
        vmap(grad(loss, argnums=(0, 4)))(q, k, v, bias_h, bias_w)
        out, pullback = vjp(attend, q[0], k[0], v[0], bias_h[0], bias_w[0])
        pullback(torch.ones_like(out))
        # backward(create_graph=True) too: only a second derivative may recompute.
        leaf = q[0].clone().requires_grad_()
        (dq,) = torch.autograd.grad(
            attend(leaf, k[0], v[0], None, None).sum(), leaf, create_graph=True
        )
    assert dq.requires_grad


@needs_extension
def test_torch_compile_of_vmap_matches_eager() -> None:
    """torch.compile(fullgraph=True) of vmap over the op gives what eager gives."""
    q, k, v, bias_h, bias_w = checks.stacked_inputs(3, torch.float32, "cpu")
    batched = vmap(checks.attention("cpu", checks.CASE))
    torch.testing.assert_close(
        torch.compile(batched, fullgraph=True)(q, k, v, bias_h, bias_w),
        batched(q, k, v, bias_h, bias_w),
    )


@needs_extension
@pytest.mark.parametrize("transform", ["jvp", "jacfwd", "dual"])
def test_forward_mode_inside_torch_compile_matches_eager(transform: str) -> None:
    """Forward mode inside a compiled region: until 2026-12-01 the compiled graph took the op's
    registered autograd, which has no forward formula, and the tangent came out zero (jvp) or
    absent (dual tensors) without an error. Against the reference path in eager, fp64."""
    q, k, v, bias_h, bias_w = make_inputs(checks.TINY, torch.float64, seed=61)
    tangent = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(62))

    def through(backend: str):  # type: ignore[no-untyped-def]
        attend = checks.attention(backend, checks.TINY)

        def of_q(x: torch.Tensor) -> torch.Tensor:
            return attend(x, k, v, bias_h, bias_w)

        if transform == "jvp":
            return lambda x, t: jvp(of_q, (x,), (t,))[1]
        if transform == "jacfwd":
            return lambda x, t: torch.func.jacfwd(of_q)(x)
        return lambda x, t: dual_tangent(of_q, x, t)

    expected = through("reference")(q, tangent)
    torch._dynamo.reset()
    got = torch.compile(through("cpu"), fullgraph=True, backend="aot_eager")(q, tangent)
    assert got is not None and got.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("transform", checks.REVERSE_TRANSFORMS)
@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_reverse_mode_inside_torch_compile_matches_eager(
    transform: str, backend: str, device: str
) -> None:
    checks.check_reverse_mode_inside_compile(backend, device, transform)


@needs_extension
def test_bare_forward_op_under_transforms_matches_reference() -> None:
    """torch.ops.aanet_kernels.attention_2d_fwd itself under grad, jvp and dual tensors: until
    2026-12-01 torch.func refused it and forward-mode AD gave no tangent without a word (its
    autograd came from torch.library.register_autograd). Against the reference path, fp64."""
    case = checks.TINY
    q, k, v, bias_h, bias_w = make_inputs(case, torch.float64, seed=65)
    tangent = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(66))

    def bare(x: torch.Tensor) -> torch.Tensor:
        return OPS.attention_2d_fwd(x, k, v, bias_h, bias_w, case.height, case.width, 0.6)[0]

    public = checks.attention("reference", case)

    def exact(x: torch.Tensor) -> torch.Tensor:
        return public(x, k, v, bias_h, bias_w)

    torch.testing.assert_close(
        grad(lambda x: bare(x).square().sum())(q), grad(lambda x: exact(x).square().sum())(q)
    )
    torch.testing.assert_close(jvp(bare, (q,), (tangent,))[1], jvp(exact, (q,), (tangent,))[1])
    found = dual_tangent(bare, q, tangent)
    assert found is not None
    torch.testing.assert_close(found, dual_tangent(exact, q, tangent))


def dual_tangent(f, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The tangent of ``f`` at ``x`` along ``t`` through ``torch.autograd.forward_ad``."""
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        return fwad.unpack_dual(f(fwad.make_dual(x, t))).tangent


SHAPE_LIMITS = {"batch": 2, "heads": 2, "height": 4, "width": 5, "dkh": 4, "dvh": 3}
BROADCASTS = [(False, False), (True, False), (False, True), (True, True)]  # size 1: batch, heads


@st.composite
def vmapped_calls(draw: st.DrawFn) -> dict:
    """A vmap over attention_2d: the shape, the vmapped size, and for each of the five tensors
    whether it is present (biases may be absent), how a bias broadcasts over batch and heads, and
    the dim it is mapped at (``None``: not mapped; q always is)."""
    tensors = {}
    for name in ("q", "k", "v", "bias_h", "bias_w"):
        is_bias = name.startswith("bias")
        if is_bias and draw(st.booleans()):
            continue
        broadcast = draw(st.sampled_from(BROADCASTS)) if is_bias else (False, False)
        mapped = name == "q" or draw(st.booleans())
        tensors[name] = (broadcast, draw(st.integers(0, 4)) if mapped else None)
    shape = {name: draw(st.integers(1, limit)) for name, limit in SHAPE_LIMITS.items()}
    return {"shape": shape, "size": draw(st.integers(1, 3)), "tensors": tensors}


def build_vmapped_call(call: dict) -> tuple[list, list, list]:
    """The five physical tensors (``None`` if absent), their in_dims, and for each vmapped
    element the five logical tensors it stands for."""
    s, size = call["shape"], call["size"]
    gen = torch.Generator().manual_seed(sum(s.values()) * 7 + size)
    last = {
        "q": s["dkh"],
        "k": s["dkh"],
        "v": s["dvh"],
        "bias_h": s["height"],
        "bias_w": s["width"],
    }
    tensors, in_dims, elements = [], [], [[] for _ in range(size)]
    for name, width in last.items():
        if name not in call["tensors"]:
            tensors.append(None)
            in_dims.append(None)
            for element in elements:
                element.append(None)
            continue
        (one_batch, one_head), dim = call["tensors"][name]
        logical = (1 if one_batch else s["batch"], 1 if one_head else s["heads"])
        logical += (s["height"] * s["width"], width)
        draws = size if dim is not None else 1
        stack = torch.randn(draws, *logical, generator=gen, dtype=torch.float64)
        for e, element in enumerate(elements):
            element.append(stack[e if dim is not None else 0])
        tensors.append(stack.movedim(0, dim) if dim is not None else stack[0])
        in_dims.append(dim)
    return tensors, in_dims, elements


@pytest.mark.fuzz
@needs_extension
@budget(25, 300)
@given(call=vmapped_calls())
def test_vmap_of_vjp_matches_reference_per_element(call: dict) -> None:
    """vmap of the output and its vjp on the CPU kernel, over random in_dims, absent and broadcast
    biases, against plain autograd through the reference, element by element."""
    tensors, in_dims, elements = build_vmapped_call(call)
    s = call["shape"]
    present = [i for i, t in enumerate(tensors) if t is not None]

    def attend(backend: str, moving) -> torch.Tensor:  # type: ignore[no-untyped-def]
        args = [None] * 5
        for i, t in zip(present, moving, strict=True):
            args[i] = t
        return ak.attention_2d(
            *args, height=s["height"], width=s["width"], scale=0.8, backend=backend
        )

    def out_and_grads(*moving):  # type: ignore[no-untyped-def]
        out, pullback = vjp(lambda *m: attend("cpu", m), *moving)
        return out, pullback(out.cos())

    mapped = vmap(out_and_grads, in_dims=tuple(in_dims[i] for i in present))
    out, grads = mapped(*(tensors[i] for i in present))
    for e, element in enumerate(elements):
        leaves = [element[i].clone().requires_grad_() for i in present]
        expected = attend("reference", leaves)
        wanted = torch.autograd.grad(expected, leaves, expected.detach().cos())
        checks.assert_close(out[e], expected, 1e-10)
        for found, gradient in zip(grads, wanted, strict=True):
            checks.assert_close(found[e], gradient, 1e-10)
