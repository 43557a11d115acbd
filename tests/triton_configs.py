"""Running a Triton kernel with one chosen configuration of its autotuning list.

The test suites pin each kernel to its first configuration (tests/conftest.py, and the interpreter
has its own), while the autotuner may pick any other on a GPU: these helpers let a test run each.
Importing this module needs ``triton``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from aanet_kernels._triton import autotune
from aanet_kernels._triton.backward import attention_2d_bwd_dkdv_kernel, attention_2d_bwd_dq_kernel
from aanet_kernels._triton.forward import attention_2d_fwd_kernel

KERNELS = {
    "fwd": attention_2d_fwd_kernel,
    "dkdv": attention_2d_bwd_dkdv_kernel,
    "dq": attention_2d_bwd_dq_kernel,
}


def every_config() -> list[tuple[str, int]]:
    """``(kernel name, index)`` of every configuration in ``autotune.GPU_CONFIGS``."""
    return [(name, i) for name, table in autotune.GPU_CONFIGS.items() for i in range(len(table))]


@contextlib.contextmanager
def pinned_config(name: str, index: int) -> Iterator[None]:
    """Within the block, kernel ``name`` runs configuration ``index`` of its GPU list (an
    autotuner with a single configuration runs it without timing anything)."""
    kernel = KERNELS[name]
    saved = kernel.configs
    kernel.configs = [autotune.configs(name, every=True)[index]]
    try:
        yield
    finally:
        kernel.configs = saved
