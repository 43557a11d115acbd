"""Shared benchmark helpers: device naming, timing, peak memory, and result files.

Every benchmark of the repository (attention, AA-Conv, training) uses these so that their numbers
are measured and written the same way:

- ``time_fn``: median wall time over repeats after warm-up; CUDA events on a GPU, ``perf_counter``
  on the CPU; an optional untimed ``setup`` before each call (e.g. the forward before a timed
  backward). ``time_interleaved``: the same for competing cases, timed in rounds so that a
  machine's changing load falls on all of them alike.
- ``peak_memory``: extra memory at the peak of one call, above what was allocated before it.
  CUDA: ``max_memory_allocated`` delta. CPU: see ``rss_peak_bytes`` (resident-set high-water mark,
  measured in a worker process started with ``memory_worker_env``). ``warm_peak_memory``: the
  same after an unmeasured first call, a failure as a status; ``worker_memory``: a worker's
  answer, or every case's reason when the worker died.
- ``run_metadata``, ``device_slug``: what keys a result (device, versions, date) and names its
  files.
- ``write_csv``, ``write_text``, ``markdown_table``, ``plot_family``: the files under
  ``benchmarks/results/``, each written whole or not at all (``aanet.files.replacing``).
- ``positive_int``, ``non_negative_int``, ``non_negative_float``, ``file_tag``, ``out_dir``,
  ``benchmark_device``: the command lines' checks, so that a bad argument is refused by name
  before anything is measured; ``run_cli``: such a refusal ends the command as argparse's do.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aanet.files import replacing

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# glibc returns a freed block to the OS only if it was mmap'ed. Fixing the mmap threshold (which
# also turns off glibc's dynamic raising of it) makes every block of 64 KiB or more its own mapping,
# so the resident set follows the live allocations and its high-water mark is the peak.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


def default_device() -> str:
    """``"cuda"`` when a GPU is present, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def benchmark_device(name: str) -> torch.device:
    """The ``--device`` of a benchmark; exits with a message when it names anything but the CPU or
    a GPU of this machine."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device: expected cpu or cuda, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SystemExit(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return device


def _number(kind: type, least: float, what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value >= least:  # NaN included
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


# argparse ``type=``s: "argument --repeats: expected a positive integer, got '0'".
positive_int = _number(int, 1, "a positive integer")
non_negative_int = _number(int, 0, "an integer >= 0")
non_negative_float = _number(float, 0.0, "a number >= 0")


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's ``main``: a refusal raised as ``SystemExit(message)`` ends it as argparse's
    own refusals do, ``PROG: error: message`` and exit status 2 (a message alone exits 1, which
    reads as a failed run rather than a bad command line)."""
    try:
        main()
    except SystemExit as refusal:
        if not isinstance(refusal.code, str):
            raise
        print(f"{Path(sys.argv[0]).name}: error: {refusal.code}", file=sys.stderr)
        raise SystemExit(2) from None


def description(doc: str | None, whole: bool = False) -> str:
    """A script's ``--help`` text from its docstring: the first paragraph (or all of it with
    ``whole``), the reST literal marks (double backquotes) taken out."""
    text = (doc or "").strip()
    return (text if whole else text.split("\n\n")[0]).replace("``", "")


def file_tag(text: str) -> str:
    """An argparse ``type=`` for a word put into result file names: letters, digits, ``-``."""
    if not re.fullmatch(r"[A-Za-z0-9-]+", text):
        raise argparse.ArgumentTypeError(f"expected letters, digits and '-' only, got {text!r}")
    return text


def add_timing_arguments(
    parser: argparse.ArgumentParser, *, warmup: int, budget_s: float, budget_help: str
) -> None:
    """``--warmup``, ``--repeats``, ``--min-repeats`` and ``--budget`` for ``time_interleaved``;
    check them after parsing with :func:`check_timing_arguments`."""
    parser.add_argument("--warmup", type=non_negative_int, default=warmup)
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--min-repeats", type=positive_int, default=3)
    parser.add_argument("--budget", type=non_negative_float, default=budget_s, help=budget_help)


def check_timing_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with the parser's error when ``--min-repeats`` exceeds ``--repeats``."""
    if args.min_repeats > args.repeats:
        parser.error(
            f"--min-repeats: expected at most --repeats ({args.repeats}), got {args.min_repeats}"
        )


def out_dir(path: Path, option: str = "--out-dir") -> Path:
    """``path`` created now, so that a run that would end unable to write its tables is refused
    before it measures anything: exits with a message naming ``option`` when ``path`` is a file,
    cannot be created, or cannot be written to."""
    if path.exists() and not path.is_dir():
        raise SystemExit(f"{option} {path}: expected a folder, got a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"{option} {path}: cannot create the folder ({error.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise SystemExit(f"{option} {path}: the folder is not writable")
    return path


def pick_subset(requested: str | None, available: Sequence[str], option: str) -> list[str]:
    """The comma-separated choice of ``--<option>`` (all of ``available`` when not given); exits
    with a message naming the option when it names anything else, or nothing."""
    if requested is None:
        return list(available)
    picked = list(dict.fromkeys(s.strip() for s in requested.split(",") if s.strip()))
    unknown = [p for p in picked if p not in available]
    if unknown or not picked:
        raise SystemExit(
            f"--{option}: expected a comma-separated subset of {list(available)}, got {requested!r}"
        )
    return picked


def device_name(device: torch.device | str) -> str:
    """Human name of the device: the GPU's name, or the CPU model from ``/proc/cpuinfo``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def slugify(text: str) -> str:
    """Lower-case, dash-separated, file-name-safe form of ``text``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device: torch.device | str) -> str:
    """``cpu-amd-epyc`` / ``cuda-nvidia-h100-80gb-hbm3``: the device part of result file names."""
    device = torch.device(device)
    return f"{device.type}-{slugify(device_name(device))}"


def run_metadata(device: torch.device | str) -> dict[str, str]:
    """What keys a benchmark run: device, its name, library versions, threads, load and date."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": str(torch.version.cuda),
        "python": platform.python_version(),
        "cpu_threads": str(torch.get_num_threads()),
        # Other processes' load skews CPU timings; keep it beside the numbers.
        "load_avg_1m": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work; a no-op on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Median and spread of the repeats of one measurement, in seconds."""

    median_s: float
    min_s: float
    max_s: float
    repeats: int


def error_status(error: BaseException) -> str:
    """A failed case's status for a results table: ``error: <type>: <first line>``, or ``out of
    memory``."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "out of memory"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"error: {type(error).__name__}: {first[:120]}"


def time_fn(
    fn: Callable[..., Any],
    device: torch.device | str,
    *,
    setup: Callable[[], Any] | None = None,
    warmup: int = 2,
    repeats: int = 10,
    min_repeats: int = 3,
    budget_s: float = 5.0,
) -> Timing:
    """Median time of ``fn`` after ``warmup`` untimed calls.

    Runs at least ``min_repeats`` and at most ``repeats`` timed calls, stopping early once
    ``budget_s`` of timed work has passed, so a slow case costs a few runs and a fast one many.
    With ``setup``, each call is ``fn(setup())`` and only ``fn`` is timed.
    """
    if min_repeats < 1 or repeats < min_repeats:
        raise ValueError(
            f"repeats, min_repeats: need 1 <= min_repeats <= repeats, got {repeats}, {min_repeats}"
        )
    device = torch.device(device)

    def call() -> None:
        if setup is None:
            fn()
        else:
            fn(setup())

    for _ in range(warmup):
        call()
    synchronize(device)
    times: list[float] = []
    while len(times) < repeats and (len(times) < min_repeats or sum(times) < budget_s):
        args = () if setup is None else (setup(),)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), max(times), len(times))


def time_interleaved(
    cases: dict[str, tuple[Callable[..., Any], Callable[[], Any] | None]],
    device: torch.device | str,
    *,
    warmup: int = 2,
    repeats: int = 10,
    min_repeats: int = 3,
    budget_s: float = 5.0,
) -> dict[str, Timing | str]:
    """``time_fn`` for several competing cases, one call of each per round.

    On a shared machine the load changes from second to second; timing the cases in rounds puts
    every case under the same conditions, so their ratios hold even when the absolute times drift.
    ``cases`` maps a name to ``(fn, setup)`` as in ``time_fn``. A case leaves the rounds once it
    has ``repeats`` samples, or ``min_repeats`` and ``budget_s`` of timed calls. A case that raises
    gets the error as a string instead of a ``Timing``.
    """
    if min_repeats < 1 or repeats < min_repeats:
        raise ValueError(
            f"repeats, min_repeats: need 1 <= min_repeats <= repeats, got {repeats}, {min_repeats}"
        )
    device = torch.device(device)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    failed: dict[str, str] = {}

    def one_call(name: str, timed: bool) -> None:
        fn, setup = cases[name]
        args = () if setup is None else (setup(),)
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn(*args)
            elapsed = time.perf_counter() - t0
        if timed:
            samples[name].append(elapsed)

    def active(name: str) -> bool:
        got = samples[name]
        enough = len(got) >= repeats or (len(got) >= min_repeats and sum(got) >= budget_s)
        return name not in failed and not enough

    for round_index in range(-warmup, repeats):
        for name in cases:
            if name in failed or (round_index >= 0 and not active(name)):
                continue
            try:
                one_call(name, timed=round_index >= 0)
            except Exception as error:  # one failing case must not cost the others' numbers
                failed[name] = error_status(error)
    return {
        name: failed.get(name) or Timing(statistics.median(got), min(got), max(got), len(got))
        for name, got in samples.items()
    }


def cuda_peak_bytes(fn: Callable[[], Any], device: torch.device | str) -> int:
    """Peak bytes allocated by the caching allocator during ``fn`` above what was live before it."""
    synchronize(device)
    gc.collect()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} field")


def rss_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak growth of this process's resident set while ``fn`` runs (Linux).

    Resets the high-water mark (``/proc/self/clear_refs`` = 5), runs ``fn``, and returns
    ``VmHWM - VmRSS(before)``. This counts every allocation of the call: tensors, a C++ kernel's own
    scratch, BLAS buffers. It is sound only in a process started with ``memory_worker_env()``
    (see ``_MALLOC_ENV``): with glibc's defaults, memory freed by an earlier case stays resident and
    is reused unseen. Run ``fn`` once before measuring so one-time costs (code pages, thread pools,
    library workspaces) are not counted.
    """
    gc.collect()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    return max(peak - before, 0) * 1024


def peak_memory(fn: Callable[[], Any], device: torch.device | str) -> int:
    """Extra bytes at the peak of one call of ``fn`` on ``device`` (see the module docstring)."""
    if torch.device(device).type == "cuda":
        return cuda_peak_bytes(fn, device)
    return rss_peak_bytes(fn)


def warm_peak_memory(make: Callable[[], Callable[[], Any]], device: torch.device) -> int | str:
    """``peak_memory`` of the call that ``make()`` builds, after one unmeasured call (one-time
    costs: thread pools, code pages, lazy init), or the error that stopped it as a status."""
    try:
        fn = make()
        fn()
        return peak_memory(fn, device)
    except Exception as error:  # recorded in the row's status; the other cases go on
        return error_status(error)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def memory_worker_env() -> dict[str, str]:
    """Environment for a process that measures CPU memory with ``rss_peak_bytes``."""
    env = dict(os.environ, **_MALLOC_ENV)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def in_memory_worker() -> bool:
    """Whether this process was started with ``memory_worker_env()``."""
    return all(os.environ.get(k) == v for k, v in _MALLOC_ENV.items())


def run_worker(args: Sequence[str], payload: Any, timeout_s: float | None = None) -> Any:
    """Run ``python <args>`` in a fresh process with ``memory_worker_env()``; JSON in and out.

    The payload goes to the worker's stdin as JSON; the worker prints its answer as JSON on the last
    line of stdout. Raises ``RuntimeError`` with the worker's stderr if it fails.
    """
    proc = subprocess.run(
        [sys.executable, *args],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        env=memory_worker_env(),
        timeout=timeout_s,
        cwd=REPO_ROOT,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(
            f"memory worker {args} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker_memory(args: Sequence[str], payload: Any, keys: Sequence[str]) -> dict[str, int | str]:
    """``run_worker`` for a memory worker whose answer is ``{key: bytes or reason}``: when the
    worker dies (a segfault, a timeout) every key gets that as its reason, so the timings already
    measured are still written, with the reason in their status column."""
    try:
        return run_worker(args, payload)
    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as error:
        print(f"memory worker failed; peak memory is not measured:\n{error}", file=sys.stderr)
        failed = str(error).splitlines()[0]
        return dict.fromkeys(keys, f"not measured: {failed}"[:160])


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write ``rows`` (dicts with the same keys) as CSV, creating the folder; whole or not at all
    (a failure while writing leaves ``path`` as it was)."""
    if not rows:
        raise ValueError("rows: expected at least one row to write")
    with replacing(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_text(text: str, path: Path) -> Path:
    """Write ``text`` to ``path``, creating the folder; whole or not at all."""
    with replacing(path) as tmp:
        tmp.write_text(text)
    return path


def markdown_table(rows: Iterable[Sequence[Any]], header: Sequence[str]) -> str:
    """A GitHub markdown table; ``None`` cells print as an en dash."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join("–" if c is None else str(c) for c in row) + " |")
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 3) -> str | None:
    """``value`` with ``digits`` significant digits, or ``None`` when absent."""
    return None if value is None else f"{value:.{digits}g}"


def plot_family(
    series: dict[str, dict[str, list[tuple[float, float]]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    path: Path,
    logy: bool = True,
) -> Path:
    """One PNG: a panel per key of ``series`` (e.g. a mode), a line of ``(x, y)`` per method;
    whole or not at all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(series)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for method, points in series[panel].items():
            if points:
                xs, ys = zip(*sorted(points), strict=True)
                ax.plot(xs, ys, marker="o", label=method)
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=110)  # the temporary name ends in .png: savefig's format
    finally:
        plt.close(fig)
    return path
