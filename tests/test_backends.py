"""Choosing a backend: argument, context manager, environment variable, auto; errors."""

from __future__ import annotations

import pytest
import torch

import aanet_kernels as ak
from aanet_kernels.backends import ENV_VAR


def test_reference_is_always_available():
    assert "reference" in ak.available_backends()
    assert "reference" in ak.available_backends("cpu")


def test_unknown_backend_is_an_error():
    with pytest.raises(RuntimeError, match="unknown backend 'fast'"):
        ak.resolve_backend("fast", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend: expected one of"):
        with ak.use_backend("fast"):
            pass


def test_unavailable_backend_is_an_error_not_a_fallback():
    with pytest.raises(RuntimeError, match="backend='cuda' is not available: .*CUDA tensors"):
        ak.resolve_backend("cuda", torch.device("cpu"))


def test_cuda_device_lists_only_what_can_run_there():
    """A CUDA-built extension on a machine without a GPU does not make the GPU backends
    available; with a GPU, every listed backend actually runs."""
    listed = ak.available_backends("cuda")
    assert "reference" in listed
    if not torch.cuda.is_available():
        assert listed == ["reference"]
        return
    q = torch.randn(1, 1, 6, 4, device="cuda")
    for backend in listed:
        out = ak.attention_2d(q, q, q, height=2, width=3, backend=backend)
        assert out.shape == q.shape


def test_precedence_argument_context_environment(monkeypatch: pytest.MonkeyPatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(ENV_VAR, "reference")
    assert ak.resolve_backend("auto", cpu) == "reference"
    expected_auto = "cpu" if "cpu" in ak.available_backends("cpu") else "reference"
    with ak.use_backend("auto"):
        monkeypatch.delenv(ENV_VAR)
        assert ak.resolve_backend("auto", cpu) == expected_auto
    with ak.use_backend("reference"):
        assert ak.resolve_backend("auto", cpu) == "reference"
        if "cpu" in ak.available_backends("cpu"):
            assert ak.resolve_backend("cpu", cpu) == "cpu"  # an explicit argument wins


def test_context_manager_restores_on_exit():
    with ak.use_backend("reference"):
        pass
    assert ak.backends._context_backend.get() is None


def test_auto_passes_over_kernels_compiled_for_smaller_heads(monkeypatch: pytest.MonkeyPatch):
    from aanet_kernels import backends

    # Pretend the CPU runs Triton (the interpreter does), ahead of the C++ kernel in auto's order.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(backends._AUTO_ORDER, "cpu", ("triton", "reference"))
    cpu = torch.device("cpu")
    assert ak.resolve_backend("auto", cpu, head_dim=64) == "triton"
    assert ak.resolve_backend("auto", cpu, head_dim=300) == "reference"
