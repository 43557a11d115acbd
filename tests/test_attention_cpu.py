"""The C++ CPU backend of attention_2d against the reference path."""

from __future__ import annotations

import pytest
import torch

import aanet_kernels as ak
from aanet_kernels.reference import attention_2d_reference_lse
from tests.attention_cases import AWKWARD_CASES, Case, make_inputs
from tests.compile_checks import check_compile_dynamic_shapes

pytestmark = pytest.mark.skipif(
    "cpu" not in ak.available_backends("cpu"),
    reason="the C++ extension is not built (run `make test`, which builds it)",
)
op = torch.ops.aanet_kernels

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().clamp_min(1.0)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def _grads(fn, inputs, grad_out):
    out = fn(*inputs)
    present = [t for t in inputs if t is not None]
    return out, torch.autograd.grad(out, present, grad_out)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", AWKWARD_CASES, ids=str)
def test_forward_and_lse_match_reference(case: Case, dtype: torch.dtype, poisoned_allocations):
    q, k, v, bh, bw = make_inputs(case, dtype, seed=1)
    scale = case.dkh**-0.5
    out, lse = op.attention_2d_fwd(q, k, v, bh, bw, case.height, case.width, scale)
    ref = ak.attention_2d_reference(
        q, k, v, bh, bw, height=case.height, width=case.width, scale=scale
    )
    ref_lse = attention_2d_reference_lse(
        q, k, bh, bw, height=case.height, width=case.width, scale=scale
    )
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    assert _relative_error(out, ref) < TOLERANCE[dtype]
    assert _relative_error(lse, ref_lse) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", AWKWARD_CASES, ids=str)
def test_gradients_match_reference(case: Case, dtype: torch.dtype, poisoned_allocations):
    inputs = make_inputs(case, dtype, requires_grad=True, seed=2)
    kwargs = dict(height=case.height, width=case.width, scale=0.7)
    grad_out = torch.randn(case.batch, case.heads, case.length, case.dvh, dtype=dtype)
    out, grads = _grads(lambda *t: ak.attention_2d(*t, **kwargs, backend="cpu"), inputs, grad_out)
    ref, ref_grads = _grads(lambda *t: ak.attention_2d_reference(*t, **kwargs), inputs, grad_out)
    assert _relative_error(out, ref) < TOLERANCE[dtype]
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert grad.shape == ref_grad.shape
        assert _relative_error(grad, ref_grad) < TOLERANCE[dtype] * 10


@pytest.mark.parametrize("case", [Case(1, 2, 3, 4, 3, 2), Case(2, 1, 2, 5, 2, 3, "h")], ids=str)
def test_gradcheck_float64(case: Case):
    inputs = make_inputs(case, torch.float64, requires_grad=True, seed=3)
    assert torch.autograd.gradcheck(
        lambda *t: ak.attention_2d(
            *t, height=case.height, width=case.width, scale=0.8, backend="cpu"
        ),
        inputs,
    )


@pytest.mark.parametrize("bias", ["both", "broadcast", "none"])
def test_double_backward_gradgradcheck(bias: str):
    """backward(create_graph=True) gives differentiable gradients (gradient penalties): the fused
    backward op has no derivative, so they are recomputed through the reference path."""
    case = Case(1, 2, 2, 3, 3, 2)
    q, k, v, bh, bw = make_inputs(case, torch.float64, requires_grad=True, seed=5)
    if bias == "broadcast":
        bh = bh[:1, :1].detach().requires_grad_()
    biases = {"both": (bh, bw), "broadcast": (bh, None), "none": (None, None)}[bias]
    inputs = (q, k, v, *biases)
    assert torch.autograd.gradgradcheck(
        lambda *t: ak.attention_2d(*t, height=2, width=3, scale=0.8, backend="cpu"),
        inputs,
    )


def test_gradient_penalty_matches_reference():
    case = Case(2, 2, 3, 4, 4, 3)
    inputs = make_inputs(case, torch.float64, requires_grad=True, seed=6)
    kwargs = dict(height=case.height, width=case.width, scale=0.5)

    def penalty_grads(fn):
        out = fn(*inputs, **kwargs)
        (dq,) = torch.autograd.grad(out.square().sum(), inputs[0], create_graph=True)
        return torch.autograd.grad(dq.square().sum(), inputs[1:])

    cpu = penalty_grads(lambda *t, **kw: ak.attention_2d(*t, **kw, backend="cpu"))
    ref = penalty_grads(ak.attention_2d_reference)
    for got, expected in zip(cpu, ref, strict=True):
        assert got.abs().max() > 0
        assert _relative_error(got, expected) < 1e-10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_is_computed_in_float32(dtype: torch.dtype):
    """Kernel error against the fp64 reference is at most 2x PyTorch's own in the same dtype."""
    case = Case(2, 2, 6, 7, 16, 8)
    q, k, v, bh, bw = make_inputs(case, dtype, seed=4)
    kwargs = dict(height=case.height, width=case.width, scale=0.25)
    exact = ak.attention_2d_reference(*(t.double() for t in (q, k, v, bh, bw)), **kwargs)
    torch_own = ak.attention_2d_reference(q, k, v, bh, bw, **kwargs)
    out = ak.attention_2d(q, k, v, bh, bw, **kwargs, backend="cpu")
    assert out.dtype == dtype
    own_error = (torch_own.double() - exact).abs().max().item()
    assert (out.double() - exact).abs().max().item() <= 2 * own_error + 1e-3


def test_broadcast_and_strided_inputs_match_contiguous():
    case = Case(2, 3, 4, 5, 6, 4)
    q, k, v, _, _ = make_inputs(case, torch.float64, seed=5)
    kwargs = dict(height=case.height, width=case.width)
    bias_h = torch.randn(1, case.heads, case.length, case.height, dtype=torch.float64)
    bias_w = torch.randn(case.batch, 1, case.length, case.width, dtype=torch.float64)
    # Heads split out of a (B, C, L) projection without a copy: the head dim is strided.
    proj = torch.randn(case.batch, case.heads * case.dkh, case.length, dtype=torch.float64)
    q_view = proj.view(case.batch, case.heads, case.dkh, case.length).transpose(-1, -2)
    assert not q_view.is_contiguous()
    out = ak.attention_2d(q_view, k, v, bias_h, bias_w, **kwargs, backend="cpu")
    expanded = ak.attention_2d(
        q_view.contiguous(),
        k,
        v,
        bias_h.expand(case.batch, -1, -1, -1).contiguous(),
        bias_w.expand(-1, case.heads, -1, -1).contiguous(),
        **kwargs,
        backend="cpu",
    )
    ref = ak.attention_2d_reference(q_view, k, v, bias_h, bias_w, **kwargs)
    torch.testing.assert_close(out, expanded, rtol=0, atol=0)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_broadcast_bias_gradients_are_summed_to_their_shape():
    case = Case(3, 2, 3, 3, 4, 2)
    q, k, v, _, _ = make_inputs(case, torch.float64, seed=6)
    bias_h = torch.randn(1, 1, case.length, case.height, dtype=torch.float64, requires_grad=True)
    bias_w = torch.randn(case.batch, case.heads, case.length, case.width, dtype=torch.float64)
    bias_w = bias_w[:, :1].expand(-1, case.heads, -1, -1).detach().requires_grad_()  # stride 0
    kwargs = dict(height=case.height, width=case.width)
    grads = torch.autograd.grad(
        ak.attention_2d(q, k, v, bias_h, bias_w, **kwargs, backend="cpu").sum(), (bias_h, bias_w)
    )
    ref = torch.autograd.grad(
        ak.attention_2d_reference(q, k, v, bias_h, bias_w, **kwargs).sum(), (bias_h, bias_w)
    )
    for grad, ref_grad in zip(grads, ref, strict=True):
        assert grad.shape == ref_grad.shape
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_fully_masked_row_gives_zeros_and_zero_gradients():
    case = Case(1, 1, 3, 4, 5, 3)
    q, k, v, bh, bw = make_inputs(case, torch.float64, requires_grad=True, seed=7)
    mask = torch.zeros_like(bh)
    mask[0, 0, 5] = float("-inf")  # query 5 sees no key
    bias_h = (bh + mask).detach().requires_grad_()
    kwargs = dict(height=case.height, width=case.width)
    out = ak.attention_2d(q, k, v, bias_h, bw, **kwargs, backend="cpu")
    ref = ak.attention_2d_reference(q, k, v, bias_h, bw, **kwargs)
    assert torch.equal(out[0, 0, 5], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(out, ref)
    dq, dbias_h = torch.autograd.grad(out.sum(), (q, bias_h))
    assert torch.isfinite(dq).all() and torch.isfinite(dbias_h).all()
    assert torch.equal(dq[0, 0, 5], torch.zeros(5, dtype=torch.float64))


def test_nan_in_a_query_stays_in_its_row():
    case = Case(1, 1, 4, 4, 3, 2)
    q, k, v, bh, bw = make_inputs(case, torch.float32, seed=8)
    q[0, 0, 6, 1] = float("nan")
    out = ak.attention_2d(q, k, v, bh, bw, height=4, width=4, backend="cpu")
    assert torch.isnan(out[0, 0, 6]).all()
    assert torch.isfinite(out[0, 0, torch.arange(16) != 6]).all()


def test_empty_batch():
    case = Case(0, 2, 3, 3, 4, 2)
    q, k, v, bh, bw = make_inputs(case, torch.float32)
    assert ak.attention_2d(q, k, v, bh, bw, height=3, width=3, backend="cpu").shape == (0, 2, 9, 2)


@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(with_bias: bool):
    case = Case(2, 2, 3, 4, 5, 3, "hw" if with_bias else "")
    q, k, v, bh, bw = make_inputs(case, torch.float64, requires_grad=True, seed=9)
    args = (q, k, v, bh, bw, case.height, case.width, 0.5)
    torch.library.opcheck(op.attention_2d_fwd, args)
    out, lse = op.attention_2d_fwd(*args)
    grad_out = torch.randn_like(out)
    bwd_args = (grad_out, q, k, v, bh, bw, out.detach(), lse, case.height, case.width, 0.5)
    torch.library.opcheck(
        op.attention_2d_bwd,
        tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in bwd_args),
    )


def test_torch_compile_fullgraph():
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 24)

        def forward(self, x: torch.Tensor, bias_h: torch.Tensor) -> torch.Tensor:
            q, k, v = self.proj(x).chunk(3, dim=-1)
            return ak.attention_2d(q, k, v, bias_h, None, height=3, width=5, backend="cpu")

    model = Block().double()
    x = torch.randn(2, 4, 15, 8, dtype=torch.float64, requires_grad=True)
    bias_h = torch.randn(2, 4, 15, 3, dtype=torch.float64)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, bias_h)
    torch.testing.assert_close(out, model(x, bias_h))
    (grad,) = torch.autograd.grad(out.sum(), x)
    (ref_grad,) = torch.autograd.grad(model(x, bias_h).sum(), x)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_torch_compile_dynamic_shapes(backend: str):
    # math.isfinite on the scale and a symbolic head dim in the backend choice used to stop the
    # trace, and an `int` map size in the op's schema pinned every size to the first call's.
    check_compile_dynamic_shapes(backend)


def test_scaling_q_by_a_symbolic_head_dim_keeps_one_graph():
    # README's recipe: the schema's `scale` is a float, so scale=q.shape[-1] ** -0.5 would guard
    # on the head dim; scaling q before the call keeps it symbolic.
    torch._dynamo.reset()

    def attend(q, k, v):  # type: ignore[no-untyped-def]
        return ak.attention_2d(q * q.shape[-1] ** -0.5, k, v, height=3, width=5, backend="cpu")

    compiled = torch.compile(attend, dynamic=True, fullgraph=True, backend="aot_eager")
    for n, dkh in enumerate((6, 7, 9)):  # none equal to another size (duck sizing)
        case = Case(2, 3, 3, 5, dkh, 4)
        q, k, v, bias_h, bias_w = make_inputs(case, torch.float64, "cpu", seed=n)
        with torch.compiler.set_stance("fail_on_recompile" if n else "default"):
            got = compiled(q, k, v)
        expected = ak.attention_2d(q, k, v, height=3, width=5, scale=dkh**-0.5, backend="cpu")
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
