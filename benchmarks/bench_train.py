"""Benchmark AANet training: steps per second and peak memory per attention backend.

Variants: AANet with its AA-Conv layers on each backend of
``aanet_kernels.available_backends(device)`` (chosen with ``aanet_kernels.use_backend``), and the
same network with plain 3x3 convolutions (``attention=False``) as the baseline. A step is what
``aanet.train`` does per batch: forward, the default training loss (coordinate MSE plus the
heat-map regulariser, ``aanet.losses.build_training_loss``), backward, an Adam step. The batch
size defaults to the model's (``aanet.config.Config.batch_size``) on random images of the default
input size; time is the median over steps after warm-up, the variants' steps timed in interleaved
rounds (``benchmarks.common.time_interleaved``), memory the peak
of one step above the model and optimizer state (CUDA: allocator; CPU: resident set, in a worker
process, see ``benchmarks.common.rss_peak_bytes``).

``--compile inductor`` also measures every variant under ``torch.compile`` with that compiler
(``aot_eager``: traced, not code-generated), with the time of its first step (the compilation)
beside the steady one; ``aanet train --compile inductor`` trains that way.

``--max-batch`` (CUDA) also searches the largest batch that fits: doubling until out of memory,
then bisecting between the last fit and the first failure.

    python benchmarks/bench_train.py --device cuda
    python benchmarks/bench_train.py --device cpu --batch-size 16 --compile inductor
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import aanet_kernels  # noqa: E402
from benchmarks import common  # noqa: E402

PLAIN = "plain_conv"


@dataclass(frozen=True)
class Job:
    """What one variant is measured on."""

    variant: str  # a backend name, or PLAIN
    batch: int
    input_size: int
    dtype: str
    compiler: str = "none"  # or the torch.compile backend the model runs under

    @property
    def label(self) -> str:
        return self.variant if self.compiler == "none" else f"{self.variant}, {self.compiler}"


def make_step(job: Job, device: torch.device) -> Callable[[], None]:
    """A training step of AANet for ``job`` on fixed random data (model, optimizer built here)."""
    from aanet.config import Config
    from aanet.losses import build_training_loss
    from aanet.model import HEATMAP_STRIDE, build_model

    config = Config(input_size=job.input_size, attention=job.variant != PLAIN)
    dtype = getattr(torch, job.dtype)
    model = build_model(config.model_config()).to(device=device, dtype=dtype).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    loss_fn = build_training_loss(config.loss, config.heatmap_reg)
    images = torch.randn(job.batch, 3, job.input_size, job.input_size, device=device, dtype=dtype)
    num_points = config.model_config().num_points
    targets = torch.rand(job.batch, num_points, 2, device=device, dtype=dtype) * job.input_size
    backend = "auto" if job.variant == PLAIN else job.variant
    net = model if job.compiler == "none" else torch.compile(model, backend=job.compiler)

    def step() -> None:
        with aanet_kernels.use_backend(backend):
            coords, _, logits = net(images)
            loss = loss_fn(coords.float(), logits, targets.float(), HEATMAP_STRIDE)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return step


def variants_for(device: torch.device) -> list[str]:
    """The backends that run on ``device`` (Triton only on a GPU), then the plain-conv baseline."""
    backends = aanet_kernels.available_backends(device)
    return [b for b in backends if b != "triton" or device.type == "cuda"] + [PLAIN]


def first_step(job: Job, device: torch.device) -> tuple[Callable[[], None], float]:
    """The step of ``job`` and the time of its first call (with any compilation)."""
    step = make_step(job, device)
    began = time.perf_counter()
    step()
    common.synchronize(device)
    return step, time.perf_counter() - began


def fits(job: Job, device: torch.device) -> bool:
    """Whether one training step of ``job`` runs without running out of GPU memory."""
    try:
        make_step(job, device)()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()


def largest_batch(job: Job, device: torch.device, limit: int) -> int:
    """The largest batch (up to ``limit``) whose step fits: doubling, then bisection; 0 if none."""
    low, high = 0, job.batch
    while high <= limit and fits(replace(job, batch=high), device):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > max(1, low // 16):  # stop within ~6% of the answer
        mid = (low + high) // 2
        low, high = (mid, high) if fits(replace(job, batch=mid), device) else (low, mid)
    return low


def largest_batch_cell(job: Job, device: torch.device, limit: int) -> int | str:
    """``largest_batch``, or why the search failed (an error other than running out of memory,
    e.g. a kernel refusing a grid that large): the row keeps its numbers either way."""
    try:
        return largest_batch(job, device, limit)
    except Exception as error:
        return f"search failed: {common.error_status(error)}"


def memory_worker_main() -> None:
    """CPU memory worker: a JSON list of jobs on stdin, ``{label: bytes}`` on stdout."""
    if not common.in_memory_worker():
        raise RuntimeError("--memory-worker: start it with benchmarks.common.run_worker")
    device = torch.device("cpu")
    out = {}
    for item in json.load(sys.stdin):
        job = Job(**item)
        # After a first step (one-time costs and the optimizer state are not the step's); a
        # variant that fails gets its reason, the others are still measured.
        out[job.label] = common.warm_peak_memory(lambda job=job: make_step(job, device), device)
    print(json.dumps(out))


def record_peak(row: dict[str, object], peak: int | str) -> None:
    """Put a measured peak (bytes) in ``row``, or why it is missing in its status: a variant whose
    memory step failed keeps its timing."""
    if isinstance(peak, int):
        row["peak_mib"] = peak / 2**20
    else:
        row["status"] = f"memory {peak}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from aanet.config import Config

    defaults = Config()
    parser = argparse.ArgumentParser(description=common.description(__doc__), allow_abbrev=False)
    parser.add_argument("--device", default=common.default_device())
    parser.add_argument("--variants", help=f"comma-separated backends and/or {PLAIN}")
    parser.add_argument("--batch-size", type=common.positive_int, default=defaults.batch_size)
    parser.add_argument("--input-size", type=common.positive_int, default=defaults.input_size)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    common.add_timing_arguments(
        parser, warmup=2, budget_s=5.0, budget_help="seconds of timed steps per variant"
    )
    parser.add_argument(
        "--compile", choices=("inductor", "aot_eager"),
        help="also measure each variant under torch.compile with this compiler",
    )  # fmt: skip
    parser.add_argument("--max-batch", action="store_true", help="(CUDA) find the largest batch")
    parser.add_argument("--max-batch-limit", type=common.positive_int, default=4096)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    common.check_timing_arguments(parser, args)
    try:  # the model's own size rules (a multiple of 16), before any variant runs
        from aanet.model import build_model

        with torch.device("meta"):
            build_model(Config(input_size=args.input_size).model_config())
    except ValueError as error:
        parser.error(f"--input-size: {error}")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    """Run the training benchmark; returns the rows it wrote."""
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker_main()
        return []
    device = common.benchmark_device(args.device)
    if args.max_batch and device.type != "cuda":  # the search runs until CUDA memory runs out
        raise SystemExit(f"--max-batch: expected --device cuda, got {args.device}")
    variants = common.pick_subset(args.variants, variants_for(device), "variants")
    out_dir = common.out_dir(args.out_dir)
    compilers = ("none", args.compile) if args.compile else ("none",)
    jobs = [
        Job(v, args.batch_size, args.input_size, args.dtype, c) for c in compilers for v in variants
    ]
    meta = common.run_metadata(device)
    by_label = {job.label: {"label": job.label, **asdict(job), "status": "ok"} for job in jobs}
    steps: dict[str, Callable[[], None]] = {}
    for job in jobs:
        try:
            steps[job.label], by_label[job.label]["first_step_s"] = first_step(job, device)
        except Exception as error:  # OOM included: recorded, not fatal
            by_label[job.label]["status"] = common.error_status(error)
    # The variants' steps in interleaved rounds, so that a shared machine's changing load falls on
    # all of them alike and their ratios hold.
    timings = common.time_interleaved(
        {label: (step, None) for label, step in steps.items()}, device, warmup=args.warmup,
        repeats=args.repeats, min_repeats=args.min_repeats, budget_s=args.budget,
    )  # fmt: skip
    for job in jobs:
        row, timing = by_label[job.label], timings.get(job.label)
        if isinstance(timing, str):
            row["status"] = timing  # already "error: ..." (common.time_interleaved)
        elif timing is not None:
            row.update(step_ms=timing.median_s * 1e3, steps_per_s=1 / timing.median_s)
            if device.type == "cuda":
                warm = common.warm_peak_memory(lambda step=steps[job.label]: step, device)
                record_peak(row, warm)
        if args.max_batch and device.type == "cuda" and row["status"] == "ok":
            row["largest_batch"] = largest_batch_cell(job, device, args.max_batch_limit)
        print(row, flush=True)
    steps.clear()
    rows = list(by_label.values())
    if device.type == "cpu" and not args.no_memory:
        ok = [asdict(j) for j, r in zip(jobs, rows, strict=True) if r["status"] == "ok"]
        worker = ["-m", "benchmarks.bench_train", "--memory-worker"]
        labels = [r["label"] for r in rows if r["status"] == "ok"]
        peaks = common.worker_memory(worker, ok, labels)
        for row in rows:
            if row["label"] in peaks:
                record_peak(row, peaks[row["label"]])

    plain = next(
        (r for r in rows if r["variant"] == PLAIN and r["compiler"] == "none" and "step_ms" in r),
        None,
    )
    table = [
        [
            r["label"], r["batch"], common.fmt(r.get("steps_per_s")),
            common.fmt(r.get("step_ms")), common.fmt(r.get("first_step_s")),
            common.fmt(r.get("peak_mib")),
            f"{r['step_ms'] / plain['step_ms']:.2f}x" if plain and "step_ms" in r else None,
            r.get("largest_batch"), r["status"],
        ]
        for r in rows
    ]  # fmt: skip
    header = ["variant", "batch", "steps/s", "ms/step", "first step s", "peak MiB"]
    header += ["time / plain conv (eager)", "largest batch", "status"]
    stem = f"train_{common.device_slug(device)}"
    md = (
        f"# AANet training steps: {meta['device_name']} ({meta['device']})\n\n"
        f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}, "
        f"{meta['cpu_threads']} CPU threads; input {args.input_size}x{args.input_size}, "
        f"{args.dtype}, Adam, the default training loss (MSE + heat-map regulariser). "
        "First step: the first call, with any compilation, Inductor's on-disk caches as found "
        "(TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 for a cold compile).\n\n"
        + common.markdown_table(table, header)
        + "\n"
    )
    keys = list(dict.fromkeys(k for r in rows for k in r))
    common.write_csv(
        [{**{k: r.get(k) for k in keys}, **meta} for r in rows], out_dir / f"{stem}.csv"
    )
    common.write_text(md, out_dir / f"{stem}.md")
    print(md)
    return rows


if __name__ == "__main__":
    common.run_cli(main)
