"""Registers, spills and shared memory of every GPU kernel, read on a machine without a GPU.

- Triton kernels: each autotune configuration compiled ahead of time for sm_80 and sm_90
  (``aanet_kernels/_triton/aot.py``) at the benchmark shapes, bf16, both bias tables present.
  Shared memory is what the launch asks for (Triton's pipelining buffers included).
- CUDA kernels: read from the built extension ``aanet_kernels/_C*.so``; shared memory there is the
  static part only (the kernels size their tiles' dynamic shared memory at launch).

Registers are per thread (255 is the hardware cap). ``spill_bytes`` (Triton kernels: ptxas' report)
are the bytes per thread stored to local memory for want of registers: a configuration that spills
is usually slower, so the autotuner should find a spill-free one at every shape. ``stack_bytes`` is
the local-memory frame per thread (all that ``cuobjdump`` reports for the CUDA kernels: spills, and
arrays indexed at run time).

Outputs, in ``--out-dir`` (default ``benchmarks/results/``): ``kernel_resources_sm80_sm90.csv`` and
``.md``.

    python benchmarks/kernel_resources.py
"""

from __future__ import annotations

import argparse
import glob
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import aanet_kernels  # noqa: E402
from aanet_kernels._triton import aot, autotune  # noqa: E402
from aanet_kernels._triton.backward import (  # noqa: E402
    attention_2d_bwd_dkdv_kernel,
    attention_2d_bwd_dq_kernel,
)
from aanet_kernels._triton.forward import attention_2d_fwd_kernel  # noqa: E402
from benchmarks import common  # noqa: E402

ARCHS = (80, 90)
# Table name: (kernel, its configuration list in aanet_kernels/_triton/autotune.py).
TRITON_KERNELS = {
    "fwd": (attention_2d_fwd_kernel, "fwd"),
    "bwd_dkdv": (attention_2d_bwd_dkdv_kernel, "dkdv"),
    "bwd_dq": (attention_2d_bwd_dq_kernel, "dq"),
}
# (head dim, key tile = map width padded, q/k/v layout): AA-Conv heads (dkh 16) on 16/32/64-wide
# maps as AAConv2d hands them over from an NCHW map (row stride 1), and the SAM-like head dim 64
# on a 64-wide map with contiguous tensors.
SHAPES = ((16, 16, "nchw"), (16, 32, "nchw"), (16, 64, "nchw"), (64, 64, "contiguous"))
_CUDA_NAME = re.compile(r"attention_2d_(\w+?)_kernelI(\w+?)(?:Li(\d+)E)?EEv")
_CUDA_DTYPES = {"13__nv_bfloat16": "bf16", "6__half": "fp16", "f": "fp32", "d": "fp64"}


def triton_rows() -> list[dict[str, object]]:
    jobs = [
        (name, kernel, config, head_dim, block_n, layout, arch)
        for name, (kernel, configs) in TRITON_KERNELS.items()
        for head_dim, block_n, layout in SHAPES
        for config in autotune.configs(configs, every=True)
        for arch in ARCHS
    ]
    rows = []
    for name, kernel, config, head_dim, block_n, layout, arch in tqdm(jobs, desc="triton kernels"):
        constexprs = dict(
            HAS_RB=True, HAS_CB=True, DK=head_dim, DV=head_dim, DKH=head_dim, DVH=head_dim,
            COLS=block_n, ROW_STRIDE=block_n, COL_STRIDE=1, PRECISION="tf32", BLOCK_N=block_n,
        )  # fmt: skip
        compiled = aot.compile_kernel(
            kernel, torch.bfloat16, constexprs, config, arch, head_split_nchw=layout == "nchw"
        )
        used = aot.resources(compiled)
        rows.append(
            dict(
                backend="triton",
                kernel=name,
                arch=f"sm_{arch}",
                dtype="bf16",
                layout=layout,
                head_dim=head_dim,
                tile=f"{config.kwargs['BLOCK_M']}x{block_n}",
                warps=config.num_warps,
                stages=config.num_stages,
                registers=used.registers,
                spill_bytes=used.spill_bytes,
                stack_bytes=used.stack_bytes,
                shared_kib=round(used.shared_bytes / 1024, 1),
            )
        )
    return rows


def cuda_rows(extension: str) -> list[dict[str, object]]:
    rows = []
    for kernel in aot.binary_resources(extension):
        match = _CUDA_NAME.search(kernel.name)
        if match is None:
            continue
        name, dtype, head_dim = match.groups()
        rows.append(
            dict(
                backend="cuda",
                kernel=name,
                arch=f"sm_{kernel.arch}",
                dtype=_CUDA_DTYPES.get(dtype, dtype),
                layout="any",
                head_dim=int(head_dim) if head_dim else None,
                tile=None,
                warps=None,
                stages=None,
                registers=kernel.registers,
                spill_bytes=None,  # cuobjdump reports the stack frame only
                stack_bytes=kernel.stack_bytes,
                shared_kib=round(kernel.static_shared_bytes / 1024, 1),
            )
        )
    return sorted(rows, key=lambda r: (r["kernel"], r["dtype"], r["head_dim"] or 0, r["arch"]))


def render(rows: list[dict[str, object]]) -> str:
    header = list(rows[0])
    lines = [
        "# GPU kernel resources, sm_80 and sm_90 (read without a GPU)",
        "",
        "Written by `benchmarks/kernel_resources.py` (its docstring says how each column is read).",
        f"Triton {aot.triton.__version__}, torch {torch.__version__}.",
        "",
    ]
    triton_spill_free = {}
    for row in rows:
        if row["backend"] == "triton":
            tile_n = str(row["tile"]).split("x")[1]
            key = (row["kernel"], row["arch"], row["layout"], row["head_dim"], tile_n)
            free = row["spill_bytes"] == 0
            triton_spill_free[key] = triton_spill_free.get(key, False) or free
    missing = [k for k, free in triton_spill_free.items() if not free]
    lines.append(
        "Every Triton kernel has a spill-free configuration at every shape and architecture."
        if not missing
        else f"Shapes where every Triton configuration spills: {missing}."
    )
    lines += ["", common.markdown_table([list(r.values()) for r in rows], header), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=common.description(__doc__), allow_abbrev=False)
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args(argv)
    out_dir = common.out_dir(args.out_dir)  # checked before minutes of compiling
    rows = triton_rows()
    extensions = glob.glob(str(Path(aanet_kernels.__file__).parent / "_C*.so"))
    if extensions:
        rows += cuda_rows(extensions[0])
    else:
        print("no built extension found: CUDA kernels left out (run `make build` first)")
    stem = out_dir / "kernel_resources_sm80_sm90"
    common.write_csv(rows, stem.with_suffix(".csv"))
    common.write_text(render(rows), stem.with_suffix(".md"))
    print(f"wrote {stem}.csv and .md")


if __name__ == "__main__":
    common.run_cli(main)
