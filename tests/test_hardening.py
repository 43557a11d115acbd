"""Hardening of attention_2d on every CPU backend: numerical extremes, masks, NaN confinement,
memory layouts, threads and memory growth.

``tests/test_attention_cpu.py`` checks the ordinary contract of the C++ backend on awkward shapes;
this file tries to break every CPU backend with inputs at the edges of what the dtypes can hold.
"Exact" answers are the reference evaluated in float64 on the same (already rounded) inputs.
"""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
from torch import Tensor

import aanet_kernels as ak
from tests.attention_cases import (
    LARGE_LOGIT_MAGNITUDES,
    Case,
    attention_2d_gradients,
    check_fp32_gradients_at_large_logits,
    make_inputs,
)

BACKENDS = ak.available_backends("cpu")
# The fused kernels keep logits and softmax statistics in fp32 for fp16/bf16 inputs. The reference
# path is plain PyTorch in the input dtype (it is the "PyTorch's own error" of the 2x rule), so
# fp16 logits beyond 65504 overflow there, as they do in any fp16 PyTorch code (README, backends).
FUSED_BACKENDS = [b for b in BACKENDS if b != "reference"]
LOW_PRECISION = (torch.float16, torch.bfloat16)
INF = float("inf")


def run(backend: str, case: Case, inputs, scale: float = 1.0) -> Tensor:
    """``attention_2d`` of ``inputs`` with ``backend`` at the geometry of ``case``."""
    return ak.attention_2d(
        *inputs, height=case.height, width=case.width, scale=scale, backend=backend
    )


def exact(case: Case, inputs, scale: float = 1.0) -> Tensor:
    """The float64 reference on the same input values: the answer every dtype aims for."""
    wide = [None if t is None else t.detach().double() for t in inputs]
    return ak.attention_2d_reference(*wide, height=case.height, width=case.width, scale=scale)


def grads(backend: str, case: Case, inputs, grad_out: Tensor, scale: float = 1.0):
    """Output and the gradients of every present input (the inputs must require grad)."""
    out = run(backend, case, inputs, scale)
    present = [t for t in inputs if t is not None]
    return out, torch.autograd.grad(out, present, grad_out)


def max_error(actual: Tensor, expected: Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def assert_within_torch_error(out: Tensor, case: Case, inputs, scale: float, atol: float) -> None:
    """Finite, and within twice the error of PyTorch's own reference in the same dtype (+ atol)."""
    assert torch.isfinite(out).all(), "non-finite output where the exact answer is finite"
    truth = exact(case, inputs, scale)
    torch_own = ak.attention_2d_reference(
        *inputs, height=case.height, width=case.width, scale=scale
    )
    own = max_error(torch_own, truth) if torch.isfinite(torch_own).all() else INF
    bound = min(2 * own, 1.0) + atol
    assert max_error(out, truth) <= bound, (max_error(out, truth), own)


# --- huge and tiny values -------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("magnitude", [1e2, 1e3, 1e4])
def test_float32_biases_up_to_1e4_give_the_exact_answer(backend: str, magnitude: float):
    """Biases of +-1e4 make the softmax nearly one-hot: no exp overflow, no inf - inf."""
    case = Case(2, 2, 5, 6, 8, 4)
    q, k, v, bh, bw = make_inputs(case, torch.float32, seed=11)
    bh, bw = bh * magnitude, bw * magnitude
    # Logits of the same size from q . k as well.
    q = q * magnitude**0.5
    k = k * magnitude**0.5
    inputs = (q, k, v, bh, bw)
    out = run(backend, case, inputs)
    assert_within_torch_error(out, case, inputs, 1.0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_gradients_with_logits_of_1e4_are_finite_and_match(backend: str):
    case = Case(1, 2, 4, 5, 6, 3)
    inputs = make_inputs(case, torch.float64, seed=12, bias_scale=1e4, requires_grad=True)
    grad_out = torch.randn(case.batch, case.heads, case.length, case.dvh, dtype=torch.float64)
    low = [t.detach().float().requires_grad_() for t in inputs]
    out, got = grads(backend, case, low, grad_out.float())
    _, want = grads(
        "reference", case, [t.detach().double().requires_grad_() for t in low], grad_out
    )
    assert torch.isfinite(out).all()
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        # fp32 rounding of logits of 1e4 is ~1e-3 absolute; the gradients inherit that.
        assert max_error(g, w) <= 2e-2 * w.abs().max().clamp_min(1.0).item()


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("magnitude", LARGE_LOGIT_MAGNITUDES)
def test_float32_gradients_at_large_logits_add_nothing_to_torch_error(backend, magnitude):
    check_fp32_gradients_at_large_logits(attention_2d_gradients(backend), magnitude, seed=1)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_near_the_top_of_the_float16_range(backend: str, dtype: torch.dtype):
    """Each bias near 4e4 (their sum and q . k overflow float16) still gives a finite answer."""
    case = Case(1, 2, 4, 4, 16, 4)
    q, k, v, bh, bw = make_inputs(case, torch.float64, seed=13)
    # q . k reaches ~16 * 200 * 200 = 6.4e5 and bias_h + bias_w ~8e4: both beyond float16's 65504.
    q, k = q.clamp(-1, 1) * 200, k.clamp(-1, 1) * 200
    bh = bh.clamp(-1, 1) * 4e4
    bw = bw.clamp(-1, 1) * 4e4
    inputs = tuple(t.to(dtype) for t in (q, k, v, bh, bw))
    out = run(backend, case, inputs, scale=1.0)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    truth = exact(case, inputs)
    # Logits of ~1e5 rounded to float32 (ulp 2^-7) leave the softmax a little off one-hot.
    assert max_error(out, truth) <= 0.05 * truth.abs().max().item() + 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e-30, 1e-8, 0.0, 1e4, 1e8])
def test_huge_and_tiny_scale(backend: str, scale: float):
    """scale -> 0 is a plain average of v (plus biases), scale -> inf an argmax; both finite."""
    case = Case(2, 1, 3, 5, 4, 3)
    inputs = make_inputs(case, torch.float64, seed=14, requires_grad=True)
    grad_out = torch.randn(case.batch, case.heads, case.length, case.dvh, dtype=torch.float64)
    out, got = grads(backend, case, inputs, grad_out, scale)
    ref, want = grads("reference", case, inputs, grad_out, scale)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6 * max(1.0, scale))


# --- -inf masks -------------------------------------------------------------------------------


def masked_inputs(case: Case, dtype: torch.dtype, seed: int, requires_grad: bool = True):
    """Random inputs with ~30% of bias entries -inf, a query with every key masked through
    bias_h, and another through bias_w."""
    q, k, v, bh, bw = make_inputs(case, torch.float64, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    bh = bh.masked_fill(torch.rand(bh.shape, generator=gen) < 0.3, -INF)
    bw = bw.masked_fill(torch.rand(bw.shape, generator=gen) < 0.3, -INF)
    bh[0, 0, min(1, case.length - 1)] = -INF  # query 1 of (0, 0) sees no key row
    bw[-1, -1, case.length - 1] = -INF  # the last query of the last (b, h) sees no key column
    tensors = [t.to(dtype).requires_grad_(requires_grad) for t in (q, k, v, bh, bw)]
    return tensors


def all_masked(case: Case) -> Tensor:
    """Boolean (B, Nh, L): True where a query has every key masked in ``masked_inputs``."""
    rows = torch.zeros(case.batch, case.heads, case.length, dtype=torch.bool)
    rows[0, 0, min(1, case.length - 1)] = True
    rows[-1, -1, case.length - 1] = True
    return rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("case", [Case(2, 2, 3, 4, 5, 3), Case(1, 1, 1, 1, 2, 2)], ids=str)
def test_minus_inf_masks_and_fully_masked_rows(backend: str, dtype: torch.dtype, case: Case):
    """Contract: masked keys get weight 0; a query with all keys masked outputs zeros and passes
    zero gradient to everything."""
    inputs = masked_inputs(case, dtype, seed=21)
    rows = all_masked(case)
    grad_out = torch.randn(case.batch, case.heads, case.length, case.dvh, dtype=torch.float64)
    out, got = grads(backend, case, inputs, grad_out.to(dtype))
    assert torch.isfinite(out).all()
    assert torch.equal(out[rows], torch.zeros_like(out[rows]))
    truth = exact(case, inputs)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 3e-2)
    assert max_error(out, truth) <= tol * truth.abs().max().clamp_min(1.0).item()
    wide = [t.detach().double().requires_grad_() for t in inputs]
    _, want = grads("reference", case, wide, grad_out)
    q_grad, bh_grad, bw_grad = got[0], got[3], got[4]
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        assert max_error(g, w) <= 10 * tol * w.abs().max().clamp_min(1.0).item()
    for g in (q_grad, bh_grad, bw_grad):
        assert torch.equal(g[rows], torch.zeros_like(g[rows]))
    # Masked entries receive no gradient.
    for bias, g in ((inputs[3], bh_grad), (inputs[4], bw_grad)):
        assert torch.equal(g[bias.isneginf()], torch.zeros_like(g[bias.isneginf()]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_query_fully_masked(backend: str):
    case = Case(2, 1, 2, 3, 4, 2)
    q, k, v, bh, bw = make_inputs(case, torch.float32, seed=22, requires_grad=True)
    mask = torch.full_like(bh, -INF).requires_grad_()
    out = run(backend, case, (q, k, v, mask, bw))
    assert torch.equal(out, torch.zeros_like(out))
    for g in torch.autograd.grad(out.sum(), (q, k, v, mask, bw)):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", BACKENDS)
def test_plus_inf_bias_is_not_a_silently_finite_answer(backend: str):
    """+inf logits have no finite softmax: the row must be NaN, never a made-up number."""
    case = Case(1, 1, 2, 2, 3, 2)
    q, k, v, bh, bw = make_inputs(case, torch.float32, seed=23)
    bh[0, 0, 2, 1] = INF
    out = run(backend, case, (q, k, v, bh, bw))
    assert torch.isnan(out[0, 0, 2]).all()
    assert torch.isfinite(out[0, 0, [0, 1, 3]]).all()


# --- NaN confinement ----------------------------------------------------------------------------


NAN_SITES = {
    # name: (input index, index into it, which outputs of slice (0, 1) it must make NaN)
    "q": (0, (0, 1, 5, 2), "row"),
    "bias_h": (3, (0, 1, 5, 1), "row"),
    "bias_w": (4, (0, 1, 5, 3), "row"),
    "k": (1, (0, 1, 7, 0), "slice"),
    "v": (2, (0, 1, 7, 1), "column"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("site", list(NAN_SITES))
def test_nan_is_confined_to_its_row_in_forward_and_backward(backend: str, site: str):
    """NaN in q or a bias poisons that query's output row; in k, that (batch, head) slice; in v,
    that slice's output channel.
    Nothing else changes: other outputs, and every gradient of the other batch elements, equal
    the answer computed without the NaN."""
    case = Case(2, 2, 3, 4, 5, 3)
    clean = make_inputs(case, torch.float32, seed=31)
    index, where, reach = NAN_SITES[site]
    dirty = [t.clone() for t in clean]
    dirty[index][where] = float("nan")
    dirty = [t.requires_grad_() for t in dirty]
    clean = [t.requires_grad_() for t in clean]
    grad_out = torch.randn(case.batch, case.heads, case.length, case.dvh)
    out, got = grads(backend, case, dirty, grad_out)
    ref, want = grads(backend, case, clean, grad_out)

    poisoned = torch.zeros_like(out, dtype=torch.bool)
    if reach == "row":
        poisoned[0, 1, 5] = True
    elif reach == "column":  # v's channel 1 feeds only output channel 1
        poisoned[0, 1, :, 1] = True
    else:
        poisoned[0, 1] = True
    assert torch.isnan(out[poisoned]).all()
    torch.testing.assert_close(out[~poisoned], ref[~poisoned], rtol=0, atol=0)
    for g, w in zip(got, want, strict=True):
        # Batch element 1 shares no computation with the NaN: its gradients are untouched.
        torch.testing.assert_close(g[1], w[1], rtol=0, atol=0)
        # So is the other head of batch element 0.
        torch.testing.assert_close(g[0, 0], w[0, 0], rtol=0, atol=0)


# --- layouts ------------------------------------------------------------------------------------


def layouts(case: Case, seed: int) -> dict[str, tuple[Tensor, ...]]:
    """The same values as non-contiguous tensors of several kinds, keyed by kind."""
    q, k, v, bh, bw = make_inputs(case, torch.float64, seed=seed)
    b, n, length = case.batch, case.heads, case.length

    def transposed(t: Tensor) -> Tensor:
        # Stored (d, L, Nh, B): every stride differs from contiguous.
        view = t.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
        assert not view.is_contiguous()
        return view

    def sliced(t: Tensor) -> Tensor:
        # Every other element of a twice-as-long last dim, and a window of a longer L.
        big = torch.randn(t.shape[0], t.shape[1], t.shape[2] + 3, 2 * t.shape[3], dtype=t.dtype)
        big[:, :, 1 : 1 + t.shape[2], ::2] = t
        return big[:, :, 1 : 1 + t.shape[2], ::2]

    # Heads split out of a (B, L, Nh * d) projection, as a linear layer produces them.
    def heads_last(t: Tensor) -> Tensor:
        flat = t.permute(0, 2, 1, 3).reshape(b, length, n * t.shape[3])
        return flat.view(b, length, n, t.shape[3]).permute(0, 2, 1, 3)

    # k, v and the biases shared by every head and batch element: stride 0 over B and Nh.
    shared = [t[:1, :1].expand(b, n, -1, -1) for t in (k, v, bh, bw)]
    return {
        "contiguous": (q, k, v, bh, bw),
        "transposed": tuple(transposed(t) for t in (q, k, v, bh, bw)),
        "sliced": tuple(sliced(t) for t in (q, k, v, bh, bw)),
        "heads_last": tuple(heads_last(t) for t in (q, k, v)) + (bh, bw),
        "stride0": (q, *shared),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["transposed", "sliced", "heads_last", "stride0"])
def test_non_contiguous_inputs_equal_contiguous_copies(backend: str, kind: str):
    case = Case(2, 3, 3, 5, 4, 3)
    inputs = layouts(case, seed=41)[kind]
    assert not all(t.is_contiguous() for t in inputs)
    copies = [t.contiguous() for t in inputs]
    # Leaves that keep their strides (stride 0 included): gradients come back in their shapes.
    leaves = [t.detach().requires_grad_() for t in inputs]
    grad_out = torch.randn(case.batch, case.heads, case.length, case.dvh, dtype=torch.float64)
    out, got = grads(backend, case, leaves, grad_out)
    copy_leaves = [t.detach().requires_grad_() for t in copies]
    ref, want = grads(backend, case, copy_leaves, grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


# --- autocast -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_autocast_casts_the_inputs_on_every_backend(dtype: torch.dtype):
    """Under autocast the op runs in the autocast dtype whichever backend runs it, as
    ``F.scaled_dot_product_attention`` does, and takes fp32 and low-precision inputs mixed; fp64
    is left alone. Until 2026-12-02 the fused backends ran fp32 inputs in fp32 and returned fp32
    where the reference (its matmuls autocast) returned ``dtype``, and mixed inputs were refused."""
    case = Case(2, 2, 3, 5, 8, 4)
    inputs = make_inputs(case, torch.float32, requires_grad=True)
    q, k, v, bias_h, bias_w = inputs
    mixed = (q.detach().to(dtype), k, v.detach().to(dtype), bias_h, bias_w)
    rounded = exact(case, [t.detach().to(dtype) for t in inputs])
    outputs = {}
    for backend in BACKENDS:
        with torch.autocast("cpu", dtype=dtype):
            out = run(backend, case, inputs)
            assert run(backend, case, mixed).dtype == dtype, backend
            assert run(backend, case, [t.detach().double() for t in inputs]).dtype == torch.float64
        assert out.dtype == dtype, backend
        found = torch.autograd.grad(out.float().square().sum(), inputs)
        assert all(g.dtype == torch.float32 and g.isfinite().all() for g in found), backend
        outputs[backend] = out
    reference_error = max_error(outputs["reference"], rounded)
    for backend, out in outputs.items():
        assert max_error(out, rounded) <= 2 * reference_error + 1e-3, backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_readme_example_runs_under_autocast(backend: str):
    """The op's README example in an autocast block: ``relative_logits`` of fp32 queries gives
    bf16 tables there (its einsum is autocast), which until 2026-12-02 ``attention_2d`` refused
    beside the fp32 queries ("bias_h: expected dtype torch.float32"), on every backend."""
    batch, heads, height, width, dkh, dvh = 2, 2, 4, 5, 8, 4
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).requires_grad_()

    q, k = leaf(batch, heads, height * width, dkh), leaf(batch, heads, height * width, dkh)
    v = leaf(batch, heads, height * width, dvh)
    rel_h, rel_w = leaf(2 * height - 1, dkh), leaf(2 * width - 1, dkh)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scaled = q * dkh**-0.5
        bias_h, bias_w = ak.relative_logits(scaled, rel_h, rel_w, height, width)
        out = ak.attention_2d(
            scaled, k, v, bias_h, bias_w, height=height, width=width, backend=backend
        )
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(t.grad.dtype == torch.float32 for t in (q, k, v, rel_h, rel_w))
    with torch.no_grad():
        bias_h, bias_w = ak.relative_logits(q * dkh**-0.5, rel_h, rel_w, height, width)
        wide = [t.double() for t in (q * dkh**-0.5, k, v, bias_h, bias_w)]
        truth = ak.attention_2d_reference(*wide, height=height, width=width)
    assert max_error(out, truth) < 0.05


@pytest.mark.parametrize("backend", BACKENDS)
def test_modifying_the_output_in_place_is_refused_not_silently_wrong(backend: str):
    """The fused backwards read the saved output (``delta = rowsum(dO * O)``): an in-place change
    of it must make autograd refuse, never give gradients of the changed values (README, the op).
    The reference path keeps no output, so there it is allowed and right."""
    case = Case(1, 2, 3, 4, 4, 3)
    inputs = make_inputs(case, torch.float64, requires_grad=True)
    out = run(backend, case, inputs)
    out.mul_(2)
    if backend == "reference":
        found = torch.autograd.grad(out.sum(), inputs)
        expected = torch.autograd.grad(2 * run(backend, case, inputs).sum(), inputs)
        for g, e in zip(found, expected, strict=True):
            torch.testing.assert_close(g, e)
    else:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


@pytest.mark.skipif(not FUSED_BACKENDS, reason="the C++ extension is not built")
def test_differentiating_the_raw_backward_op_is_refused_not_zero():
    """Until 2026-12-06 the outputs of a direct ``attention_2d_bwd`` call went through PyTorch's
    autograd fallback, and their gradients were zeros (with only a warning). Second derivatives
    through the forward op are unaffected (the reference path recomputes them)."""
    case = Case(1, 2, 3, 4, 4, 3)
    inputs = make_inputs(case, torch.float64, requires_grad=True)
    out, lse = torch.ops.aanet_kernels.attention_2d_fwd(*inputs, 3, 4, 1.0)
    grad_out = torch.randn_like(out)
    dq, *_ = torch.ops.aanet_kernels.attention_2d_bwd(grad_out, *inputs, out, lse, 3, 4, 1.0)
    with pytest.raises(RuntimeError, match="attention_2d_bwd: the raw backward op is not diff"):
        torch.autograd.grad(dq.sum(), inputs[0])
    (dq_fwd,) = torch.autograd.grad(out, inputs[0], grad_out, create_graph=True)
    (second,) = torch.autograd.grad(dq_fwd.sum(), inputs[0])
    assert torch.equal(dq.detach(), dq_fwd.detach()) and second.abs().max() > 0
    with torch.no_grad():  # without grad nothing changes
        torch.ops.aanet_kernels.attention_2d_bwd(grad_out, *inputs, out, lse, 3, 4, 1.0)


# --- threads and memory -------------------------------------------------------------------------


def test_cpu_op_from_four_threads_at_once():
    """Four Python threads running forward + backward on different inputs at the same time each
    get their own right answer (the op keeps no shared mutable state)."""
    if "cpu" not in BACKENDS:
        pytest.skip("the C++ extension is not built")
    cases = [
        Case(2, 2, 5, 6, 8, 4),
        Case(1, 3, 7, 4, 3, 5),
        Case(2, 1, 6, 6, 16, 2),
        Case(1, 2, 9, 3, 4, 4),
    ]
    jobs = []
    for i, case in enumerate(cases):
        inputs = make_inputs(case, torch.float64, seed=50 + i, requires_grad=True)
        grad_out = torch.randn(case.batch, case.heads, case.length, case.dvh, dtype=torch.float64)
        jobs.append((case, inputs, grad_out, grads("reference", case, inputs, grad_out)))
    start = threading.Barrier(len(jobs))
    failures: list[str] = []

    def work(case, inputs, grad_out, expected) -> None:
        start.wait()
        try:
            for _ in range(20):
                out, got = grads("cpu", case, inputs, grad_out)
                for a, e in zip((out, *got), (expected[0], *expected[1]), strict=True):
                    torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)
        except Exception as error:  # collected and reported from the main thread
            failures.append(f"{case}: {error}")

    threads = [threading.Thread(target=work, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not failures, failures


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(
    not __import__("os").path.exists("/proc/self/statm"), reason="needs Linux /proc"
)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"] or ["reference"])
def test_repeated_forward_backward_does_not_grow_memory(backend: str):
    """300 forward+backward steps after a warm-up leave RSS within 24 MB, where a leak of the
    step's tensors (~0.33 MB a step) would add ~100 MB; and nothing outlives its step."""
    case = Case(2, 2, 12, 12, 32, 32)
    inputs = make_inputs(case, torch.float32, seed=60, requires_grad=True)
    grad_out = torch.randn(case.batch, case.heads, case.length, case.dvh)

    def step() -> weakref.ref:
        out, got = grads(backend, case, inputs, grad_out)
        return weakref.ref(out)

    for _ in range(30):
        step()
    gc.collect()
    before = rss_bytes()
    for _ in range(300):
        alive = step()
        assert alive() is None, "the output outlived its step (a reference cycle or a leak)"
    gc.collect()
    grown = rss_bytes() - before
    assert grown < 24 * 2**20, f"RSS grew by {grown / 2**20:.1f} MB over 300 steps"


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_forward_and_backward(backend: str):
    case = Case(0, 2, 3, 3, 4, 2)
    inputs = make_inputs(case, torch.float32, requires_grad=True)
    out = run(backend, case, inputs)
    assert out.shape == (0, 2, 9, 2)
    for g, t in zip(torch.autograd.grad(out.sum(), inputs), inputs, strict=True):
        assert g.shape == t.shape
