"""Benchmark ``attention_2d``: every backend against what a user would otherwise run.

Methods, all computing ``softmax(scale * q k^T + bias_h[:, row(j)] + bias_w[:, col(j)]) @ v`` on the
same inputs, with gradients for q, k, v and both bias tables:

- each backend of ``aanet_kernels.available_backends(device)`` (``reference``, ``cpu``, ``triton``,
  ``cuda``; Triton only on a GPU, its CPU interpreter is not a benchmark);
- ``sdpa_dense``: ``scaled_dot_product_attention`` with the two tables expanded into a dense
  ``(B, Nh, L, L)`` ``attn_mask`` inside the timed call (what a user without this library writes;
  the mask requires grad when timing backward, through the tables);
- ``sdpa_nobias``: the same SDPA with no bias at all: the cost floor of the work without the bias;
- ``flex``: ``torch.compile``d FlexAttention whose ``score_mod`` reads the two tables (on the CPU
  forward only: FlexAttention has no CPU backward).

Modes: ``fwd`` (inference, under ``no_grad``), ``bwd`` (the backward alone, after an untimed
forward) and ``fwdbwd``. Time: median over repeats after warm-up (``benchmarks.common.time_fn``).
TFLOP/s with the FlashAttention convention: forward ``2 B Nh L^2 (dkh + dvh)``, backward
``2 B Nh L^2 (3 dkh + 2 dvh)`` (the recomputed ``q k^T`` included).

Peak memory: extra bytes at the peak of one call above the inputs. On CUDA, the
``max_memory_allocated`` delta. On the CPU, the resident-set high-water mark (``VmHWM``, reset
through ``/proc/self/clear_refs``) minus the resident set before the call, measured in one fresh
worker process started with a fixed glibc mmap threshold, so that freed blocks leave the resident
set and the mark follows live memory; each case runs once there before it is measured, so one-time
costs (thread pools, code pages) are not counted. Unlike allocator statistics this also sees memory
that a C++ kernel or BLAS allocates on its own. Resolution: a page; blocks under 64 KiB may come
from memory already resident and go unseen, so tiny cases read 0.

Roofline: ceilings measured once in the run (``benchmarks/roofline.py``); the workload is the ideal
fused one: the FLOPs above, one exponential per logit per pass, and the bytes of inputs, outputs and
statistics only (no ``L x L`` tensor). ``roofline %`` = roofline time / measured time.

Outputs, in ``--out-dir`` (default ``benchmarks/results/``), named by device:
``attention_<device-slug>.csv`` (one row per shape x method x mode, keyed by device, versions and
date), ``attention_<device-slug>.md`` (tables with ratios against the reference and SDPA measured in
the same run) and ``attention_<device-slug>_<family>.png`` (time against L per shape family).

    python benchmarks/bench_attention.py --device cpu            # the issue-2 CPU shapes
    python benchmarks/bench_attention.py --device cuda           # the GPU grid, bf16
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

import aanet_kernels  # noqa: E402
from aanet_kernels.reference import expand_bias_tables  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.roofline import Ceilings, measure_ceilings, roofline_time  # noqa: E402

MODES = ("fwd", "bwd", "fwdbwd")
BASELINES = ("sdpa_dense", "sdpa_nobias", "flex")
DENSE_METHODS = ("reference", "sdpa_dense")  # they build an L x L tensor


@dataclass(frozen=True)
class Shape:
    """One attention layer: ``family`` groups the shapes drawn as one plot."""

    family: str
    batch: int
    heads: int
    height: int
    width: int
    dkh: int
    dvh: int

    @property
    def length(self) -> int:
        return self.height * self.width

    @property
    def label(self) -> str:
        return f"B{self.batch} Nh{self.heads} {self.height}x{self.width} dk{self.dkh} dv{self.dvh}"


def _grid(
    family: str, batch: int, heads: int, sizes: Sequence[int], dkh: int, dvh: int
) -> list[Shape]:
    return [Shape(family, batch, heads, s, s, dkh, dvh) for s in sizes]


PRESETS: dict[str, list[Shape]] = {
    # Issue 2: the first CPU benchmark and its targets (H=W=32 is where they are checked).
    "cpu": _grid("aaconv_dv8", 8, 8, (16, 32, 48), 16, 8)
    + _grid("aaconv_dv16", 8, 8, (16, 32, 48), 16, 16),
    # Issue 3's AA-Conv and SAM-like shapes, then issue 7's grid (H=W 7..64, dkh 8..32, dvh 1..32).
    "gpu": _grid("issue3_aaconv", 32, 8, (16, 32, 64), 16, 8)
    + _grid("sam_like", 4, 12, (32, 64), 64, 64)
    + _grid("grid_dk8_dv1", 8, 8, (7, 14, 28, 56), 8, 1)
    + _grid("grid_dk16_dv8", 8, 8, (7, 14, 28, 56), 16, 8)
    + _grid("grid_dk32_dv32", 8, 8, (7, 14, 28, 56), 32, 32),
    # For the smoke tests: seconds on one core, H != W included.
    "tiny": [Shape("tiny", 1, 2, 3, 3, 4, 3), Shape("tiny", 1, 2, 3, 5, 4, 3)],
}


# ---------------------------------------------------------------- work model


def flops(shape: Shape, mode: str) -> float:
    """FLOPs of ``mode`` with the FlashAttention convention (see the module docstring)."""
    pairs = shape.batch * shape.heads * shape.length**2
    fwd = 2 * pairs * (shape.dkh + shape.dvh)
    bwd = 2 * pairs * (3 * shape.dkh + 2 * shape.dvh)
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


def exps(shape: Shape, mode: str) -> float:
    """Exponentials: one per logit per pass (a fused backward recomputes the probabilities)."""
    per_pass = shape.batch * shape.heads * shape.length**2
    return per_pass * (2 if mode == "fwdbwd" else 1)


def ideal_bytes(shape: Shape, mode: str, elem: int) -> float:
    """Bytes a fused kernel must move: inputs, outputs, fp32 statistics; nothing of size L x L."""
    rows = shape.batch * shape.heads * shape.length
    qk = 2 * rows * shape.dkh
    vo = rows * shape.dvh
    tables = rows * (shape.height + shape.width)
    fwd = elem * (qk + vo + tables + vo) + 4 * rows
    # backward reads q, k, v, the tables, out, dout and lse; writes dq, dk, dv and both table grads
    bwd = elem * (qk + vo + tables + 2 * vo) + 4 * rows + elem * (qk + vo + tables)
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


# ---------------------------------------------------------------- methods


def methods_for(device: torch.device) -> list[str]:
    """Every method that can run on ``device``: the backends present, then the baselines."""
    backends = [
        b
        for b in aanet_kernels.available_backends(device)
        if b != "triton" or device.type == "cuda"
    ]
    return backends + list(BASELINES)


def make_inputs(
    shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> dict[str, Tensor]:
    """Fresh random q, k, v and bias tables, made directly in ``dtype`` (no temporaries)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = (shape.batch, shape.heads, shape.length)

    def rand(*size: int) -> Tensor:
        return torch.randn(size, generator=gen, dtype=dtype, device=device)

    return {
        "q": rand(*rows, shape.dkh),
        "k": rand(*rows, shape.dkh),
        "v": rand(*rows, shape.dvh),
        "bias_h": rand(*rows, shape.height),
        "bias_w": rand(*rows, shape.width),
    }


_flex_compiled: dict[Shape, Callable[..., Tensor]] = {}


def _flex_forward(x: dict[str, Tensor], shape: Shape, scale: float) -> Callable[[], Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    if shape not in _flex_compiled:
        # Start each shape from a clean cache: across many shapes dynamo's recompile limit would
        # otherwise send later ones to eager. Within a shape, new inputs reuse the compiled code.
        torch._dynamo.reset()
        _flex_compiled.clear()
        _flex_compiled[shape] = torch.compile(flex_attention, dynamic=False)
    compiled = _flex_compiled[shape]
    bias_h, bias_w, width = x["bias_h"], x["bias_w"], shape.width

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score + bias_h[b, h, q_idx, kv_idx // width] + bias_w[b, h, q_idx, kv_idx % width]

    return lambda: compiled(x["q"], x["k"], x["v"], score_mod=score_mod, scale=scale)


def forward_fn(method: str, x: dict[str, Tensor], shape: Shape) -> Callable[[], Tensor]:
    """A call computing the attention of ``x`` with ``method``."""
    scale = shape.dkh**-0.5
    q, k, v, bias_h, bias_w = x["q"], x["k"], x["v"], x["bias_h"], x["bias_w"]
    h, w = shape.height, shape.width
    if method in aanet_kernels.BACKENDS:
        return lambda: aanet_kernels.attention_2d(
            q, k, v, bias_h, bias_w, height=h, width=w, scale=scale, backend=method
        )
    if method == "sdpa_dense":
        return lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=expand_bias_tables(bias_h, bias_w, h, w), scale=scale
        )
    if method == "sdpa_nobias":
        return lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)
    if method == "flex":
        return _flex_forward(x, shape, scale)
    raise ValueError(f"method: expected a backend or one of {BASELINES}, got {method!r}")


def mode_fns(
    forward: Callable[[], Tensor], x: dict[str, Tensor], mode: str
) -> tuple[Callable[..., Any], Callable[[], Any] | None]:
    """``(fn, setup)`` for ``common.time_fn``: what is timed in ``mode`` and what runs before it."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if mode == "fwd":

        def fwd() -> Tensor:
            with torch.no_grad():
                return forward()

        return fwd, None

    def clear_grads() -> None:
        for t in x.values():
            t.grad = None

    grad_out = None

    def grad_like(out: Tensor) -> Tensor:
        nonlocal grad_out
        if grad_out is None:
            grad_out = torch.randn_like(out)
        return grad_out

    if mode == "bwd":

        def forward_then_grad() -> tuple[Tensor, Tensor]:
            clear_grads()
            out = forward()
            return out, grad_like(out)

        return lambda pair: pair[0].backward(pair[1]), forward_then_grad

    def fwdbwd() -> None:
        clear_grads()
        out = forward()
        out.backward(grad_like(out))

    return fwdbwd, None


# ---------------------------------------------------------------- measuring


@dataclass
class Row:
    """One measurement: a shape, a method and a mode."""

    family: str
    shape: str
    batch: int
    heads: int
    height: int
    width: int
    length: int
    dkh: int
    dvh: int
    method: str
    mode: str
    dtype: str
    status: str = "ok"
    time_ms: float | None = None
    time_min_ms: float | None = None
    repeats: int | None = None
    tflops: float | None = None
    peak_mib: float | None = None
    roofline_pct: float | None = None
    roofline_bound: str | None = None


@dataclass(frozen=True)
class Settings:
    """How the run measures: repeats, what to skip, the dtype."""

    dtype: torch.dtype
    warmup: int
    repeats: int
    min_repeats: int
    budget_s: float
    max_dense_length: int | None


def prepare(
    shape: Shape, method: str, mode: str, device: torch.device, dtype: torch.dtype
) -> tuple[Callable[..., Any], Callable[[], Any] | None]:
    """Fresh inputs (requiring grad unless ``fwd``) and the ``(fn, setup)`` pair of the case."""
    x = make_inputs(shape, dtype, device)
    if mode != "fwd":
        for t in x.values():
            t.requires_grad_(True)
    return mode_fns(forward_fn(method, x, shape), x, mode)


def _skip_reason(
    method: str, mode: str, shape: Shape, device: torch.device, settings: Settings
) -> str | None:
    if method == "flex" and mode != "fwd" and device.type == "cpu":
        return "skipped (FlexAttention has no CPU backward)"
    limit = settings.max_dense_length
    if method in DENSE_METHODS and limit is not None and shape.length > limit:
        return f"skipped (L > --max-dense-length {limit})"
    return None


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_shape(
    shape: Shape,
    methods: Sequence[str],
    modes: Sequence[str],
    device: torch.device,
    settings: Settings,
) -> dict[tuple[str, str], common.Timing | str]:
    """Time every method on ``shape`` in each mode: a ``Timing``, or why there is none.

    Per mode, all methods share one set of inputs and are timed in rounds
    (``common.time_interleaved``), so a change of load on a shared machine hits them alike.
    """
    results: dict[tuple[str, str], common.Timing | str] = {}
    for mode in modes:
        x = make_inputs(shape, settings.dtype, device)
        if mode != "fwd":
            for t in x.values():
                t.requires_grad_(True)
        cases = {}
        for method in methods:
            skip = _skip_reason(method, mode, shape, device, settings)
            if skip:
                results[(method, mode)] = skip
            else:
                cases[method] = mode_fns(forward_fn(method, x, shape), x, mode)
        timings = common.time_interleaved(
            cases,
            device,
            warmup=settings.warmup,
            repeats=settings.repeats,
            min_repeats=settings.min_repeats,
            budget_s=settings.budget_s,
        )
        results.update({(method, mode): t for method, t in timings.items()})
        del x, cases
        _release(device)
    return results


def _one_call_memory(
    fn: Callable[..., Any], setup: Callable[[], Any] | None, device: torch.device, measured: bool
) -> int:
    state = setup() if setup is not None else None

    def call() -> Any:
        return fn() if setup is None else fn(state)

    if not measured:
        call()
        return 0
    return common.peak_memory(call, device)


def measure_memory(
    shape: Shape, method: str, modes: Sequence[str], device: torch.device, settings: Settings
) -> dict[str, int | str]:
    """Peak extra bytes of one call per mode (in this process: CUDA, or a CPU memory worker)."""
    results: dict[str, int | str] = {}
    for mode in modes:
        skip = _skip_reason(method, mode, shape, device, settings)
        if skip:
            results[mode] = skip
            continue
        try:
            fn, setup = prepare(shape, method, mode, device, settings.dtype)
            # The first call pays one-time costs (code pages, thread pools) that are not the op's.
            for measured in (False, True):
                results[mode] = _one_call_memory(fn, setup, device, measured)
        except Exception as error:  # recorded in the row's status; the other cases go on
            results[mode] = common.error_status(error)
        finally:
            _release(device)
    return results


def memory_worker_main() -> None:
    """The CPU memory worker: a JSON job on stdin, ``{"shape|method|mode": bytes}`` on stdout."""
    if not common.in_memory_worker():
        raise RuntimeError("--memory-worker: start it with benchmarks.common.run_worker")
    job = json.load(sys.stdin)
    device = torch.device(job["device"])
    settings = Settings(**{**job["settings"], "dtype": getattr(torch, job["settings"]["dtype"])})
    out: dict[str, int | str] = {}
    for item in job["cases"]:
        shape = Shape(**item["shape"])
        mem = measure_memory(shape, item["method"], job["modes"], device, settings)
        for mode, value in mem.items():
            out[f"{shape.label}|{item['method']}|{mode}"] = value
    print(json.dumps(out))


def cpu_memory(
    shapes: Sequence[Shape], methods: Sequence[str], modes: Sequence[str], settings: Settings
) -> dict[str, int | str]:
    """Peak memory of every case on the CPU, measured in one fresh worker process."""
    job = {
        "device": "cpu",
        "modes": list(modes),
        "settings": {**asdict(settings), "dtype": str(settings.dtype).removeprefix("torch.")},
        "cases": [{"shape": asdict(s), "method": m} for s in shapes for m in methods],
    }
    keys = [f"{s.label}|{m}|{mode}" for s in shapes for m in methods for mode in modes]
    return common.worker_memory(["-m", "benchmarks.bench_attention", "--memory-worker"], job, keys)


# ---------------------------------------------------------------- reporting


def build_rows(
    shapes: Sequence[Shape],
    methods: Sequence[str],
    modes: Sequence[str],
    timings: dict[tuple[str, str, str], common.Timing | str],
    memory: dict[str, int | str],
    ceilings: Ceilings,
    settings: Settings,
) -> list[Row]:
    """One ``Row`` per shape x method x mode with time, TFLOP/s, memory and roofline fraction."""
    elem = torch.empty((), dtype=settings.dtype).element_size()
    rows = []
    for shape in shapes:
        for method in methods:
            for mode in modes:
                row = Row(
                    shape.family, shape.label, shape.batch, shape.heads, shape.height, shape.width,
                    shape.length, shape.dkh, shape.dvh, method, mode,
                    str(settings.dtype).removeprefix("torch."),
                )  # fmt: skip
                timing = timings[(shape.label, method, mode)]
                mem = memory.get(f"{shape.label}|{method}|{mode}")
                if isinstance(timing, str):
                    row.status = timing
                else:
                    row.time_ms = timing.median_s * 1e3
                    row.time_min_ms = timing.min_s * 1e3
                    row.repeats = timing.repeats
                    row.tflops = flops(shape, mode) / timing.median_s / 1e12
                    ideal, bound = roofline_time(
                        flops(shape, mode),
                        exps(shape, mode),
                        ideal_bytes(shape, mode, elem),
                        ceilings,
                    )
                    row.roofline_pct = 100 * ideal / timing.median_s
                    row.roofline_bound = bound
                if isinstance(mem, int):
                    row.peak_mib = mem / 2**20
                elif isinstance(mem, str) and row.status == "ok":
                    row.status = f"memory {mem}"
                rows.append(row)
    return rows


def _ratio(num: float | None, den: float | None) -> str | None:
    if num is None or den is None or den == 0:
        return None
    return f"{num / den:.2f}x"


def render_markdown(
    rows: Sequence[Row], meta: dict[str, str], ceilings: Ceilings, preset: str, modes: Sequence[str]
) -> str:
    """Markdown: a header naming the machine, a table per mode, the issue-2 checks."""
    by_key = {(r.shape, r.method, r.mode): r for r in rows}
    lines = [
        f"# attention_2d benchmark: {meta['device_name']} ({meta['device']})",
        "",
        f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
        f"{meta['cpu_threads']} CPU threads (load average {meta['load_avg_1m']} at the start, "
        f"{meta.get('load_avg_1m_end', 'n/a')} at the end); "
        f"preset `{preset}`, dtype {rows[0].dtype}.",
        "",
        f"Ceilings measured in this run: matmul {ceilings.matmul_flops_per_s / 1e12:.3g} TFLOP/s "
        f"({ceilings.matmul_dtype}), exp {ceilings.exp_per_s / 1e9:.3g} G/s (fp32), copy "
        f"{ceilings.copy_bytes_per_s / 1e9:.3g} GB/s.",
        "",
        "Columns: median time; TFLOP/s (FlashAttention count); extra peak memory of one call; "
        "`vs ref` and `vs SDPA dense` = their time / this time (higher is better); `/ floor` = "
        "this time / SDPA without bias; `mem ref/this` = reference peak / this peak; roofline % "
        "of the ideal fused kernel and the ceiling that binds it.",
    ]
    header = [
        "shape", "method", "ms", "TFLOP/s", "peak MiB", "vs ref", "vs SDPA dense", "/ floor",
        "mem ref/this", "roofline %", "status",
    ]  # fmt: skip
    for mode in modes:
        table = []
        for r in (r for r in rows if r.mode == mode):
            ref = by_key.get((r.shape, "reference", mode))
            dense = by_key.get((r.shape, "sdpa_dense", mode))
            floor = by_key.get((r.shape, "sdpa_nobias", mode))
            table.append([
                r.shape, r.method, common.fmt(r.time_ms), common.fmt(r.tflops),
                common.fmt(r.peak_mib),
                _ratio(ref.time_ms if ref else None, r.time_ms),
                _ratio(dense.time_ms if dense else None, r.time_ms),
                _ratio(r.time_ms, floor.time_ms if floor else None),
                _ratio(ref.peak_mib if ref else None, r.peak_mib),
                None if r.roofline_pct is None else f"{r.roofline_pct:.2g} ({r.roofline_bound})",
                r.status,
            ])  # fmt: skip
        lines += ["", f"## {mode}", "", common.markdown_table(table, header)]
    checks = issue2_checks(rows)
    if checks:
        lines += ["", "## Issue-2 targets (B=8, Nh=8, H=W=32, dkh=16, forward+backward)", ""]
        lines += [f"- {c}" for c in checks]
    return "\n".join(lines) + "\n"


def issue2_checks(rows: Sequence[Row]) -> list[str]:
    """The issue-2 "Done when" numbers, where this run measured them."""

    def get(dvh: int, method: str) -> Row | None:
        for r in rows:
            if (r.batch, r.heads, r.height, r.width, r.dkh, r.dvh, r.method, r.mode) == (
                8, 8, 32, 32, 16, dvh, method, "fwdbwd",
            ):  # fmt: skip
                return r
        return None

    checks = []
    cpu8, ref8, cpu16, floor16 = (
        get(8, "cpu"),
        get(8, "reference"),
        get(16, "cpu"),
        get(16, "sdpa_nobias"),
    )
    if cpu8 and ref8 and cpu8.time_ms and ref8.time_ms:
        speed = ref8.time_ms / cpu8.time_ms
        checks.append(f"dvh=8, cpu vs reference time: {speed:.1f}x faster (target >= 8x): "
                      f"{'met' if speed >= 8 else 'NOT met'}")  # fmt: skip
    if cpu8 and ref8 and cpu8.peak_mib and ref8.peak_mib:
        mem = ref8.peak_mib / cpu8.peak_mib
        checks.append(f"dvh=8, cpu vs reference peak memory: {mem:.1f}x smaller (target >= 10x): "
                      f"{'met' if mem >= 10 else 'NOT met'}")  # fmt: skip
    if cpu16 and floor16 and cpu16.time_ms and floor16.time_ms:
        slow = cpu16.time_ms / floor16.time_ms
        checks.append(f"dvh=16, cpu time / SDPA without bias: {slow:.2f}x (target <= 2x): "
                      f"{'met' if slow <= 2 else 'NOT met'}")  # fmt: skip
    return checks


def write_plots(rows: Sequence[Row], modes: Sequence[str], stem: str, out_dir: Path) -> list[Path]:
    """A PNG per shape family: a panel per mode, time against L, a line per method."""
    paths = []
    for family in dict.fromkeys(r.family for r in rows):
        fam = [r for r in rows if r.family == family]
        series = {
            mode: {
                m: [
                    (r.length, r.time_ms)
                    for r in fam
                    if r.method == m and r.mode == mode and r.time_ms
                ]
                for m in dict.fromkeys(r.method for r in fam)
            }
            for mode in modes
        }
        first = fam[0]
        title = (f"{family}: B={first.batch} Nh={first.heads} dkh={first.dkh} dvh={first.dvh} "
                 f"{first.dtype}, {stem.removeprefix('attention_')}")  # fmt: skip
        paths.append(
            common.plot_family(
                series,
                title=title,
                xlabel="L = H x W",
                ylabel="median time (ms)",
                path=out_dir / f"{stem}_{family}.png",
            )  # fmt: skip
        )
    return paths


def remove_stale_plots(stem: str, out_dir: Path, written: Sequence[Path]) -> list[Path]:
    """Remove the PNGs of ``stem`` for families this run did not plot: drawn by an earlier run,
    they no longer match the table just written over it."""
    families = dict.fromkeys(s.family for shapes in PRESETS.values() for s in shapes)
    stale = [out_dir / f"{stem}_{family}.png" for family in families]
    removed = [path for path in stale if path not in written and path.is_file()]
    for path in removed:
        path.unlink()
    return removed


# ---------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=common.description(__doc__), allow_abbrev=False)
    parser.add_argument(
        "--device", default=common.default_device(), help="cpu or cuda (default: cuda if present)"
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="shape set (default: the device's)"
    )
    parser.add_argument(
        "--dtype", help="float32 | bfloat16 | float16 (default: float32 on cpu, bfloat16 on cuda)"
    )
    parser.add_argument("--methods", help="comma-separated subset of the methods available")
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated subset of fwd,bwd,fwdbwd"
    )
    parser.add_argument("--families", help="comma-separated subset of the preset's shape families")
    parser.add_argument(
        "--max-dense-length",
        type=common.positive_int,
        help="skip reference and sdpa_dense above this L",
    )
    common.add_timing_arguments(
        parser, warmup=1, budget_s=2.0, budget_help="seconds of timed calls per case"
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the peak-memory measurements"
    )
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--tag",
        type=common.file_tag,
        help="appended to the result files' names (attention_DEVICE_TAG)",
    )
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    common.check_timing_arguments(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Run the benchmark; returns the rows it wrote."""
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker_main()
        return []
    device = common.benchmark_device(args.device)
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if dtype_name not in ("float32", "bfloat16", "float16"):
        raise SystemExit(f"--dtype: expected float32, bfloat16 or float16, got {dtype_name!r}")
    families = common.pick_subset(
        args.families, list(dict.fromkeys(s.family for s in PRESETS[preset])), "families"
    )
    shapes = [s for s in PRESETS[preset] if s.family in families]
    methods = common.pick_subset(args.methods, methods_for(device), "methods")
    modes = common.pick_subset(args.modes, MODES, "modes")
    settings = Settings(
        getattr(torch, dtype_name), args.warmup, args.repeats, args.min_repeats, args.budget,
        args.max_dense_length,
    )  # fmt: skip
    out_dir = common.out_dir(args.out_dir)

    meta = common.run_metadata(device)
    print(f"attention_2d on {meta['device_name']}: preset {preset}, {dtype_name}, {methods}")
    ceilings = measure_ceilings(device, settings.dtype)
    timings: dict[tuple[str, str, str], common.Timing | str] = {}
    memory: dict[str, int | str] = {}
    for shape in shapes:
        for (method, mode), result in time_shape(shape, methods, modes, device, settings).items():
            timings[(shape.label, method, mode)] = result
            shown = (
                f"{result.median_s * 1e3:9.3f} ms" if isinstance(result, common.Timing) else result
            )
            print(f"  {shape.label:32s} {method:12s} {mode:7s} {shown}", flush=True)
        if device.type == "cuda" and not args.no_memory:
            for method in methods:
                for mode, value in measure_memory(shape, method, modes, device, settings).items():
                    memory[f"{shape.label}|{method}|{mode}"] = value
    if device.type == "cpu" and not args.no_memory:
        print("  measuring peak memory in a worker process ...", flush=True)
        memory = cpu_memory(shapes, methods, modes, settings)

    meta["load_avg_1m_end"] = common.run_metadata(device)["load_avg_1m"]
    rows = build_rows(shapes, methods, modes, timings, memory, ceilings, settings)
    stem = "_".join(filter(None, ("attention", common.device_slug(device), args.tag)))
    extra = {**meta, **{f"ceiling_{k}": v for k, v in ceilings.as_dict().items()}, "preset": preset}
    csv_path = common.write_csv([{**asdict(r), **extra} for r in rows], out_dir / f"{stem}.csv")
    md = render_markdown(rows, meta, ceilings, preset, modes)
    md_path = common.write_text(md, out_dir / f"{stem}.md")
    written = [csv_path, md_path]
    if not args.no_plot:
        written += write_plots(rows, modes, stem, out_dir)
    removed = remove_stale_plots(stem, out_dir, written)
    print(md)
    print("wrote " + ", ".join(str(p) for p in written))
    if removed:
        print(
            "removed the earlier plots of families not in this run: " + ", ".join(map(str, removed))
        )
    return rows


if __name__ == "__main__":
    common.run_cli(main)
