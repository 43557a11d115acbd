"""The C++/CUDA backend of attention_2d (csrc/cuda/) against the float64 reference.

Every test but the first needs a CUDA GPU: they are marked ``gpu`` and skipped without one (see
conftest.py). The first runs anywhere: it checks that a build made with CUDA registered the CUDA
kernels, so a CUDA build that silently lost them cannot pass ``make test``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch

import aanet_kernels as ak
from aanet_kernels._extension import extension_loaded, has_kernel
from aanet_kernels.reference import attention_2d_reference_lse
from tests.attention_cases import (
    AWKWARD_CASES,
    LARGE_LOGIT_CASE,
    LARGE_LOGIT_MAGNITUDES,
    Case,
    attention_2d_gradients,
    check_fp32_gradients_at_large_logits,
    check_grid_limit,
    check_on_second_device,
    make_inputs,
)
from tests.compile_checks import check_compile_dynamic_shapes

DEVICE = "cuda"
BACKEND = "cuda"
OPS = ("attention_2d_fwd", "attention_2d_bwd")
OUTPUTS = ("out", "lse", "dq", "dk", "dv", "dbias_h", "dbias_w")
op = torch.ops.aanet_kernels

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Error floor added to "2x PyTorch's own error": covers cases where PyTorch happens to be exact.
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def _built_with_cuda() -> bool:
    try:
        from aanet_kernels._build_info import CUDA_VERSION
    except ImportError:
        return False
    return CUDA_VERSION is not None


def test_cuda_build_registers_cuda_kernels():
    if not _built_with_cuda():
        pytest.skip("the extension was built without CUDA (aanet_kernels/_build_info.py)")
    assert extension_loaded(), "aanet_kernels._C was built with CUDA but does not load"
    for name in OPS:
        assert has_kernel(name, "CUDA"), f"aanet_kernels::{name} has no CUDA kernel"


# Shared memory a block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin), in bytes: sm_80
# (A100) and sm_86/sm_89 (RTX 30xx/40xx, A10, L4), from the CUDA C++ Programming Guide's table of
# compute capabilities (163 KB and 99 KB).
SM80_SMEM_OPTIN = 163 * 1024
SM86_SMEM_OPTIN = 99 * 1024


def test_shared_memory_of_the_cuda_kernels():
    """The extension's own figures (host arithmetic, no GPU): every kernel fits the 99 KB of
    sm_86/sm_89 except the fp64 backward at head dims 65-128, which fits sm_80 (the README's
    backend table says so); dkh and dvh are padded up to one compiled head dim."""
    from aanet_kernels.limits import CUDA_HEAD_DIMS, cuda_smem_bytes, cuda_smem_exceeds

    if not has_kernel("attention_2d_fwd", "CUDA"):
        pytest.skip("the extension was built without CUDA kernels (no toolkit at build time?)")
    for dtype in DTYPES:
        for head_dim in CUDA_HEAD_DIMS:
            for backward in (False, True):
                needed = cuda_smem_bytes(dtype, head_dim, backward)
                too_big = dtype == torch.float64 and head_dim == 128 and backward
                assert (needed > SM86_SMEM_OPTIN) == too_big, (dtype, head_dim, backward, needed)
                assert 0 < needed <= SM80_SMEM_OPTIN, (dtype, head_dim, backward, needed)
    assert cuda_smem_exceeds(torch.float64, 128, True, SM86_SMEM_OPTIN)
    assert not cuda_smem_exceeds(torch.float64, 128, False, SM86_SMEM_OPTIN)
    assert not cuda_smem_exceeds(torch.float64, 128, True, SM80_SMEM_OPTIN)
    smem_bytes = op.attention_2d_cuda_smem_bytes
    assert smem_bytes(torch.float64, 65, 3, True) == smem_bytes(torch.float64, 128, 128, True)
    assert smem_bytes(torch.float16, 1, 17, False) == smem_bytes(torch.float16, 32, 32, False)
    with pytest.raises(RuntimeError, match="head dims up to 128, got dkh=129"):
        smem_bytes(torch.float32, 129, 8, False)


def test_the_shared_memory_check_is_a_constant_under_torch_compile(monkeypatch):
    """Under torch.compile auto reads the device's limit and the extension's figures at trace time
    (the op takes no tensors, which Dynamo cannot trace): fullgraph succeeds and bakes it in."""
    from types import SimpleNamespace

    from aanet_kernels import limits

    if not has_kernel("attention_2d_fwd", "CUDA"):
        pytest.skip("the extension was built without CUDA kernels (no toolkit at build time?)")
    properties = SimpleNamespace(shared_memory_per_block_optin=SM86_SMEM_OPTIN)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: properties)
    torch._dynamo.reset()

    @torch.compile(backend="eager", fullgraph=True)
    def shifted(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        refused = limits._exceeds_device_smem(torch.device("cuda", 0), dtype, 128, True)
        return x + 1 if refused else x - 1

    x = torch.zeros(2)
    assert shifted(x, torch.float64).tolist() == [1.0, 1.0]
    assert shifted(x, torch.float32).tolist() == [-1.0, -1.0]


# Key walks of the fp16/bf16 kernels (csrc/cuda/attention_2d_common.cuh, KeyWalk) that the
# awkward shapes miss: a 5 x 70 map walked by its columns (9 tiles of 64 keys against 10 by rows),
# a 2 x 100 map whose rows take two chunks of 64 keys, and a 70 x 1 strip in runs of one key with
# head dims that need the 128-wide tiles (the smallest key tiles).
CUDA_WALK_CASES = [Case(1, 2, 5, 70, 8, 4), Case(1, 1, 2, 100, 16, 8), Case(1, 1, 70, 1, 33, 65)]


class TestCudaBackend:
    """Needs a GPU and an extension built with CUDA."""

    pytestmark = [
        pytest.mark.gpu,
        pytest.mark.skipif(
            not has_kernel("attention_2d_fwd", "CUDA"),
            reason="the extension was built without CUDA kernels (no toolkit at build time?)",
        ),
    ]

    @staticmethod
    def inputs(case: Case, dtype: torch.dtype, seed: int, requires_grad: bool = False):
        return make_inputs(case, dtype, DEVICE, requires_grad=requires_grad, seed=seed)

    @staticmethod
    def kwargs(case: Case, scale: float | None = None) -> dict:
        scale = case.dkh**-0.5 if scale is None else scale
        return dict(height=case.height, width=case.width, scale=scale)

    @staticmethod
    def upcast(tensors):
        return [
            None if t is None else t.detach().double().requires_grad_(t.requires_grad)
            for t in tensors
        ]

    @staticmethod
    def max_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
        return (actual.double() - exact).abs().max().item() if exact.numel() else 0.0

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("case", AWKWARD_CASES + CUDA_WALK_CASES, ids=str)
    def test_forward_within_twice_torch_error(self, case, dtype, poisoned_allocations):
        inputs = self.inputs(case, dtype, seed=11)
        kwargs = self.kwargs(case)
        q64, k64, v64, bh64, bw64 = self.upcast(inputs)
        exact = ak.attention_2d_reference(q64, k64, v64, bh64, bw64, **kwargs)
        exact_lse = attention_2d_reference_lse(q64, k64, bh64, bw64, **kwargs)
        torch_own = ak.attention_2d_reference(*inputs, **kwargs)
        out, lse = op.attention_2d_fwd(*inputs, case.height, case.width, kwargs["scale"])
        assert out.shape == exact.shape and out.dtype == dtype and out.is_contiguous()
        assert lse.dtype == ak.ops.lse_dtype(dtype)
        own = self.max_error(torch_own, exact)
        assert self.max_error(out, exact) <= 2 * own + FLOOR[dtype]
        # lse is kept in fp32 even for half inputs: only the rounding of the inputs remains.
        lse_tol = 1e-10 if dtype == torch.float64 else 1e-4
        assert self.max_error(lse, exact_lse) <= lse_tol * max(1.0, exact_lse.abs().max().item())

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("case", AWKWARD_CASES + CUDA_WALK_CASES, ids=str)
    def test_gradients_within_twice_torch_error(self, case, dtype, poisoned_allocations):
        inputs = self.inputs(case, dtype, seed=12, requires_grad=True)
        kwargs = self.kwargs(case, scale=0.7)
        gen = torch.Generator().manual_seed(13)
        grad_out = torch.randn(
            case.batch, case.heads, case.length, case.dvh, generator=gen, dtype=torch.float64
        ).to(device=DEVICE, dtype=dtype)
        present = [t for t in inputs if t is not None]
        exact_present = [t for t in self.upcast(inputs) if t is not None]
        exact_all = iter(exact_present)
        exact_inputs = [None if t is None else next(exact_all) for t in inputs]
        exact_grads = torch.autograd.grad(
            ak.attention_2d_reference(*exact_inputs, **kwargs), exact_present, grad_out.double()
        )
        own_grads = torch.autograd.grad(
            ak.attention_2d_reference(*inputs, **kwargs), present, grad_out
        )
        grads = torch.autograd.grad(
            ak.attention_2d(*inputs, **kwargs, backend=BACKEND), present, grad_out
        )
        names = [
            n
            for n, t in zip(("q", "k", "v", "bias_h", "bias_w"), inputs, strict=True)
            if t is not None
        ]
        for name, grad, own, exact in zip(names, grads, own_grads, exact_grads, strict=True):
            assert grad.shape == exact.shape and grad.dtype == dtype, name
            limit = 2 * self.max_error(own, exact) + FLOOR[dtype] * max(
                1.0, exact.abs().max().item()
            )
            assert self.max_error(grad, exact) <= limit, name

    @pytest.mark.parametrize(
        "case",
        [Case(1, 2, 3, 4, 3, 2), Case(2, 1, 2, 5, 2, 3, "h"), Case(1, 1, 5, 4, 17, 1, "w")],
        ids=str,
    )
    def test_gradcheck_float64(self, case):
        inputs = self.inputs(case, torch.float64, seed=14, requires_grad=True)
        kwargs = self.kwargs(case, scale=0.8)
        assert torch.autograd.gradcheck(
            lambda *t: ak.attention_2d(*t, **kwargs, backend=BACKEND), inputs
        )

    def test_double_backward_gradgradcheck(self):
        case = Case(1, 2, 2, 3, 3, 2)
        inputs = self.inputs(case, torch.float64, seed=16, requires_grad=True)
        kwargs = self.kwargs(case, scale=0.8)
        assert torch.autograd.gradgradcheck(
            lambda *t: ak.attention_2d(*t, **kwargs, backend=BACKEND), inputs
        )

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_backward_is_deterministic(self, dtype):
        case = Case(2, 2, 9, 13, 20, 8)  # several key and query tiles
        inputs = self.inputs(case, dtype, seed=15, requires_grad=True)
        grad_out = torch.randn(
            case.batch, case.heads, case.length, case.dvh, device=DEVICE, dtype=dtype
        )

        def grads():
            out = ak.attention_2d(*inputs, **self.kwargs(case), backend=BACKEND)
            return torch.autograd.grad(out, inputs, grad_out)

        for first, second in zip(grads(), grads(), strict=True):
            assert torch.equal(first, second)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
    @pytest.mark.parametrize("with_bias", [True, False])
    def test_opcheck(self, dtype, with_bias):
        case = Case(2, 2, 3, 4, 5, 3, "hw" if with_bias else "")
        q, k, v, bh, bw = self.inputs(case, dtype, seed=16, requires_grad=True)
        args = (q, k, v, bh, bw, case.height, case.width, 0.5)
        torch.library.opcheck(op.attention_2d_fwd, args)
        out, lse = op.attention_2d_fwd(*args)
        grad_out = torch.randn_like(out)
        bwd_args = (grad_out, q, k, v, bh, bw, out, lse, case.height, case.width, 0.5)
        bwd_args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in bwd_args)
        torch.library.opcheck(op.attention_2d_bwd, bwd_args)

    def test_torch_compile_fullgraph(self):
        case = Case(2, 4, 3, 5, 8, 8, "h")

        def attend(q, k, v, bias_h):
            return ak.attention_2d(q, k, v, bias_h, None, **self.kwargs(case), backend=BACKEND)

        q, k, v, bias_h, _ = self.inputs(case, torch.float32, seed=17, requires_grad=True)
        compiled = torch.compile(attend, fullgraph=True)
        out = compiled(q, k, v, bias_h)
        torch.testing.assert_close(out, attend(q, k, v, bias_h), rtol=0, atol=0)
        grads = torch.autograd.grad(out.sum(), (q, k, v, bias_h))
        ref = torch.autograd.grad(attend(q, k, v, bias_h).sum(), (q, k, v, bias_h))
        for grad, ref_grad in zip(grads, ref, strict=True):
            torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)

    def test_torch_compile_dynamic_shapes(self):
        check_compile_dynamic_shapes(BACKEND, DEVICE)

    @pytest.mark.skipif(
        importlib.util.find_spec("triton") is None, reason="triton is not installed"
    )
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    @pytest.mark.parametrize("case", AWKWARD_CASES[1::2] + CUDA_WALK_CASES, ids=str)
    def test_agrees_with_triton(self, case, dtype):
        if "triton" not in ak.available_backends(DEVICE):
            pytest.skip("the triton backend is not available on this device")
        inputs = self.inputs(case, dtype, seed=18, requires_grad=True)
        present = [t for t in inputs if t is not None]
        grad_out = torch.randn(
            case.batch, case.heads, case.length, case.dvh, device=DEVICE, dtype=dtype
        )
        results = {}
        for backend in (BACKEND, "triton"):
            out = ak.attention_2d(*inputs, **self.kwargs(case), backend=backend)
            results[backend] = (out, *torch.autograd.grad(out, present, grad_out))
        tol = {torch.float32: 1e-4, torch.float16: 1e-2}[dtype]
        for ours, theirs in zip(results[BACKEND], results["triton"], strict=True):
            torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)

    def test_strided_and_broadcast_inputs(self):
        case = Case(2, 3, 4, 5, 6, 4)
        q, k, v, _, _ = self.inputs(case, torch.float64, seed=19)
        b, n, length = case.batch, case.heads, case.length
        # Heads split out of a (B, C, L) projection without a copy: the head dim is strided.
        proj = torch.randn(b, n * case.dkh, length, dtype=torch.float64, device=DEVICE)
        q = proj.view(b, n, case.dkh, length).transpose(-1, -2)
        k = torch.randn(b, n, length, 2 * case.dkh, dtype=torch.float64, device=DEVICE)[..., ::2]
        v = torch.randn(length, b, n, case.dvh, dtype=torch.float64, device=DEVICE).permute(
            1, 2, 0, 3
        )
        bias_h = torch.randn(1, n, length, case.height, dtype=torch.float64, device=DEVICE)
        bias_w = torch.randn(b, 1, length, case.width, dtype=torch.float64, device=DEVICE)
        for t in (q, k, v, bias_h, bias_w):
            t.requires_grad_(True)
        assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
        kwargs = self.kwargs(case)
        inputs = (q, k, v, bias_h, bias_w)
        out = ak.attention_2d(*inputs, **kwargs, backend=BACKEND)
        ref = ak.attention_2d_reference(*inputs, **kwargs)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        grad_out = torch.randn_like(out).transpose(-1, -2).contiguous().transpose(-1, -2)
        grads = torch.autograd.grad(out, inputs, grad_out)
        ref_grads = torch.autograd.grad(ref, inputs, grad_out)
        for grad, ref_grad in zip(grads, ref_grads, strict=True):
            assert grad.shape == ref_grad.shape
            torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)

    def test_auto_passes_over_cuda_where_its_backward_would_not_fit(self, monkeypatch):
        """On a GPU with sm_86's 99 KB a block (pretended here) and no Triton, auto runs the
        fp64 call at head dim 128 on the reference when gradients are wanted (the cuda backward
        would refuse, after the forward), and on cuda when they are not."""
        from types import SimpleNamespace

        from aanet_kernels import backends

        properties = SimpleNamespace(shared_memory_per_block_optin=SM86_SMEM_OPTIN)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: properties)
        monkeypatch.setitem(backends._AUTO_ORDER, "cuda", ("cuda", "reference"))
        q = torch.randn(1, 1, 6, 128, dtype=torch.float64, device=DEVICE)
        choose = backends.resolve_backend_for_call
        assert choose("auto", q, q, q, needs_grad=True) == "reference"
        assert choose("auto", q, q, q, needs_grad=False) == "cuda"
        assert choose("auto", q.float(), q.float(), q.float(), needs_grad=True) == "cuda"
        leaf = q.clone().requires_grad_(True)
        out = ak.attention_2d(leaf, q, q, None, None, height=2, width=3)
        out.sum().backward()  # on the reference: runs whatever the device's true limit
        with torch.no_grad():
            torch.testing.assert_close(ak.attention_2d(q, q, q, None, None, height=2, width=3), out)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_fully_masked_row_gives_zeros_and_zero_gradients(self, dtype):
        case = Case(1, 2, 3, 24, 5, 3)  # L = 72: more than one tile in every dtype
        q, k, v, bh, bw = self.inputs(case, dtype, seed=20)
        masked = (0, 1, 50)  # this query sees no key
        bh = bh.clone()
        bh[masked] = float("-inf")
        inputs = [t.requires_grad_(True) for t in (q, k, v, bh, bw)]
        out, lse = op.attention_2d_fwd(*inputs, case.height, case.width, 0.5)
        assert torch.equal(out[masked], torch.zeros_like(out[masked]))
        assert lse[masked].item() == float("-inf")
        assert torch.isfinite(out).all() and torch.isfinite(lse[torch.isfinite(lse)]).all()
        grads = torch.autograd.grad(out, inputs, torch.randn_like(out))
        for grad in grads:
            assert torch.isfinite(grad).all()
        for grad in (grads[0], grads[3], grads[4]):  # the masked query's own gradients
            assert torch.equal(grad[masked], torch.zeros_like(grad[masked]))

    def test_nan_in_a_query_stays_in_its_row(self):
        case = Case(1, 1, 4, 4, 3, 2)
        q, k, v, bh, bw = self.inputs(case, torch.float32, seed=21)
        q[0, 0, 6, 1] = float("nan")
        out = ak.attention_2d(q, k, v, bh, bw, height=4, width=4, backend=BACKEND)
        assert torch.isnan(out[0, 0, 6]).all()
        assert torch.isfinite(out[0, 0, torch.arange(16) != 6]).all()

    @pytest.mark.parametrize("dkh, dvh", [(128, 1), (1, 128), (33, 65), (100, 7)])
    def test_head_dims_up_to_128(self, dkh, dvh, poisoned_allocations):
        case = Case(1, 2, 5, 7, dkh, dvh)
        inputs = self.inputs(case, torch.float16, seed=22, requires_grad=True)
        kwargs = self.kwargs(case)
        exact = ak.attention_2d_reference(*self.upcast(inputs), **kwargs)
        own = self.max_error(ak.attention_2d_reference(*inputs, **kwargs), exact)
        out = ak.attention_2d(*inputs, **kwargs, backend=BACKEND)
        assert self.max_error(out, exact) <= 2 * own + FLOOR[torch.float16]
        grads = torch.autograd.grad(out.float().square().sum(), inputs)
        assert all(torch.isfinite(g).all() for g in grads)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("axis", ["batch", "heads"])
    def test_batch_and_heads_up_to_the_grid_limit(self, axis, dtype):
        check_grid_limit(BACKEND, axis, dtype, DEVICE)

    @pytest.mark.parametrize("magnitude", LARGE_LOGIT_MAGNITUDES)
    def test_float32_gradients_at_large_logits_add_nothing_to_torch_error(self, magnitude):
        compute = attention_2d_gradients(BACKEND, DEVICE)
        check_fp32_gradients_at_large_logits(compute, magnitude, seed=1)

    @pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
    def test_inputs_on_a_device_that_is_not_current(self):
        check_on_second_device(BACKEND)

    def test_head_dim_over_128_is_refused(self):
        case = Case(1, 1, 2, 2, 129, 4)
        inputs = self.inputs(case, torch.float32, seed=23)
        with pytest.raises(RuntimeError, match="head dims up to 128"):
            op.attention_2d_fwd(*inputs, case.height, case.width, 1.0)

    def test_runs_on_the_current_stream_and_device(self):
        case = Case(2, 2, 6, 7, 16, 8)
        inputs = self.inputs(case, torch.float16, seed=24)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = ak.attention_2d(*inputs, **self.kwargs(case), backend=BACKEND)
        stream.synchronize()
        ref = ak.attention_2d(*inputs, **self.kwargs(case), backend=BACKEND)
        assert torch.equal(out, ref)


EMULATION_SOURCE = (
    Path(__file__).resolve().parents[1] / "csrc/cuda/emulation/attention_2d_emulated.cpp"
)
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
EMULATION_CASES = AWKWARD_CASES[1:] + CUDA_WALK_CASES + [Case(1, 2, 3, 24, 5, 3)]
# Memory layouts of q, k, v and dO besides contiguous: unit stride along positions (heads split
# out of an NCHW map: load_rows' other branch), and rows contiguous inside a wider buffer, the
# start off by one element (nothing 16-byte aligned but the row stride).
STRIDED_LAYOUTS = ("positions_fastest", "unaligned_rows")
EMULATION_PARAMS = [(case, "contiguous") for case in EMULATION_CASES] + [
    (case, layout)
    for case in (Case(2, 3, 3, 5, 8, 4), Case(2, 2, 6, 11, 64, 8), CUDA_WALK_CASES[0])
    for layout in STRIDED_LAYOUTS
]


# The dtypes whose emulated blocks run their warps in descending order (the others ascending).
DESCENDING_WARP_DTYPES = (torch.float64, torch.float16)


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in ``layout`` (one of ``STRIDED_LAYOUTS``, or ``"contiguous"``)."""
    if layout == "positions_fastest":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "unaligned_rows":
        padded = torch.zeros(*t.shape[:-1], t.shape[-1] + 8, dtype=t.dtype)
        view = padded[..., 1 : 1 + t.shape[-1]]
        view.copy_(t)
        return view
    return t


def kernel_headers_digest() -> str:
    """A digest of the kernel headers the emulation includes: ``load`` rebuilds only when its
    sources or flags change, and the kernels live in the headers."""
    kernel_dir = EMULATION_SOURCE.parents[1]
    headers = sorted(kernel_dir.glob("*.cuh")) + sorted(kernel_dir.glob("*.h"))
    return hashlib.sha256(b"".join(h.read_bytes() for h in headers)).hexdigest()[:16]


@pytest.fixture(scope="module")
def emulated_kernels():
    """The CUDA kernels compiled for the CPU (about a minute to build, cached afterwards in build/,
    one folder per torch version: a module built against another torch would not load)."""
    if not (CUDA_INCLUDE / "cuda_fp16.h").exists():
        pytest.skip(f"no CUDA headers at {CUDA_INCLUDE} (set CUDA_HOME)")
    from torch.utils.cpp_extension import load

    build_dir = EMULATION_SOURCE.parents[3] / "build" / f"emulation-torch-{torch.__version__}"
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(
        name="aanet_attention_2d_emulated",
        sources=[str(EMULATION_SOURCE)],
        build_directory=str(build_dir),
        extra_cflags=[
            "-O1",
            "-std=c++20",
            f"-I{CUDA_INCLUDE}",
            "-w",  # std::barrier
            f"-DAANET_KERNELS_HEADERS_DIGEST={kernel_headers_digest()}",
        ],  # fmt: skip
        extra_ldflags=["-lpthread"],
    )


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("case", "layout"), EMULATION_PARAMS, ids=str)
def test_kernels_in_host_emulation(emulated_kernels, case, layout, dtype):
    """The kernels' tiling, masking, softmax and bias reductions, run on the CPU (the fp16/bf16
    kernels' mma and ldmatrix fragments included). The warps of a block take turns between
    barriers, in descending order for one dtype of each kernel family (fp64 for the FMA kernels,
    fp16 for the mma ones) and ascending for the other, so every case meets both orders and a
    missing ``__syncthreads`` between warps fails it."""
    q, k, v, bh, bw = make_inputs(case, dtype, seed=25)
    gen = torch.Generator().manual_seed(26)
    shape = (case.batch, case.heads, case.length, case.dvh)
    grad_out = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    results = emulated_kernels.forward_backward(
        *(in_layout(t, layout) for t in (q, k, v)),
        bh,
        bw,
        case.height,
        case.width,
        0.7,
        in_layout(grad_out, layout),
        descending_warps=dtype in DESCENDING_WARP_DTYPES,
    )
    exact_in = [None if t is None else t.double().requires_grad_() for t in (q, k, v, bh, bw)]
    kwargs = dict(height=case.height, width=case.width, scale=0.7)
    exact = ak.attention_2d_reference(*exact_in, **kwargs)
    exact_lse = attention_2d_reference_lse(*exact_in[:2], *exact_in[3:], **kwargs)
    present = [t for t in exact_in if t is not None]
    exact_grads = iter(torch.autograd.grad(exact, present, grad_out.double()))
    expected = [exact, exact_lse] + [None if t is None else next(exact_grads) for t in exact_in]
    # Loose for half types: delta = rowsum(dO * O) uses the rounded output, as in FlashAttention.
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 6e-3, torch.bfloat16: 5e-2}
    for name, got, want in zip(OUTPUTS, results, expected, strict=True):
        if want is None:
            assert got.numel() == 0, name
            continue
        scale = max(1.0, want.abs().max().item())
        assert (got.double() - want).abs().max().item() <= tol[dtype] * scale, name


@pytest.mark.slow
@pytest.mark.parametrize("magnitude", LARGE_LOGIT_MAGNITUDES)
def test_float32_gradients_at_large_logits_in_host_emulation(emulated_kernels, magnitude):
    """The fp32 kernels take the fp64 lse in two parts: no error beyond PyTorch's own."""
    case = LARGE_LOGIT_CASE

    def compute(q, k, v, bias_h, bias_w, grad_out):
        out, _lse, *grads = emulated_kernels.forward_backward(
            q, k, v, bias_h, bias_w, case.height, case.width, 1.0, grad_out
        )
        return [out, *grads]

    check_fp32_gradients_at_large_logits(compute, magnitude, seed=1)
