"""The GPU kernels as machine code for sm_80 and sm_90, checked on this (GPU-less) machine.

The interpreter and emulation tests check what the kernels compute; these check what only a GPU
build would otherwise reveal. Triton: every autotune configuration lowers through Triton and ptxas
for Ampere and Hopper in every dtype, fits in the block's shared memory, and for each kernel at the
benchmark shapes some configuration keeps everything in registers (no spills), so the autotuner
always has a spill-free choice (aanet_kernels/_triton/aot.py). CUDA: the built extension carries
every kernel instantiation for both architectures.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

import triton  # noqa: E402

import aanet_kernels  # noqa: E402
from aanet_kernels._extension import has_kernel  # noqa: E402
from aanet_kernels._triton import aot  # noqa: E402
from aanet_kernels._triton.autotune import (  # noqa: E402
    MAX_KEY_BLOCK,
    configs,
    padded_dim,
    preprocess_block,
)
from aanet_kernels._triton.backward import (  # noqa: E402
    attention_2d_bwd_dkdv_kernel,
    attention_2d_bwd_dq_kernel,
    attention_2d_bwd_preprocess_kernel,
)
from aanet_kernels._triton.forward import attention_2d_fwd_kernel  # noqa: E402
from aanet_kernels.limits import MAX_HEAD_DIM  # noqa: E402

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


def every_config(name: str) -> list[triton.Config]:
    """All configurations, whatever this process runs (tests pin one, tests/conftest.py)."""
    return configs(name, every=True)


def _constexprs(dtype: torch.dtype, head_dim: int, block_n: int) -> dict[str, object]:
    wide = dtype in (torch.float32, torch.float64)
    return dict(
        HAS_RB=True,
        HAS_CB=True,
        DK=head_dim,
        DV=head_dim,
        DKH=head_dim,
        DVH=head_dim,
        COLS=block_n,  # a map as wide as the key tile, walked by image rows
        ROW_STRIDE=block_n,
        COL_STRIDE=1,
        PRECISION="ieee" if wide else "tf32",
        BLOCK_N=block_n,
    )


def _resources(name: str, config_index: int, dtype, head_dim: int, block_n: int, arch: int):
    kernel = AUTOTUNED[name]
    config = every_config(name)[config_index]
    compiled = aot.compile_kernel(
        kernel, dtype, _constexprs(dtype, head_dim, block_n), config, arch
    )
    return aot.resources(compiled)


def _config_ids() -> list[tuple[str, int]]:
    return [(name, i) for name in AUTOTUNED for i in range(len(every_config(name)))]


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
    config_index = len(every_config(name)) - 1
    used = _resources(name, config_index, dtype, 32, 32, 80)
    assert used.fits(80)


@pytest.mark.parametrize("row_stride,col_stride", [(37, 1), (1, 5)], ids=["rows", "columns"])
@pytest.mark.parametrize("name", AUTOTUNED)
def test_awkward_sizes_compile(name: str, row_stride: int, col_stride: int):
    """Head dims and a row length that are not powers of two (masked columns inside every tile),
    with the keys walked by image rows (a 37-wide map) or by columns (a 37-tall, 5-wide one)."""
    config_index = len(every_config(name)) - 1
    sizes = {"DKH": 20, "DVH": 3, "COLS": 37, "ROW_STRIDE": row_stride, "COL_STRIDE": col_stride}
    constexprs = {**_constexprs(torch.bfloat16, 32, 64), **sizes}
    config = every_config(name)[config_index]
    compiled = aot.compile_kernel(AUTOTUNED[name], torch.bfloat16, constexprs, config, 90)
    assert aot.resources(compiled).fits(90)


@pytest.mark.parametrize("name", AUTOTUNED)
def test_widest_head_and_key_tile_compile(name: str):
    """The extremes the op accepts: head dim MAX_HEAD_DIM['triton'] with the widest key tile."""
    config_index = len(every_config(name)) - 1
    used = _resources(name, config_index, torch.bfloat16, MAX_HEAD_DIM["triton"], MAX_KEY_BLOCK, 90)
    assert used.fits(90), f"{used.shared_bytes} bytes of shared memory"


# (head dim, key tile, q/k/v split out of an NCHW map): AA-Conv heads on 16..64-wide maps in both
# layouts AAConv2d produces, the SAM-like shape, and head dim 128.
BENCHMARK_SHAPES = [
    (16, 16, False),
    (16, 32, False),
    (16, 64, False),
    (64, 64, False),
    (128, 64, False),
    (16, 16, True),
    (16, 32, True),
    (16, 64, True),
]


@pytest.mark.parametrize("head_dim,block_n,nchw", BENCHMARK_SHAPES)
@pytest.mark.parametrize("name", AUTOTUNED)
def test_some_config_does_not_spill(name: str, head_dim: int, block_n: int, nchw: bool):
    kernel = AUTOTUNED[name]
    constexprs = _constexprs(torch.bfloat16, head_dim, block_n)
    spills = [
        aot.resources(
            aot.compile_kernel(kernel, torch.bfloat16, constexprs, config, 90, head_split_nchw=nchw)
        ).spill_bytes
        for config in every_config(name)
    ]
    assert min(spills) == 0, f"every configuration spills (spill bytes per config: {spills})"


@pytest.mark.parametrize("dv", [1, 64, MAX_HEAD_DIM["triton"]])
@pytest.mark.parametrize("arch", ARCHS)
def test_preprocess_kernel_compiles_without_spills(arch: int, dv: int):
    """Not autotuned: its block follows the head dim (op.py), Triton's default warps."""
    constexprs = {"DV": padded_dim(dv), "DVH": dv, "BLOCK_M": preprocess_block(padded_dim(dv))}
    compiled = aot.compile_kernel(
        attention_2d_bwd_preprocess_kernel, torch.float32, constexprs, triton.Config({}), arch
    )
    assert aot.resources(compiled).spill_bytes == 0


# Instantiations per architecture: 4 dtypes, times 4 head-dim tiles (16, 32, 64, 128) for the
# attention kernels (csrc/cuda/attention_2d_{fwd,bwd}_*.cu): the mma kernels for fp16/bf16, the
# shared-memory ones for fp32/fp64; the delta kernel, 4 dtypes times 3 lane groups per row (8, 16,
# 32 lanes: head-dim tiles 64 and 128 share 32).
CUDA_INSTANTIATIONS = {
    "fwd": 8, "fwd_mma": 8, "bwd_dkdv": 8, "bwd_dkdv_mma": 8, "bwd_dq": 8, "bwd_dq_mma": 8,
    "delta": 12,
}  # fmt: skip


def test_extension_carries_every_cuda_kernel_for_sm80_and_sm90():
    if not has_kernel("attention_2d_fwd", "CUDA"):
        pytest.skip("the extension was built without CUDA kernels (no CUDA toolkit at build time)")
    (extension,) = glob.glob(str(Path(aanet_kernels.__file__).parent / "_C*.so"))
    kernels = aot.binary_resources(extension)
    for arch in ARCHS:
        for kernel, expected in CUDA_INSTANTIATIONS.items():
            found = [k.name for k in kernels if k.arch == arch and f"_{kernel}_kernel" in k.name]
            assert len(found) == expected, f"sm_{arch}: {kernel} instantiations {found}"
