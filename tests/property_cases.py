"""Hypothesis strategies and checks for attention_2d properties, shared by every backend's tests.

A drawn :class:`Spec` says the shape, dtype, layout of each tensor, which biases are present and
how they broadcast, the scale and a masking rate; :func:`build` turns it into tensors and
:func:`check_against_reference` compares a backend with the float64 reference on them.

Budgets: the ``aanet-default`` profile (derandomized, so ``make test`` is repeatable and fast) and
the ``fuzz`` profile (many more random examples), chosen by ``HYPOTHESIS_PROFILE=fuzz``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import Tensor

import aanet_kernels as ak

settings.register_profile(
    "aanet-default",
    max_examples=40,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "fuzz",
    max_examples=600,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
FUZZ = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
PROFILE = settings.get_profile("fuzz" if FUZZ else "aanet-default")


def budget(default_examples: int, fuzz_examples: int) -> settings:
    """The active profile with its example count set per test (slow backends get fewer)."""
    return settings(PROFILE, max_examples=fuzz_examples if FUZZ else default_examples)


DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# How each tensor is laid out in memory; values are the same whatever the layout.
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")
# A bias is absent, full size, or broadcast (size 1) over batch, heads or both.
BIAS_FORMS = ("absent", "full", "batch1", "heads1", "both1")


@dataclass(frozen=True)
class Spec:
    batch: int
    heads: int
    height: int
    width: int
    dkh: int
    dvh: int
    dtype: torch.dtype
    layouts: tuple[str, str, str, str, str]  # q, k, v, bias_h, bias_w
    bias_h: str
    bias_w: str
    scale: float
    bias_scale: float
    mask_rate: float
    seed: int


@st.composite
def specs(
    draw: st.DrawFn,
    dtypes: tuple[torch.dtype, ...] = DTYPES,
    max_side: int = 9,
    scales: tuple[float, ...] = (1.0, 0.125, 0.5, 2.0, 1e-3),
    bias_scales: tuple[float, ...] = (1.0, 0.1, 10.0),
) -> Spec:
    """A random attention_2d problem, small enough for the CPU in milliseconds."""
    return Spec(
        batch=draw(st.integers(1, 3)),
        heads=draw(st.integers(1, 3)),
        height=draw(st.integers(1, max_side)),
        width=draw(st.integers(1, max_side)),
        dkh=draw(st.sampled_from([1, 2, 3, 5, 8, 16, 20, 33])),
        dvh=draw(st.sampled_from([1, 2, 3, 4, 7, 8, 16])),
        dtype=draw(st.sampled_from(dtypes)),
        layouts=tuple(draw(st.sampled_from(LAYOUTS)) for _ in range(5)),
        bias_h=draw(st.sampled_from(BIAS_FORMS)),
        bias_w=draw(st.sampled_from(BIAS_FORMS)),
        scale=draw(st.sampled_from(scales)),
        bias_scale=draw(st.sampled_from(bias_scales)),
        mask_rate=draw(st.sampled_from([0.0, 0.0, 0.2, 0.6])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def lay_out(t: Tensor, layout: str) -> Tensor:
    """``t``'s values in the memory layout named ``layout`` (a view, never a copy of ``t``)."""
    if layout == "transposed":
        return t.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    if layout == "sliced":
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big = torch.cat([big, big[:, :, :1]], dim=2)  # one more row: offsets differ too
        big[:, :, 1:, ::2] = t
        return big[:, :, 1:, ::2]
    if layout == "expanded" and t.shape[1] > 1:
        # Stride 0 over heads: head 0's values shared by all heads.
        return t[:, :1].expand(-1, t.shape[1], -1, -1)
    return t


def build(spec: Spec) -> tuple[Tensor | None, ...]:
    """q, k, v, bias_h, bias_w for ``spec`` as leaf tensors that require grad."""
    gen = torch.Generator().manual_seed(spec.seed)
    b, n, length = spec.batch, spec.heads, spec.height * spec.width

    def rand(shape: tuple[int, ...], scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(spec.dtype)

    def bias(form: str, size: int) -> Tensor | None:
        if form == "absent":
            return None
        shape = (1 if form in ("batch1", "both1") else b, 1 if form in ("heads1", "both1") else n)
        t = rand((*shape, length, size), spec.bias_scale)
        if spec.mask_rate:
            t = t.masked_fill(torch.rand(t.shape, generator=gen) < spec.mask_rate, float("-inf"))
        return t

    tensors = [
        rand((b, n, length, spec.dkh)),
        rand((b, n, length, spec.dkh)),
        rand((b, n, length, spec.dvh)),
        bias(spec.bias_h, spec.height),
        bias(spec.bias_w, spec.width),
    ]
    return tuple(
        None if t is None else lay_out(t, layout).detach().requires_grad_()
        for t, layout in zip(tensors, spec.layouts, strict=True)
    )


# Logits of up to ~1e4 from the scale or the biases: checked in float64, where they round exactly
# enough for the ordinary tolerance.
EXTREME = dict(dtypes=(torch.float64,), scales=(1e-8, 1.0, 1e3), bias_scales=(1e2, 1e3, 1e4))

# Max error relative to max(1, |expected|) for outputs; gradients get GRAD_FACTOR times more.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 8e-2}
GRAD_FACTOR = 20


def _error(actual: Tensor, expected: Tensor) -> float:
    scale = expected.detach().abs().max().clamp_min(1.0) if expected.numel() else 1.0
    diff = (actual.detach().double() - expected.detach()).abs().max()
    return float(diff / scale) if actual.numel() else 0.0


def check_against_reference(spec: Spec, backend: str) -> None:
    """Forward and every gradient of ``backend`` equal the float64 reference on ``spec``."""
    inputs = build(spec)
    kwargs = dict(height=spec.height, width=spec.width, scale=spec.scale)
    present = [t for t in inputs if t is not None]
    out = ak.attention_2d(*inputs, **kwargs, backend=backend)
    assert out.dtype == spec.dtype and out.shape == (*inputs[0].shape[:3], spec.dvh)
    gen = torch.Generator().manual_seed(spec.seed + 1)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, present, grad_out.to(spec.dtype))

    wide = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    ref = ak.attention_2d_reference(*wide, **kwargs)
    want = torch.autograd.grad(ref, [t for t in wide if t is not None], grad_out)

    tol = TOLERANCE[spec.dtype]
    assert _error(out, ref) <= tol, f"output error {_error(out, ref):.3g} > {tol}"
    for index, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape, f"gradient {index}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert torch.isfinite(g).all(), f"gradient {index} is not finite"
        error = _error(g, w)
        assert error <= GRAD_FACTOR * tol, f"gradient {index}: error {error:.3g}"
