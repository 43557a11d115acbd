"""The Triton backend of attention_2d (aanet_kernels/_triton) on a GPU, against the fp64 reference.

Marked ``gpu``: skipped without CUDA (see tests/conftest.py). The same kernels run on the CPU under
the Triton interpreter in tests/triton_interpret (fp64/fp32/fp16, small shapes); this file adds
bf16, long sequences (L up to 4096), autotuned configurations, ``opcheck`` and ``torch.compile``.
Rule for low precision: kernel error against the fp64 reference <= 2x the error of the PyTorch
reference path computed in the same dtype, plus a small floor.
"""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

import aanet_kernels as ak  # noqa: E402
from aanet_kernels.reference import attention_2d_reference_lse  # noqa: E402
from tests.attention_cases import (  # noqa: E402
    AWKWARD_CASES,
    LARGE_LOGIT_MAGNITUDES,
    Case,
    attention_2d_gradients,
    check_fp32_gradients_at_large_logits,
    check_grid_limit,
    check_on_second_device,
    make_inputs,
)
from tests.compile_checks import check_compile_dynamic_shapes  # noqa: E402
from tests.triton_configs import every_config, pinned_config  # noqa: E402

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
OPS = torch.ops.aanet_kernels
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Added to "2x PyTorch's own error" (relative to the largest exact value): covers shapes where
# PyTorch happens to be exact.
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
LONG_CASES = [
    Case(1, 2, 64, 64, 16, 8),  # L = 4096, AA-Conv head dims
    Case(1, 2, 48, 85, 20, 3),  # L = 4080, not a multiple of any block, H != W
    Case(1, 2, 32, 32, 64, 64),  # SAM-like head dims
    Case(1, 2, 3, 150, 16, 8),  # rows wider than the widest key tile (64): 3 chunks per row
]


@pytest.fixture(autouse=True)
def _import_backend():
    import aanet_kernels._triton  # noqa: F401  (registers the triton ops)


def _kwargs(case: Case, scale: float | None = None) -> dict:
    return dict(
        height=case.height, width=case.width, scale=case.dkh**-0.5 if scale is None else scale
    )


def _max_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    return (actual.double() - exact).abs().max().item() if exact.numel() else 0.0


def _within_twice_torch_error(case: Case, dtype: torch.dtype, seed: int) -> None:
    """Forward, lse and every gradient of the triton backend against the fp64 reference."""
    inputs = make_inputs(case, dtype, DEVICE, requires_grad=True, seed=seed)
    present = [t for t in inputs if t is not None]
    exact_inputs = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    exact_present = [t for t in exact_inputs if t is not None]
    kwargs = _kwargs(case, 0.7)
    gen = torch.Generator().manual_seed(seed + 1)
    shape = (case.batch, case.heads, case.length, case.dvh)
    grad_out = torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE)

    exact = ak.attention_2d_reference(*exact_inputs, **kwargs)
    exact_all = (exact, *torch.autograd.grad(exact, exact_present, grad_out))
    own = ak.attention_2d_reference(*inputs, **kwargs)
    own_all = (own, *torch.autograd.grad(own, present, grad_out.to(dtype)))
    out, lse = OPS.attention_2d_triton_fwd(*inputs, case.height, case.width, kwargs["scale"])
    ours_all = (out, *torch.autograd.grad(out, present, grad_out.to(dtype)))

    names = ["out"] + [
        n for n, t in zip(("q", "k", "v", "bias_h", "bias_w"), inputs, strict=True) if t is not None
    ]
    for name, ours, torch_own, truth in zip(names, ours_all, own_all, exact_all, strict=True):
        assert ours.shape == truth.shape and ours.dtype == dtype, name
        limit = 2 * _max_error(torch_own, truth) + FLOOR[dtype] * max(1.0, truth.abs().max().item())
        assert _max_error(ours, truth) <= limit, name
    exact_lse = attention_2d_reference_lse(
        *exact_inputs[:2], *exact_inputs[3:], height=case.height, width=case.width, scale=0.7
    )
    assert lse.dtype == ak.ops.lse_dtype(dtype)
    lse_tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert _max_error(lse, exact_lse) <= lse_tol * max(1.0, exact_lse.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", AWKWARD_CASES, ids=str)
def test_awkward_shapes_within_twice_torch_error(case, dtype, poisoned_allocations):
    _within_twice_torch_error(case, dtype, seed=31)


@pytest.mark.parametrize("config", every_config(), ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_autotune_config_is_correct(config, dtype):
    """The suite runs each kernel's first configuration; the autotuner may pick any other."""
    with pinned_config(*config):
        _within_twice_torch_error(Case(2, 2, 9, 37, 20, 8), dtype, seed=37)  # 37 wide: 2 chunks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LONG_CASES, ids=str)
def test_long_sequences_within_twice_torch_error(case, dtype):
    _within_twice_torch_error(case, dtype, seed=32)


@pytest.mark.parametrize("dkh, dvh", [(128, 1), (1, 128), (33, 65), (100, 7)])
def test_head_dims_up_to_128(dkh, dvh, poisoned_allocations):
    _within_twice_torch_error(Case(1, 2, 5, 7, dkh, dvh), torch.float16, seed=33)


@pytest.mark.parametrize("case", [Case(1, 2, 3, 4, 3, 2), Case(2, 1, 5, 4, 17, 1, "w")], ids=str)
def test_gradcheck_float64(case):
    inputs = make_inputs(case, torch.float64, DEVICE, requires_grad=True, seed=34)
    present = tuple(t for t in inputs if t is not None)

    def fn(*tensors):
        it = iter(tensors)
        args = [next(it) if t is not None else None for t in inputs]
        return ak.attention_2d(*args, **_kwargs(case, 0.8), backend="triton")

    assert torch.autograd.gradcheck(fn, present)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [Case(2, 2, 9, 13, 20, 8), Case(1, 2, 64, 64, 16, 8)], ids=str)
def test_backward_is_bit_identical_run_to_run(case, dtype):
    inputs = make_inputs(case, dtype, DEVICE, requires_grad=True, seed=35)
    grad_out = torch.randn(
        case.batch, case.heads, case.length, case.dvh, device=DEVICE, dtype=dtype
    )

    def grads():
        out = ak.attention_2d(*inputs, **_kwargs(case), backend="triton")
        return torch.autograd.grad(out, inputs, grad_out)

    for first, second in zip(grads(), grads(), strict=True):
        assert torch.equal(first, second)


def test_strided_and_broadcast_inputs():
    case = Case(2, 3, 4, 5, 6, 4)
    b, n, length = case.batch, case.heads, case.length
    f64 = dict(dtype=torch.float64, device=DEVICE)
    q = torch.randn(b, n * case.dkh, length, **f64).view(b, n, case.dkh, length).transpose(-1, -2)
    k = torch.randn(b, n, length, 2 * case.dkh, **f64)[..., ::2]
    v = torch.randn(length, b, n, case.dvh, **f64).permute(1, 2, 0, 3)
    bias_h = torch.randn(1, n, length, case.height, **f64)
    bias_w = torch.randn(b, 1, length, case.width, **f64).expand(-1, n, -1, -1)  # stride 0
    inputs = [t.detach().requires_grad_() for t in (q, k, v, bias_h, bias_w)]
    out = ak.attention_2d(*inputs, **_kwargs(case), backend="triton")
    ref = ak.attention_2d_reference(*inputs, **_kwargs(case))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    grad_out = torch.randn_like(out).transpose(-1, -2).contiguous().transpose(-1, -2)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert grad.shape == ref_grad.shape
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_row_gives_zeros_and_zero_gradients(dtype):
    case = Case(1, 2, 3, 72, 5, 3)  # L = 216: several tiles in every configuration
    q, k, v, bh, bw = make_inputs(case, dtype, DEVICE, seed=36)
    masked = (0, 1, 150)
    bh = bh.clone()
    bh[masked] = float("-inf")
    inputs = [t.requires_grad_(True) for t in (q, k, v, bh, bw)]
    out, lse = OPS.attention_2d_triton_fwd(*inputs, case.height, case.width, 0.5)
    assert torch.equal(out[masked], torch.zeros_like(out[masked]))
    assert lse[masked].item() == float("-inf")
    assert torch.isfinite(out).all()
    grads = torch.autograd.grad(out, inputs, torch.randn_like(out))
    assert all(torch.isfinite(g).all() for g in grads)
    for grad in (grads[0], grads[3], grads[4]):
        assert torch.equal(grad[masked], torch.zeros_like(grad[masked]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("bias", ["hw", ""])
def test_opcheck(dtype, bias):
    case = Case(2, 2, 3, 4, 5, 3, bias)
    q, k, v, bh, bw = make_inputs(case, dtype, DEVICE, requires_grad=True, seed=37)
    args = (q, k, v, bh, bw, case.height, case.width, 0.5)
    torch.library.opcheck(OPS.attention_2d_triton_fwd, args)
    out, lse = OPS.attention_2d_triton_fwd(*args)
    bwd_args = (torch.randn_like(out), q, k, v, bh, bw, out, lse, case.height, case.width, 0.5)
    bwd_args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in bwd_args)
    torch.library.opcheck(OPS.attention_2d_triton_bwd, bwd_args)


def test_torch_compile_fullgraph_module():
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(16, 40)

        def forward(self, x: torch.Tensor, bias_h: torch.Tensor) -> torch.Tensor:
            q, k, v = self.proj(x).split([16, 16, 8], dim=-1)
            out = ak.attention_2d(q, k, v, bias_h, None, height=6, width=7, backend="triton")
            return out.relu()

    model = Block().to(DEVICE)
    x = torch.randn(2, 3, 42, 16, device=DEVICE, requires_grad=True)
    bias_h = torch.randn(2, 3, 42, 6, device=DEVICE, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, bias_h)
    ref = model(x, bias_h)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), (x, bias_h, model.proj.weight))
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, bias_h, model.proj.weight))
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)


def test_torch_compile_dynamic_shapes():
    # The map size and head dims are compile-time constants of the kernels: a new graph per size.
    check_compile_dynamic_shapes("triton", DEVICE, one_graph=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("axis", ["batch", "heads"])
def test_batch_and_heads_up_to_the_grid_limit(axis, dtype):
    check_grid_limit("triton", axis, dtype, DEVICE)


@pytest.mark.parametrize("magnitude", LARGE_LOGIT_MAGNITUDES)
def test_float32_gradients_at_large_logits_add_nothing_to_torch_error(magnitude):
    compute = attention_2d_gradients("triton", DEVICE)
    check_fp32_gradients_at_large_logits(compute, magnitude, seed=1)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_inputs_on_a_device_that_is_not_current():
    check_on_second_device("triton")
