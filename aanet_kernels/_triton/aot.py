"""Ahead-of-time compilation of the Triton kernels for an NVIDIA architecture, with no GPU.

``triton.compile`` lowers a kernel through PTX to a cubin with the ptxas that ships with Triton, and
needs no driver. The tests and ``benchmarks/kernel_resources.py`` use this to check, on a CPU-only
machine, that every autotune configuration compiles for sm_80 and sm_90, fits in shared memory, and
to read its registers and spills (ptxas' report). ``binary_resources`` reads the same figures for
the kernels of a built CUDA binary (``cuobjdump``, also shipped with Triton).

The compile mimics a launch on tensors whose head dims and length ``L`` are multiples of 16, as
Triton specialises such a launch: pointers, strides and ``L`` marked divisible by 16, one stride of
every tensor the constant 1 (Triton's specialisation of an integer equal to 1: the column stride of
a contiguous tensor, or the row stride of q/k/v split out of an NCHW map), the other integers plain
``i32``.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from aanet_kernels.ops import accumulator_dtype, lse_dtype

# Pointer arguments that hold accumulator-dtype values (fp32, or fp64 for fp64 inputs), and the
# log-sum-exp (ops.lse_dtype); every other pointer holds input-dtype values.
_ACCUMULATOR_POINTERS = frozenset({"SCALE", "DELTA"})
# Integer arguments other than strides: sizes.
_SIZE_ARGS = frozenset({"NH", "L", "ROWS"})
_TRITON_DTYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}
# Shared memory one block may use (bytes), by compute capability; from NVIDIA's CUDA C++
# Programming Guide, "Features and Technical Specifications".
MAX_SHARED_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclass(frozen=True)
class KernelResources:
    """What one compiled kernel asks of each block and thread."""

    registers: int  # per thread
    spill_bytes: int  # per thread: values stored to local memory for want of registers
    stack_bytes: int  # per thread: local-memory frame (spills, and arrays indexed at run time)
    shared_bytes: int  # per block

    def fits(self, arch: int) -> bool:
        return self.shared_bytes <= MAX_SHARED_BYTES[arch]


# Stride groups of the tensors that AAConv2d hands over as views of an NCHW convolution output.
_HEAD_SPLIT_TENSORS = ("stride_q", "stride_k", "stride_v", "stride_g")


def _unit_strides(names: list[str], head_split_nchw: bool) -> set[str]:
    """The strides equal to 1. The kernels take strides in groups of four per tensor, (batch, head,
    row, column). Contiguous tensors have the column stride 1; q/k/v/grad_out split out of an NCHW
    map (``functional.split_heads``) have the row stride 1 instead."""
    strides = [n for n in names if n.startswith("stride_")]
    groups = [strides[i : i + 4] for i in range(0, len(strides), 4)]
    unit = set()
    for group in groups:
        by_row = head_split_nchw and group[0].startswith(_HEAD_SPLIT_TENSORS)
        unit.add(group[2] if by_row else group[3])
    return unit


def compile_kernel(
    kernel: triton.runtime.Autotuner | triton.runtime.JITFunction,
    dtype: torch.dtype,
    constexprs: dict[str, object],
    config: triton.Config,
    arch: int,
    head_split_nchw: bool = False,
) -> triton.compiler.CompiledKernel:
    """Compile ``kernel`` for ``sm_<arch>`` with inputs of ``dtype``, its non-tuned constexprs
    (``DK``, ``HAS_RB``, ...) and one autotune ``config`` (block sizes, warps, stages); with
    ``head_split_nchw``, for q/k/v/grad_out as AAConv2d hands them over from an NCHW map."""
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    pointees = {name: accumulator_dtype(dtype) for name in _ACCUMULATOR_POINTERS}
    pointees["LSE"] = lse_dtype(dtype)
    constants = {**constexprs, **config.kwargs}
    unit_strides = _unit_strides(fn.arg_names, head_split_nchw)
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[object]]] = {}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name in unit_strides:
            signature[name] = "constexpr"
            constants[name] = 1
        elif name.startswith("stride_") or name in _SIZE_ARGS:
            signature[name] = "i32"
            if name.startswith("stride_") or name == "L":
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            pointee = pointees.get(name, dtype)
            signature[name] = "*" + _TRITON_DTYPES[pointee]
            attrs[(index,)] = [["tt.divisibility", 16]]
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constants]
    if missing:
        raise ValueError(f"constexprs: no value for {missing} of {fn.__name__}")
    source = ASTSource(fn, signature, constants, attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def cuobjdump_path() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


@dataclass(frozen=True)
class BinaryKernel:
    """One kernel of a CUDA binary, for one architecture, as ``cuobjdump`` reports it."""

    arch: int
    name: str  # mangled
    registers: int
    stack_bytes: int
    static_shared_bytes: int  # dynamic shared memory is set at launch and not counted here


_ARCH = re.compile(r"arch = sm_(\d+)")
_FUNCTION = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)")


def binary_resources(path: str, cubin_arch: int = 0) -> list[BinaryKernel]:
    """Every kernel of every architecture in a shared library with embedded device code (the
    compiled extension), or in a plain cubin (which does not name its architecture: pass it as
    ``cubin_arch``), from ``cuobjdump --dump-resource-usage``."""
    report = subprocess.run(
        [cuobjdump_path(), "--dump-resource-usage", path],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    kernels = []
    # Each embedded ELF starts with its own "arch = sm_NN" line, then lists its functions.
    sections = _ARCH.split(report)
    if len(sections) == 1:
        sections = ["", str(cubin_arch), report]
    for arch, body in zip(sections[1::2], sections[2::2], strict=True):
        for name, registers, stack, shared in _FUNCTION.findall(body):
            kernels.append(BinaryKernel(int(arch), name, int(registers), int(stack), int(shared)))
    return kernels


def ptxas_path() -> str:
    return os.path.join(os.path.dirname(cuobjdump_path()), "ptxas")


_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")


def resources(compiled: triton.compiler.CompiledKernel) -> KernelResources:
    """Registers and spill stores from ptxas' report on the kernel's PTX (the assembler Triton
    itself used); shared memory from Triton's metadata (what the launch asks for, dynamic
    included)."""
    arch = compiled.metadata.target.arch
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        report = subprocess.run(
            [ptxas_path(), "-v", f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}", ptx.name]
            + ["-o", os.devnull],
            check=True,
            capture_output=True,
            text=True,
        ).stderr
    found = [pattern.search(report) for pattern in (_PTXAS_REGISTERS, _PTXAS_SPILLS, _PTXAS_STACK)]
    if None in found:
        raise RuntimeError(f"ptxas printed no resource usage:\n{report}")
    registers, spills, stack = (int(match.group(1)) for match in found)
    return KernelResources(registers, spills, stack, int(compiled.metadata.shared))
