"""Loads the compiled extension ``aanet_kernels._C``; the package still works without it."""

from __future__ import annotations

import functools
import warnings

import torch

try:
    from aanet_kernels import _C  # noqa: F401  (registers torch.ops.aanet_kernels.*)

    EXTENSION_ERROR: str | None = None
except (ImportError, OSError) as error:  # not built, or built against another torch
    EXTENSION_ERROR = str(error)
    try:
        from aanet_kernels._build_info import TORCH_VERSION as _BUILT_WITH
    except ImportError:
        _BUILT_WITH = "unknown (no build found: run `pip install --no-build-isolation -e .`)"
    warnings.warn(
        "aanet_kernels: the compiled extension could not be loaded, so only the 'reference' "
        f"(and 'triton') backends are available. Built against torch {_BUILT_WITH}, "
        f"found torch {torch.__version__}. Cause: {error}",
        RuntimeWarning,
        stacklevel=2,
    )


def extension_loaded() -> bool:
    return EXTENSION_ERROR is None


@functools.cache
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``aanet_kernels::<op>`` has a compiled kernel for ``dispatch_key``.

    Cached: the compiled registrations are fixed once ``_C`` is imported.
    """
    if not extension_loaded():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"aanet_kernels::{op}", dispatch_key)
