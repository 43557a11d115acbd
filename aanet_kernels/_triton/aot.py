"""Ahead-of-time compilation of the Triton kernels for an NVIDIA architecture, with no GPU.

``triton.compile`` lowers a kernel through PTX to a cubin with the ptxas that ships with Triton, and
needs no driver. The tests and ``benchmarks/triton_resources.py`` use this to check, on a CPU-only
machine, that every autotune configuration compiles for sm_80 and sm_90, fits in shared memory, and
to read its registers and spills (``cuobjdump``, also shipped with Triton).

The compile mimics a launch on contiguous tensors: pointers 16-byte aligned, the innermost stride of
every tensor specialised to the constant 1 (as Triton does for an integer argument equal to 1), the
other integers plain ``i32``.
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

# Pointer arguments that hold accumulator-dtype values (fp32, or fp64 for fp64 inputs); every other
# pointer holds input-dtype values.
_ACCUMULATOR_POINTERS = frozenset({"SCALE", "LSE", "DELTA"})
# Integer arguments other than strides: sizes.
_SIZE_ARGS = frozenset({"NH", "L", "DKH", "DVH", "HEIGHT", "WIDTH"})
_TRITON_DTYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}
# Shared memory one block may use (bytes), by compute capability; from NVIDIA's CUDA C++
# Programming Guide, "Features and Technical Specifications".
MAX_SHARED_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_REGISTERS = re.compile(r"REG:(\d+)")
_STACK = re.compile(r"STACK:(\d+)")


@dataclass(frozen=True)
class KernelResources:
    """What one compiled kernel asks of each block and thread."""

    registers: int  # per thread
    stack_bytes: int  # per thread; > 0 means register spills (the kernels make no calls)
    shared_bytes: int  # per block

    def fits(self, arch: int) -> bool:
        return self.shared_bytes <= MAX_SHARED_BYTES[arch]


def _innermost_strides(names: list[str]) -> set[str]:
    """The kernels take strides in groups of four per tensor, (batch, head, row, column): the
    fourth of each group is the innermost, 1 for a contiguous tensor."""
    strides = [n for n in names if n.startswith("stride_")]
    return set(strides[3::4])


def compile_kernel(
    kernel: triton.runtime.Autotuner | triton.runtime.JITFunction,
    dtype: torch.dtype,
    constexprs: dict[str, object],
    config: triton.Config,
    arch: int,
) -> triton.compiler.CompiledKernel:
    """Compile ``kernel`` for ``sm_<arch>`` with inputs of ``dtype``, its non-tuned constexprs
    (``DK``, ``HAS_BH``, ...) and one autotune ``config`` (block sizes, warps, stages)."""
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    accumulator = torch.float64 if dtype == torch.float64 else torch.float32
    constants = {**constexprs, **config.kwargs}
    innermost = _innermost_strides(fn.arg_names)
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[object]]] = {}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name in innermost:
            signature[name] = "constexpr"
            constants[name] = 1
        elif name.startswith("stride_") or name in _SIZE_ARGS:
            signature[name] = "i32"
        else:
            pointee = accumulator if name in _ACCUMULATOR_POINTERS else dtype
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


def resources(compiled: triton.compiler.CompiledKernel) -> KernelResources:
    """Registers and stack from the cubin (``cuobjdump --dump-resource-usage``); shared memory from
    Triton's metadata (what the launch asks for)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run(
            [cuobjdump_path(), "--dump-resource-usage", cubin.name],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    registers, stack = _REGISTERS.search(report), _STACK.search(report)
    if registers is None or stack is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{report}")
    return KernelResources(
        registers=int(registers.group(1)),
        stack_bytes=int(stack.group(1)),
        shared_bytes=int(compiled.metadata.shared),
    )
