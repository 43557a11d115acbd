"""The Triton backend of attention_2d against the reference path, run by the Triton interpreter.

float64, float32 and float16 run here. bfloat16 does not: the interpreter's ``tl.dot`` on bf16
operands returns garbage (checked with triton 3.8), so bf16 is covered by tests/test_triton_gpu.py.
``torch.compile`` and ``opcheck`` are GPU-only too: under the interpreter ``wrap_triton`` hands back
the raw kernel, so fake-tensor tracing would run it on fake tensors.
"""

import re

import pytest
import torch

import aanet_kernels as ak
from aanet_kernels import limits, ops
from aanet_kernels._extension import extension_loaded
from aanet_kernels.reference import attention_2d_reference_lse
from tests.attention_cases import (
    AWKWARD_CASES,
    LARGE_LOGIT_MAGNITUDES,
    Case,
    attention_2d_gradients,
    check_fp32_gradients_at_large_logits,
    make_inputs,
)
from tests.triton_configs import every_config, pinned_config

OPS = torch.ops.aanet_kernels
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5}


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().clamp_min(1.0)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def _kwargs(case: Case, scale: float) -> dict:
    return dict(height=case.height, width=case.width, scale=scale)


def _out_and_grads(fn, inputs, grad_out):
    out = fn(*inputs)
    present = [t for t in inputs if t is not None]
    return out, torch.autograd.grad(out, present, grad_out)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", AWKWARD_CASES, ids=str)
def test_forward_and_lse_match_reference(case: Case, dtype: torch.dtype, poisoned_allocations):
    q, k, v, bh, bw = make_inputs(case, dtype, seed=11)
    scale = case.dkh**-0.5
    out, lse = OPS.attention_2d_triton_fwd(q, k, v, bh, bw, case.height, case.width, scale)
    ref = ak.attention_2d_reference(q, k, v, bh, bw, **_kwargs(case, scale))
    ref_lse = attention_2d_reference_lse(q, k, bh, bw, **_kwargs(case, scale))
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.dtype == ops.lse_dtype(dtype)
    assert _relative_error(out, ref) < TOLERANCE[dtype]
    assert _relative_error(lse, ref_lse) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", AWKWARD_CASES, ids=str)
def test_gradients_match_reference(case: Case, dtype: torch.dtype, poisoned_allocations):
    inputs = make_inputs(case, dtype, requires_grad=True, seed=12)
    kwargs = _kwargs(case, 0.7)
    grad_out = torch.randn(case.batch, case.heads, case.length, case.dvh, dtype=dtype)
    out, grads = _out_and_grads(
        lambda *t: ak.attention_2d(*t, **kwargs, backend="triton"), inputs, grad_out
    )
    ref, ref_grads = _out_and_grads(
        lambda *t: ak.attention_2d_reference(*t, **kwargs), inputs, grad_out
    )
    assert _relative_error(out, ref) < TOLERANCE[dtype]
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert grad.shape == ref_grad.shape and grad.dtype == dtype
        assert _relative_error(grad, ref_grad) < TOLERANCE[dtype] * 10


@pytest.mark.parametrize("magnitude", LARGE_LOGIT_MAGNITUDES)
def test_float32_gradients_at_large_logits_add_nothing_to_torch_error(magnitude):
    check_fp32_gradients_at_large_logits(attention_2d_gradients("triton"), magnitude, seed=1)


@pytest.mark.parametrize("case", [AWKWARD_CASES[1], AWKWARD_CASES[5]], ids=str)
def test_float16_error_at_most_twice_torch_own(case: Case, poisoned_allocations):
    """Forward and all gradients against the fp64 reference: kernel error <= 2x the error of the
    reference path computed in fp16, plus a small floor."""
    inputs = make_inputs(case, torch.float16, requires_grad=True, seed=13)
    exact_inputs = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    kwargs = _kwargs(case, case.dkh**-0.5)
    grad_out = torch.randn(case.batch, case.heads, case.length, case.dvh, dtype=torch.float64)
    exact = _out_and_grads(
        lambda *t: ak.attention_2d_reference(*t, **kwargs), exact_inputs, grad_out
    )
    own = _out_and_grads(
        lambda *t: ak.attention_2d_reference(*t, **kwargs), inputs, grad_out.half()
    )
    ours = _out_and_grads(
        lambda *t: ak.attention_2d(*t, **kwargs, backend="triton"), inputs, grad_out.half()
    )
    for mine, torch_own, truth in zip(
        [ours[0], *ours[1]], [own[0], *own[1]], [exact[0], *exact[1]], strict=True
    ):
        assert mine.dtype == torch.float16
        own_error = (torch_own.double() - truth).abs().max().item()
        assert (mine.double() - truth).abs().max().item() <= 2 * own_error + 1e-3


@pytest.mark.parametrize("case", [Case(1, 2, 2, 3, 3, 2), Case(2, 1, 3, 2, 2, 3, "w")], ids=str)
def test_gradcheck_float64(case: Case):
    inputs = make_inputs(case, torch.float64, requires_grad=True, seed=14)
    present = tuple(t for t in inputs if t is not None)

    def fn(*tensors):
        it = iter(tensors)
        args = [next(it) if t is not None else None for t in inputs]
        return ak.attention_2d(*args, **_kwargs(case, 0.8), backend="triton")

    assert torch.autograd.gradcheck(fn, present)


def test_double_backward_gradgradcheck():
    """backward(create_graph=True) on the Triton op: the shared autograd recomputes differentiable
    gradients through the reference path."""
    case = Case(1, 1, 2, 2, 2, 2)
    inputs = make_inputs(case, torch.float64, requires_grad=True, seed=15)
    assert torch.autograd.gradgradcheck(
        lambda *t: ak.attention_2d(*t, **_kwargs(case, 0.8), backend="triton"), inputs
    )


def test_broadcast_bias_and_strided_views(poisoned_allocations):
    """Heads split from a (B, C, L) projection (strided head dim), a transposed grad_out, and
    biases broadcast over batch (size 1) and over heads (stride 0)."""
    case = Case(2, 3, 4, 5, 6, 4)
    _, k, v, _, _ = make_inputs(case, torch.float64, seed=15)
    proj = torch.randn(case.batch, case.heads * case.dkh, case.length, dtype=torch.float64)
    q = proj.view(case.batch, case.heads, case.dkh, case.length).transpose(-1, -2)
    assert not q.is_contiguous()
    bias_h = torch.randn(1, case.heads, case.length, case.height, dtype=torch.float64)
    bias_w = torch.randn(case.batch, 1, case.length, case.width, dtype=torch.float64)
    bias_w = bias_w.expand(-1, case.heads, -1, -1).detach()  # stride 0 over heads
    inputs = [t.requires_grad_() for t in (q.detach(), k, v, bias_h, bias_w)]
    grad_out = torch.randn(case.batch, case.heads, case.dvh, case.length, dtype=torch.float64)
    grad_out = grad_out.transpose(-1, -2)
    kwargs = _kwargs(case, 0.4)
    out, grads = _out_and_grads(
        lambda *t: ak.attention_2d(*t, **kwargs, backend="triton"), inputs, grad_out
    )
    ref, ref_grads = _out_and_grads(
        lambda *t: ak.attention_2d_reference(*t, **kwargs), inputs, grad_out
    )
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert grad.shape == ref_grad.shape
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_stride_zero_bias_gradient_is_summed_over_broadcast_dims():
    case = Case(2, 3, 3, 4, 4, 2)
    q, k, v, _, _ = make_inputs(case, torch.float64, seed=16)
    base = torch.randn(case.batch, 1, case.length, case.width, dtype=torch.float64)
    bias_w = base.expand(-1, case.heads, -1, -1).detach().requires_grad_()  # stride 0 on heads
    bias_h = torch.randn(1, 1, case.length, case.height, dtype=torch.float64, requires_grad=True)
    kwargs = _kwargs(case, 0.6)
    out = ak.attention_2d(q, k, v, bias_h, bias_w, **kwargs, backend="triton")
    ref = ak.attention_2d_reference(q, k, v, bias_h, bias_w, **kwargs)
    grads = torch.autograd.grad(out.sum(), (bias_h, bias_w))
    ref_grads = torch.autograd.grad(ref.sum(), (bias_h, bias_w))
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert grad.shape == ref_grad.shape
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


# numpy warns (an error here) if a kernel takes log(0) or divides by 0 on the masked row.
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_fully_masked_row_gives_zeros_lse_minus_inf_and_zero_gradients():
    case = Case(1, 2, 3, 7, 5, 3)
    q, k, v, bh, bw = make_inputs(case, torch.float64, seed=17)
    mask = torch.zeros_like(bh)
    mask[0, 1, 19] = float("-inf")  # query 19 of head 1 sees no key (a query in the last tile)
    inputs = [t.requires_grad_() for t in (q, k, v, bh + mask, bw)]
    kwargs = _kwargs(case, 0.5)
    out, lse = OPS.attention_2d_triton_fwd(*inputs, case.height, case.width, 0.5)
    assert lse[0, 1, 19].item() == float("-inf")
    assert torch.equal(out[0, 1, 19], torch.zeros(case.dvh, dtype=torch.float64))
    ref = ak.attention_2d_reference(*inputs, **kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(out.sum(), inputs)
    ref_grads = torch.autograd.grad(ref.sum(), inputs)
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][0, 1, 19], torch.zeros(case.dkh, dtype=torch.float64))
    assert torch.equal(grads[3][0, 1, 19], torch.zeros(case.height, dtype=torch.float64))
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_backward_is_bit_identical_run_to_run():
    case = AWKWARD_CASES[7]
    inputs = make_inputs(case, torch.float32, requires_grad=True, seed=18)
    grad_out = torch.randn(case.batch, case.heads, case.length, case.dvh)
    fn = lambda *t: ak.attention_2d(*t, **_kwargs(case, 0.3), backend="triton")  # noqa: E731
    first = _out_and_grads(fn, inputs, grad_out)[1]
    second = _out_and_grads(fn, inputs, grad_out)[1]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_outputs_follow_the_fake_semantics():
    """Shapes and dtypes the kernels return are those of ``ops.fake_attention_2d_fwd/bwd``, with
    0-element bias gradients for absent biases (triton_op derives its fakes from the same code)."""
    case = Case(2, 1, 3, 4, 5, 2, "h")
    q, k, v, bh, bw = make_inputs(case, torch.float32, seed=19)
    args = (q, k, v, bh, bw, case.height, case.width, 0.5)
    real = OPS.attention_2d_triton_fwd(*args)
    fake = ops.fake_attention_2d_fwd(*args)
    bwd_args = (torch.randn_like(real[0]), q, k, v, bh, bw, *real, case.height, case.width, 0.5)
    real_bwd = OPS.attention_2d_triton_bwd(*bwd_args)
    fake_bwd = ops.fake_attention_2d_bwd(*bwd_args)
    for ours, theirs in zip([*real, *real_bwd], [*fake, *fake_bwd], strict=True):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert real_bwd[4].numel() == 0


@pytest.mark.skipif(not extension_loaded(), reason="the C++ extension (op schemas) is not built")
def _signature(schema: object) -> str:
    """Arguments and return types of an op schema, without the name, return names, or the
    difference between ``int`` and ``SymInt``: torch 2.11 ignores ``triton_op``'s ``schema=`` and
    infers one from the Python signature (``SymInt``, unnamed returns); later versions use it."""
    arguments, returns = str(schema).split("(", 1)[1].split(") -> ")
    return arguments.replace("SymInt", "int") + " -> " + re.sub(r"Tensor \w+", "Tensor", returns)


def test_schemas_match_the_cpp_ops():
    for suffix in ("fwd", "bwd"):
        ours = _signature(getattr(OPS, f"attention_2d_triton_{suffix}").default._schema)
        theirs = _signature(getattr(OPS, f"attention_2d_{suffix}").default._schema)
        assert ours == theirs


def test_empty_batch():
    case = Case(0, 2, 3, 3, 4, 2)
    inputs = make_inputs(case, torch.float32, requires_grad=True)
    out = ak.attention_2d(*inputs, height=3, width=3, backend="triton")
    assert out.shape == (0, 2, 9, 2)
    out.sum().backward()
    assert inputs[0].grad.shape == inputs[0].shape


def test_bfloat16_is_refused_under_the_interpreter_not_computed_wrong():
    case = Case(1, 1, 3, 5, 4, 3)
    inputs = make_inputs(case, torch.bfloat16)
    with pytest.raises(TypeError, match="q: bfloat16 does not run under TRITON_INTERPRET=1"):
        ak.attention_2d(*inputs, height=3, width=5, backend="triton")


def test_head_dim_past_the_limit_names_the_argument():
    case = Case(1, 1, 2, 2, limits.MAX_HEAD_DIM["triton"] + 1, 2)
    q, k, v, bh, bw = make_inputs(case, torch.float32)
    with pytest.raises(ValueError, match="q: the triton backend takes head dims up to"):
        ak.attention_2d(q, k, v, bh, bw, height=2, width=2, backend="triton")


@pytest.mark.parametrize(("batch", "heads"), [(limits.MAX_GRID_YZ + 1, 1), (1, 65536)])
def test_batch_or_heads_past_the_grid_limit_names_the_argument(batch, heads):
    """Heads and batch are grid axes 1 and 2, which CUDA caps at 65535 (the interpreter would
    run anything, so the check is the host's)."""
    q = torch.randn(batch, heads, 1, 1)
    with pytest.raises(ValueError, match="q: the triton backend launches one grid layer"):
        ak.attention_2d(q, q, q, None, None, height=1, width=1, backend="triton")


# A (batch, head) slice whose rows lie 2^28 + 64 elements apart: from row 8 on, offsets pass 2^31.
# The buffer is reserved, not touched: only the few rows read become resident (~1 MB).
_WIDE_ROW_STRIDE = 2**28 + 64


def _rows_far_apart(buffer: torch.Tensor, length: int, size: int, offset: int) -> torch.Tensor:
    view = buffer.as_strided((1, 1, length, size), (0, 0, _WIDE_ROW_STRIDE, 1), offset)
    return view.copy_(torch.randn(view.shape).to(buffer.dtype))


def test_bias_tables_whose_slice_passes_2_31_elements():
    """Offsets into a bias table are int64 within a slice too (a square map above ~1291 x 1291
    has L * H > 2^31): until 2026-12-01 they were int32 and this read wrapped around (a crash)."""
    height = width = 3
    length = height * width
    buffer = torch.empty(length * _WIDE_ROW_STRIDE, dtype=torch.float16)
    bias_h = _rows_far_apart(buffer, length, height, 0).requires_grad_()
    bias_w = _rows_far_apart(buffer, length, width, height).requires_grad_()
    q, k, v = (torch.randn(1, 1, length, 4).half().requires_grad_() for _ in range(3))
    inputs = (q, k, v, bias_h, bias_w)
    grad_out = torch.randn(1, 1, length, 4).half()
    got = _out_and_grads(
        lambda *t: ak.attention_2d(*t, height=height, width=width, backend="triton"),
        inputs,
        grad_out,
    )
    wide = [t.detach().double().requires_grad_() for t in inputs]
    want = _out_and_grads(
        lambda *t: ak.attention_2d_reference(*t, height=height, width=width),
        wide,
        grad_out.double(),
    )
    for g, w in zip([got[0], *got[1]], [want[0], *want[1]], strict=True):
        assert _relative_error(g, w) < 1e-2


def test_a_query_slice_past_2_31_elements_is_refused_naming_it():
    """q, k, v index within a slice in int32 (L * d elements; a strided view can reach further)."""
    buffer = torch.empty(9 * _WIDE_ROW_STRIDE, dtype=torch.float16)
    q = _rows_far_apart(buffer, 9, 4, 0)
    k = torch.randn(1, 1, 9, 4).half()
    with pytest.raises(ValueError, match=r"q: one \(batch, head\) slice .* 32-bit offsets"):
        ak.attention_2d(q, k, k, None, None, height=3, width=3, backend="triton")


def test_backward_refuses_an_out_slice_past_2_31_elements_naming_it():
    """The backward's preprocess reads ``out`` through its strides in int32 too: a strided ``out``
    handed to the op directly was not checked (only q, k, v and grad_out were)."""
    buffer = torch.empty(9 * _WIDE_ROW_STRIDE, dtype=torch.float16)
    out = _rows_far_apart(buffer, 9, 4, 0)
    q = torch.randn(1, 1, 9, 4).half()
    lse = torch.zeros(1, 1, 9)
    from aanet_kernels._triton.op import attention_2d_triton_bwd

    with pytest.raises(ValueError, match=r"out: one \(batch, head\) slice .* 32-bit offsets"):
        attention_2d_triton_bwd(q, q, q, q, None, None, out, lse, 3, 3, 1.0)


def test_auto_passes_such_a_slice_to_the_next_backend(monkeypatch: pytest.MonkeyPatch):
    """With triton first in auto's order (as on a GPU), auto steps past its size refusal."""
    from aanet_kernels import backends

    monkeypatch.setitem(backends._AUTO_ORDER, "cpu", ("triton", "reference"))
    buffer = torch.empty(9 * _WIDE_ROW_STRIDE, dtype=torch.float16)
    q = _rows_far_apart(buffer, 9, 4, 0)
    k = torch.randn(1, 1, 9, 4).half()
    assert backends.resolve_backend_for_call("auto", k, k, k) == "triton"
    assert backends.resolve_backend_for_call("auto", q, k, k) == "reference"
    got = ak.attention_2d(q, k, k, None, None, height=3, width=3)
    want = ak.attention_2d_reference(q.contiguous(), k, k, None, None, height=3, width=3)
    torch.testing.assert_close(got, want)


def _assert_matches_reference(case: Case, seed: int) -> None:
    """The triton backend's forward and gradients on ``case`` against the reference, fp64."""
    inputs = make_inputs(case, torch.float64, requires_grad=True, seed=seed)
    kwargs = _kwargs(case, 0.6)
    grad_out = torch.randn(case.batch, case.heads, case.length, case.dvh, dtype=torch.float64)
    out, grads = _out_and_grads(
        lambda *t: ak.attention_2d(*t, **kwargs, backend="triton"), inputs, grad_out
    )
    ref, ref_grads = _out_and_grads(
        lambda *t: ak.attention_2d_reference(*t, **kwargs), inputs, grad_out
    )
    assert _relative_error(out, ref) < TOLERANCE[torch.float64]
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert _relative_error(grad, ref_grad) < TOLERANCE[torch.float64] * 10


@pytest.mark.parametrize("config", every_config(), ids=str)
def test_every_gpu_config_is_correct(config, poisoned_allocations):
    """Each GPU autotuning configuration (block sizes up to 128 queries, past L here), pinned in
    turn: forward and gradients against the reference. Warps and stages mean nothing here."""
    with pinned_config(*config):
        # 21 wide: two row chunks of the interpreter's 16-wide tiles
        _assert_matches_reference(Case(1, 2, 5, 21, 8, 4), seed=19)


# Maps whose key tiles differ on a GPU: rows of 17-64 keys are one tile of 32 or 64 there (two or
# more of the interpreter's 16), 100-wide rows two 64-key chunks, and 70 x 5 is walked by columns.
GPU_KEY_BLOCK_CASES = [Case(1, 2, 3, 17, 8, 4), Case(1, 2, 2, 33, 33, 20), Case(1, 1, 2, 100, 8, 4)]
GPU_KEY_BLOCK_CASES += [Case(1, 1, 70, 5, 17, 9, "h"), Case(2, 1, 5, 64, 16, 65, "w")]


@pytest.mark.parametrize("case", GPU_KEY_BLOCK_CASES, ids=str)
def test_gpu_key_block_is_correct(case: Case, monkeypatch, poisoned_allocations):
    """The key tiles a GPU uses (``BLOCK_N`` up to ``MAX_KEY_BLOCK`` = 64, which the interpreter
    caps at 16), and the row/column walk chosen for them: forward and all gradients."""
    from aanet_kernels._triton import autotune

    monkeypatch.setattr(autotune, "INTERPRETED_KEY_BLOCK", autotune.MAX_KEY_BLOCK)
    _assert_matches_reference(case, seed=20)
