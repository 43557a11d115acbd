"""The Triton kernels compiled ahead of time for sm_80 and sm_90 on this (GPU-less) machine.

The interpreter tests check what the kernels compute; these check what only a GPU compile would
otherwise reveal: every autotune configuration lowers through Triton and ptxas for Ampere and
Hopper in every dtype, fits in the block's shared memory, and for each kernel at the shapes the
benchmarks use some configuration keeps everything in registers (no spills), so the autotuner
always has a spill-free choice. See aanet_kernels/_triton/aot.py.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

import triton  # noqa: E402

from aanet_kernels._triton import aot  # noqa: E402
from aanet_kernels._triton.autotune import MAX_HEAD_DIM, MAX_KEY_BLOCK  # noqa: E402
from aanet_kernels._triton.backward import (  # noqa: E402
    attention_2d_bwd_dkdv_kernel,
    attention_2d_bwd_dq_kernel,
    attention_2d_bwd_preprocess_kernel,
)
from aanet_kernels._triton.forward import attention_2d_fwd_kernel  # noqa: E402
from aanet_kernels._triton.op import PREPROCESS_BLOCK  # noqa: E402

pytestmark = pytest.mark.skipif(
    not os.path.exists(aot.cuobjdump_path()),
    reason="this triton has no NVIDIA backend tools (ptxas, cuobjdump)",
)
ARCHS = [80, 90]
AUTOTUNED = {
    "fwd": attention_2d_fwd_kernel,
    "dkdv": attention_2d_bwd_dkdv_kernel,
    "dq": attention_2d_bwd_dq_kernel,
}


def _constexprs(dtype: torch.dtype, head_dim: int, block_n: int) -> dict[str, object]:
    wide = dtype in (torch.float32, torch.float64)
    return dict(
        HAS_BH=True,
        HAS_BW=True,
        DK=head_dim,
        DV=head_dim,
        PRECISION="ieee" if wide else "tf32",
        BLOCK_N=block_n,
    )


def _resources(name: str, config_index: int, dtype, head_dim: int, block_n: int, arch: int):
    kernel = AUTOTUNED[name]
    config = kernel.configs[config_index]
    compiled = aot.compile_kernel(
        kernel, dtype, _constexprs(dtype, head_dim, block_n), config, arch
    )
    return aot.resources(compiled)


def _config_ids() -> list[tuple[str, int]]:
    return [(name, i) for name, kernel in AUTOTUNED.items() for i in range(len(kernel.configs))]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name,config_index", _config_ids())
def test_every_config_compiles_and_fits_shared_memory(name: str, config_index: int, arch: int):
    """bf16 at the SAM-like benchmark shape (head dim 64, 64-wide rows)."""
    used = _resources(name, config_index, torch.bfloat16, 64, 64, arch)
    assert used.fits(arch), f"{used.shared_bytes} bytes of shared memory on sm_{arch}"
    assert 0 < used.registers <= 255


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", AUTOTUNED)
def test_other_dtypes_compile(name: str, dtype: torch.dtype):
    """The smallest configuration of each kernel, for the dtypes the benchmark does not cover."""
    config_index = len(AUTOTUNED[name].configs) - 1
    used = _resources(name, config_index, dtype, 32, 32, 80)
    assert used.fits(80)


@pytest.mark.parametrize("name", AUTOTUNED)
def test_widest_head_and_key_tile_compile(name: str):
    """The extremes the op accepts: head dim MAX_HEAD_DIM with the widest key tile."""
    config_index = len(AUTOTUNED[name].configs) - 1
    used = _resources(name, config_index, torch.bfloat16, MAX_HEAD_DIM, MAX_KEY_BLOCK, 90)
    assert used.fits(90), f"{used.shared_bytes} bytes of shared memory"


# (head dim, key tile): AA-Conv heads on 16..64-wide maps, and the SAM-like shape.
BENCHMARK_SHAPES = [(16, 16), (16, 32), (16, 64), (64, 64)]


@pytest.mark.parametrize("head_dim,block_n", BENCHMARK_SHAPES)
@pytest.mark.parametrize("name", AUTOTUNED)
def test_some_config_does_not_spill(name: str, head_dim: int, block_n: int):
    stacks = [
        _resources(name, i, torch.bfloat16, head_dim, block_n, 90).stack_bytes
        for i in range(len(AUTOTUNED[name].configs))
    ]
    assert min(stacks) == 0, f"every configuration spills (stack bytes per config: {stacks})"


@pytest.mark.parametrize("arch", ARCHS)
def test_preprocess_kernel_compiles_without_spills(arch: int):
    """Not autotuned: one launch configuration (op.py), Triton's default warps."""
    constexprs = {"DV": MAX_HEAD_DIM, "BLOCK_M": PREPROCESS_BLOCK}
    compiled = aot.compile_kernel(
        attention_2d_bwd_preprocess_kernel, torch.float32, constexprs, triton.Config({}), arch
    )
    assert aot.resources(compiled).stack_bytes == 0
