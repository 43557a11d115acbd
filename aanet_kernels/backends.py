"""Choosing a backend: the ``backend=`` argument, a context manager, or the env variable
``AANET_KERNELS_BACKEND``."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import threading
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from aanet_kernels._extension import EXTENSION_ERROR, has_kernel
from aanet_kernels.limits import MAX_HEAD_DIM, exceeds_limits

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "AANET_KERNELS_BACKEND"

_context_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "aanet_kernels_backend", default=None
)
# The innermost use_backend of the process, for torch.compile: Dynamo guards on a module global,
# so entering another use_backend around a compiled model makes it retrace; the ContextVar above
# (per thread, what eager calls read) torch 2.11's Dynamo cannot trace at all. It is the backend of
# the most recently entered use_backend still open in any thread, kept from the list of open ones
# (not saved and restored: with two threads whose blocks overlap, the one that exits last would
# restore what the other had set, and that would outlive both).
_traced_context_backend: str | None = None
_open_contexts: list[tuple[object, str]] = []
_open_contexts_lock = threading.Lock()


def triton_interpreted() -> bool:
    """Triton kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (read at Triton import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _why_unavailable(name: str, device: torch.device) -> str | None:
    """``None`` if ``name`` can run on ``device``, else the reason in words."""
    if name == "reference":
        return None
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available on this machine"
    if name == "cpu":
        if device.type != "cpu":
            return f"the 'cpu' backend takes CPU tensors, got {device}"
        if not has_kernel("attention_2d_fwd", "CPU"):
            return f"the C++ extension is not loaded ({EXTENSION_ERROR})"
        return None
    if name == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' backend takes CUDA tensors, got {device}"
        if not has_kernel("attention_2d_fwd", "CUDA"):
            return "the extension was built without CUDA kernels (no CUDA toolkit at build time?)"
        return None
    # triton (names are checked before: check_backend_name)
    if not _triton_importable():
        return "triton is not installed"
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
        return None
    return (
        "the 'triton' backend takes CUDA tensors (or CPU ones under TRITON_INTERPRET=1), "
        f"got {device}"
    )


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device`` (default: every device of this machine)."""
    devices = [torch.device(device)] if device is not None else [torch.device("cpu")]
    if device is None and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return [n for n in BACKENDS if any(_why_unavailable(n, d) is None for d in devices)]


# Order in which ``auto`` tries backends per device type; on CUDA a guess until a GPU benchmark
# ranks triton and cuda (README, "GPU").
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


def check_backend_name(backend: object, source: str = "backend") -> None:
    """Raise ``ValueError`` unless ``backend`` is ``"auto"`` or one of ``BACKENDS``; ``source``
    names where the value came from."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"{source}: expected one of {('auto',) + BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device | str, head_dim: int = 0) -> str:
    """The concrete backend for a call: argument, then context manager, then env var, then auto.

    ``head_dim`` (the larger of dkh and dvh) lets ``auto`` pass over kernels compiled for smaller
    heads; an explicit choice is left to the kernel, which raises a clear error.
    """

    def exceeds(name: str) -> bool:
        return name in MAX_HEAD_DIM and head_dim > MAX_HEAD_DIM[name]

    return _resolve(backend, torch.device(device), exceeds)


def resolve_backend_for_call(
    backend: str, q: Tensor, k: Tensor, v: Tensor, needs_grad: bool = False
) -> str:
    """``resolve_backend`` for a call on ``q``, ``k``, ``v``: ``auto`` passes over a backend whose
    size limits (head dim, batch and heads, length, offsets, shared memory of its forward, and of
    its backward if ``needs_grad``) the call exceeds."""
    return _resolve(backend, q.device, lambda name: exceeds_limits(name, q, k, v, needs_grad))


def _resolve(backend: str, device: torch.device, exceeds: Callable[[str], bool]) -> str:
    # Read and compared here, outside the constant function below, so that under torch.compile
    # they become guards: the use_backend in force (a changed one retraces), and the sizes that
    # ``exceeds`` compares, SymInts under dynamic shapes. Dynamo guards on the environment
    # variable read here as well (torch 2.14): a changed one retraces.
    check_backend_name(backend)
    origin = ""
    if backend == "auto":
        traced = torch.compiler.is_compiling()
        context = _traced_context_backend if traced else _context_backend.get()
        # A use_backend, even use_backend("auto"), overrides the environment variable.
        if context:
            backend, origin = context, " (from use_backend)"
        else:
            backend, origin = os.environ.get(ENV_VAR, "auto") or "auto", f" (from {ENV_VAR})"
            check_backend_name(backend, f"{ENV_VAR} (environment variable)")
    passed_over = ()
    if backend == "auto":
        passed_over = tuple(name for name in _auto_order(device) if exceeds(name))
    chosen, reason = _resolve_backend(backend, device, passed_over)
    if reason is not None:
        # Raised here, not in the constant function: torch.compile reports an error raised in
        # there as its own InternalTorchDynamoError.
        raise RuntimeError(f"backend={backend!r}{origin} is not available: {reason}")
    return chosen


def _auto_order(device: torch.device) -> tuple[str, ...]:
    return _AUTO_ORDER.get(device.type, ("reference",))


# The availability checks are a Python-level decision made once per traced call: torch.compile
# treats their result as a constant rather than tracing them.
@torch.compiler.assume_constant_result
def _resolve_backend(
    backend: str, device: torch.device, passed_over: tuple[str, ...]
) -> tuple[str, str | None]:
    """The backend to run, and why it cannot run (None when it can)."""
    if backend == "auto":
        for candidate in _auto_order(device):
            if candidate not in passed_over and _why_unavailable(candidate, device) is None:
                return candidate, None
        return "reference", None
    return backend, _why_unavailable(backend, device)


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Run the enclosed ``attention_2d`` calls (and layers built on it) with ``backend``."""
    check_backend_name(backend)
    global _traced_context_backend
    if torch.compiler.is_compiling():
        # Entered inside a compiled function: Dynamo cannot trace ContextVar.set, and the trace
        # reads only the module global, which it records as a side effect and restores.
        outer = _traced_context_backend
        _traced_context_backend = backend
        try:
            yield
        finally:
            _traced_context_backend = outer
        return
    entry = (object(), backend)  # identified by the object: equal names may be open at once
    token = _context_backend.set(backend)
    with _open_contexts_lock:
        _open_contexts.append(entry)
        _traced_context_backend = backend
    try:
        yield
    finally:
        _context_backend.reset(token)
        with _open_contexts_lock:
            _open_contexts.remove(entry)
            _traced_context_backend = _open_contexts[-1][1] if _open_contexts else None
