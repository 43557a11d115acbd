"""Benchmark ``AAConv2d`` forward+backward: every ``attention_2d`` backend against the reference.

Shapes: the attention-augmented 3x3 convolutions of the paper's ResNet-50 stages (Bello et al.,
2019): ``Cin = Fout`` in {256, 512} at 56x56, 28x28 and 14x14, kappa = 2 upsilon = 0.2, 8 heads,
relative logits on, stride 1. Batch 8 on the CPU (fp32), 32 on a GPU (bf16 autocast).

Methods: ``AAConv2d`` with each backend of ``aanet_kernels.available_backends(device)``, and
``conv2d``, a plain ``nn.Conv2d(Cin, Fout, 3)``: what the layer replaces, for context.

Each timed call is one training step of the layer: forward, backward of a fixed random output
gradient (to the input and every parameter), gradients then cleared. Time: median over repeats
after warm-up, the methods of a shape timed in interleaved rounds so that a shared machine's load
falls on all of them alike (``benchmarks.common.time_interleaved``). Peak memory: the extra bytes
at the peak of one such call above what was live before it (input, parameters). On CUDA the
``max_memory_allocated`` delta. On the CPU the resident-set high-water mark (``VmHWM`` reset
through ``/proc/self/clear_refs``) minus the resident set before the call, in one fresh worker
process started with a fixed glibc mmap threshold so that freed blocks leave the resident set
(``benchmarks.common.rss_peak_bytes``); each case runs once there before it is measured. This is
chosen over allocator statistics (e.g. ``torch.profiler``'s ``profile_memory``) because it also sees
what a C++ kernel or BLAS allocates outside the torch allocator.

The reference builds ``(B, Nh, L, L)`` logits several times over; cases whose one logits tensor
would exceed ``--max-dense-gib`` are skipped for it (on the CPU by default the 56x56 ones: 2.5 GB
per tensor, about 15 GB in all, too much for a shared machine).

Outputs, in ``--out-dir`` (default ``benchmarks/results/``): ``aaconv_<device-slug>.csv`` and
``aaconv_<device-slug>.md`` (the table, ratios against the reference measured in the same run, and
the issue-5 targets at 28x28).

    python benchmarks/bench_aaconv.py                  # CPU, batch 8
    python benchmarks/bench_aaconv.py --device cuda    # GPU, batch 32, bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import aanet_kernels  # noqa: E402
from aanet_kernels.nn import AAConv2d  # noqa: E402
from benchmarks import common  # noqa: E402

BASELINE = "conv2d"
CHANNELS = (256, 512)
SIZES = (56, 28, 14)


@dataclass(frozen=True)
class Case:
    """One layer: ``Cin = Fout = channels`` on a ``size x size`` map."""

    batch: int
    channels: int
    size: int
    num_heads: int = 8
    dk: float = 0.2
    dv: float = 0.1

    @property
    def label(self) -> str:
        return f"B{self.batch} F{self.channels} {self.size}x{self.size}"

    def logits_bytes(self, elem: int) -> int:
        """Bytes of one ``(B, Nh, L, L)`` logits tensor: what the reference builds repeatedly."""
        length = self.size * self.size
        return self.batch * self.num_heads * length * length * elem


@dataclass
class Row:
    batch: int
    channels: int
    height: int
    width: int
    dk: int
    dv: int
    num_heads: int
    method: str
    dtype: str
    time_ms: float | None = None
    time_min_ms: float | None = None
    repeats: int | None = None
    peak_mib: float | None = None
    status: str = "ok"


def cases_for(device: torch.device, batch: int | None) -> list[Case]:
    b = batch or (8 if device.type == "cpu" else 32)
    return [Case(b, c, s) for c in CHANNELS for s in SIZES]


def methods_for(device: torch.device) -> list[str]:
    return [*aanet_kernels.available_backends(device), BASELINE]


def build_layer(case: Case, method: str, device: torch.device) -> nn.Module:
    c = case.channels
    if method == BASELINE:
        return nn.Conv2d(c, c, 3, padding=1, device=device)
    return AAConv2d(
        c, c, 3, dk=case.dk, dv=case.dv, num_heads=case.num_heads, backend=method,
        input_size=case.size, device=device,
    )  # fmt: skip


def make_step(
    case: Case, method: str, device: torch.device, amp_dtype: torch.dtype | None
) -> Callable[[], None]:
    """One training step of the layer on fresh random inputs (created here, outside the timing)."""
    torch.manual_seed(0)
    layer = build_layer(case, method, device)
    x = torch.randn(case.batch, case.channels, case.size, case.size, device=device)
    x.requires_grad_(True)
    grad = torch.randn(case.batch, case.channels, case.size, case.size, device=device)
    if amp_dtype is not None:
        grad = grad.to(amp_dtype)

    def step() -> None:
        autocast = (
            torch.autocast(device.type, dtype=amp_dtype)
            if amp_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            out = layer(x)
        out.backward(grad)
        layer.zero_grad(set_to_none=True)
        x.grad = None

    return step


def skip_reason(case: Case, method: str, max_dense_gib: float) -> str | None:
    if method == "reference" and case.logits_bytes(4) > max_dense_gib * 2**30:
        return f"skipped (logits {case.logits_bytes(4) / 2**30:.1f} GiB > --max-dense-gib)"
    return None


def measure_memory(
    case: Case, method: str, device: torch.device, amp_dtype: torch.dtype | None
) -> int | str:
    """Peak extra bytes of one step (after an unmeasured one), or why there is none."""
    return common.warm_peak_memory(lambda: make_step(case, method, device, amp_dtype), device)


def memory_worker_main() -> None:
    """CPU memory worker: a JSON job on stdin, ``{"label|method": bytes or reason}`` on stdout."""
    if not common.in_memory_worker():
        raise RuntimeError("--memory-worker: start it with benchmarks.common.run_worker")
    job = json.load(sys.stdin)
    out = {}
    for item in job["cases"]:
        case = Case(**item["case"])
        out[f"{case.label}|{item['method']}"] = measure_memory(
            case, item["method"], torch.device("cpu"), None
        )
    print(json.dumps(out))


def run(
    cases: Sequence[Case],
    methods: Sequence[str],
    device: torch.device,
    args: argparse.Namespace,
) -> list[Row]:
    amp_dtype = None if device.type == "cpu" else getattr(torch, args.amp_dtype)
    todo = [(c, m) for c in cases for m in methods if not skip_reason(c, m, args.max_dense_gib)]
    if device.type == "cpu":
        job = {"cases": [{"case": asdict(c), "method": m} for c, m in todo]}
        worker = ["-m", "benchmarks.bench_aaconv", "--memory-worker"]
        memory = common.worker_memory(worker, job, [f"{c.label}|{m}" for c, m in todo])
    else:
        memory = {f"{c.label}|{m}": measure_memory(c, m, device, amp_dtype) for c, m in todo}
    rows = []
    for case in cases:
        # The methods of one case are timed in interleaved rounds, so a shared machine's changing
        # load falls on all of them alike and their ratios hold.
        steps, failed = {}, {}
        for method in methods:
            if not skip_reason(case, method, args.max_dense_gib):
                try:
                    steps[method] = (make_step(case, method, device, amp_dtype), None)
                except Exception as error:  # recorded; the other methods are still timed
                    failed[method] = common.error_status(error)
        timings = common.time_interleaved(
            steps, device, warmup=args.warmup, repeats=args.repeats,
            min_repeats=min(3, args.repeats), budget_s=args.budget,
        )  # fmt: skip
        del steps
        for method in methods:
            layer = build_layer(case, method, torch.device("meta"))
            row = Row(
                case.batch, case.channels, case.size, case.size,
                getattr(layer, "dk", 0), getattr(layer, "dv", 0), case.num_heads, method,
                "fp32" if amp_dtype is None else f"{args.amp_dtype} autocast",
            )  # fmt: skip
            timing = (
                failed.get(method)
                or timings.get(method)
                or skip_reason(case, method, args.max_dense_gib)
            )
            if isinstance(timing, str):
                row.status = timing
            else:
                row.time_ms, row.time_min_ms = timing.median_s * 1e3, timing.min_s * 1e3
                row.repeats = timing.repeats
            mem = memory.get(f"{case.label}|{method}")
            if isinstance(mem, int):
                row.peak_mib = mem / 2**20
            elif isinstance(mem, str) and row.status == "ok":
                row.status = f"memory {mem}"
            print(f"{case.label:>16} {method:>10}: {common.fmt(row.time_ms)} ms, "
                  f"{common.fmt(row.peak_mib)} MiB {row.status}", flush=True)  # fmt: skip
            rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _ratio(num: float | None, den: float | None) -> str | None:
    return None if num is None or den is None or den == 0 else f"{num / den:.2f}x"


def target_checks(rows: Sequence[Row]) -> list[str]:
    """Issue 5: at 28x28, each backend >= 2x faster and >= 5x less peak memory than reference."""
    checks = []
    for r in rows:
        if r.height != 28 or r.method in ("reference", BASELINE):
            continue
        ref = next(
            (
                x
                for x in rows
                if x.method == "reference" and (x.channels, x.height) == (r.channels, 28)
            ),
            None,
        )
        if not ref or not (r.time_ms and ref.time_ms and r.peak_mib and ref.peak_mib):
            continue
        speed, mem = ref.time_ms / r.time_ms, ref.peak_mib / r.peak_mib
        checks.append(
            f"F{r.channels} 28x28, {r.method}: {speed:.2f}x faster (target >= 2x: "
            f"{'met' if speed >= 2 else 'NOT met'}), {mem:.1f}x less peak memory "
            f"(target >= 5x: {'met' if mem >= 5 else 'NOT met'})"
        )
    return checks


def render_markdown(rows: Sequence[Row], meta: dict[str, str]) -> str:
    by_key = {(r.channels, r.height, r.method): r for r in rows}
    header = ["layer", "dk/dv/Nh", "method", "ms", "peak MiB", "vs ref", "mem ref/this",
              "/ conv2d", "status"]  # fmt: skip
    table = []
    for r in rows:
        ref = by_key.get((r.channels, r.height, "reference"))
        conv = by_key.get((r.channels, r.height, BASELINE))
        table.append([
            f"B{r.batch} F{r.channels} {r.height}x{r.width}",
            f"{r.dk}/{r.dv}/{r.num_heads}" if r.method != BASELINE else None,
            r.method, common.fmt(r.time_ms), common.fmt(r.peak_mib),
            _ratio(ref.time_ms if ref else None, r.time_ms),
            _ratio(ref.peak_mib if ref else None, r.peak_mib),
            _ratio(r.time_ms, conv.time_ms if conv else None),
            r.status,
        ])  # fmt: skip
    lines = [
        f"# AAConv2d forward+backward: {meta['device_name']} ({meta['device']})",
        "",
        f"{meta['date']}; torch {meta['torch']}, {meta['cpu_threads']} CPU threads (load "
        f"average {meta['load_avg_1m']} at the start, {meta['load_avg_1m_end']} at the end), "
        f"dtype {rows[0].dtype}. 3x3 layers, Cin = Fout, kappa = 2 upsilon = 0.2, relative on.",
        "",
        "Columns: median time of one step (forward, backward to input and weights); extra peak "
        "memory of one step; `vs ref` = reference time / this time; `mem ref/this` = reference "
        "peak / this peak (higher is better for both); `/ conv2d` = this time / a plain 3x3 "
        "`nn.Conv2d` with the same channels.",
        "",
        common.markdown_table(table, header),
    ]
    checks = target_checks(rows)
    if checks:
        lines += ["", "## Issue-5 targets", ""] + [f"- {c}" for c in checks]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=common.description(__doc__, whole=True),
        formatter_class=argparse.RawTextHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--batch", type=common.positive_int, default=None, help="default: 8 on cpu, 32 on cuda"
    )
    p.add_argument("--channels", type=int, nargs="+", default=None, choices=CHANNELS,
                   metavar="C", help="subset of 256 512")  # fmt: skip
    p.add_argument("--sizes", type=int, nargs="+", default=None, choices=SIZES, metavar="S",
                   help="subset of 56 28 14")  # fmt: skip
    p.add_argument("--methods", nargs="+", default=None, help="default: every backend + conv2d")
    p.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"),
                   help="autocast dtype on cuda (the CPU runs fp32)")  # fmt: skip
    p.add_argument(
        "--max-dense-gib",
        type=common.non_negative_float,
        default=None,
        help="skip the reference above this logits GiB (default: 1 cpu, 8 cuda)",
    )
    p.add_argument("--warmup", type=common.non_negative_int, default=1)
    p.add_argument("--repeats", type=common.positive_int, default=5)
    # --budget as in the other benchmarks; --budget-s, its first name, still works.
    p.add_argument(
        "--budget", "--budget-s", dest="budget", type=common.non_negative_float, default=10.0,
        help="seconds of timed calls per case (stop repeating after this)",
    )  # fmt: skip
    p.add_argument("--out-dir", type=Path, default=common.RESULTS_DIR)
    p.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker_main()
        return
    device = common.benchmark_device(args.device)
    if args.max_dense_gib is None:
        args.max_dense_gib = 1.0 if device.type == "cpu" else 8.0
    cases = [
        c
        for c in cases_for(device, args.batch)
        if (not args.channels or c.channels in args.channels)
        and (not args.sizes or c.size in args.sizes)
    ]
    available = methods_for(device)
    methods = list(dict.fromkeys(args.methods)) if args.methods else available
    unknown = [m for m in methods if m not in available]
    if unknown:
        raise SystemExit(f"--methods: expected some of {available}, got {unknown}")
    out_dir = common.out_dir(args.out_dir)
    meta = common.run_metadata(device)
    rows = run(cases, methods, device, args)
    meta["load_avg_1m_end"] = common.run_metadata(device)["load_avg_1m"]
    stem = f"aaconv_{common.device_slug(device)}"
    keyed = [{**meta, **{f.name: getattr(r, f.name) for f in fields(Row)}} for r in rows]
    csv_path = common.write_csv(keyed, out_dir / f"{stem}.csv")
    md = render_markdown(rows, meta)
    md_path = common.write_text(md, out_dir / f"{stem}.md")
    print(md)
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    common.run_cli(main)
