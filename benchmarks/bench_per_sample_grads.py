"""Benchmark per-sample gradients (as in DP-SGD) of an ``AAConv2d`` layer: ``torch.func`` against a
loop over the samples, on each ``attention_2d`` backend.

For a batch of ``N`` samples, every parameter's gradient of each sample's loss (the squared
output against a fixed random target), ``N`` gradients per parameter. Methods:

- ``vmap_<backend>``: ``torch.func.vmap(torch.func.grad(loss))`` over the samples, parameters
  through ``torch.func.functional_call``; the fused ops fold the mapped dim into their batch, so
  this is one fused forward and backward on ``N`` samples.
- ``compiled_<backend>``: the same under ``torch.compile(fullgraph=True)`` (Inductor; compiled
  before timing), from torch 2.14 on: torch 2.11's Inductor corrupts memory (or the gradients)
  compiling it, on every backend, the pure-PyTorch reference included (the relative logits'
  index gather; pytorch/pytorch#188084 reports the like).
- ``loop_<backend>``: one forward and ``backward()`` per sample (batch 1), gradients stacked:
  what a user writes without ``torch.func``.

The per-sample gradients of every method are checked against ``loop_reference`` before timing
(a method that disagrees is reported, not timed). Time: median over repeats after warm-up, the
methods timed in interleaved rounds (``benchmarks.common.time_interleaved``). Peak memory: the
extra bytes at the peak of one call (CUDA allocator; CPU resident set in a fresh worker process,
``benchmarks.common.rss_peak_bytes``). Ratios are against ``vmap_reference``, the ``torch.func``
path a user has without a fused kernel, measured in the same run.

    python benchmarks/bench_per_sample_grads.py                 # CPU: N = 16, 64 channels
    python benchmarks/bench_per_sample_grads.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

import aanet_kernels  # noqa: E402
from aanet_kernels.nn import AAConv2d  # noqa: E402
from benchmarks import common  # noqa: E402

BASELINE = "vmap_reference"
ORACLE = "loop_reference"


@dataclass(frozen=True)
class Case:
    """``samples`` inputs of ``channels x size x size`` through an ``AAConv2d(channels,
    channels, 3, dk, dv, heads)``."""

    samples: int
    channels: int
    size: int
    dk: int = 16
    dv: int = 16
    heads: int = 4

    @property
    def label(self) -> str:
        return f"N{self.samples} C{self.channels} {self.size}x{self.size}"

    def layer(self, device: torch.device, backend: str) -> AAConv2d:
        return AAConv2d(
            self.channels, self.channels, 3, dk=self.dk, dv=self.dv, num_heads=self.heads,
            backend=backend, input_size=self.size, device=device,
        )  # fmt: skip


# torch.compile of vmap(grad) over the layer, where Inductor gets it right (module docstring).
COMPILES = torch.torch_version.TorchVersion(torch.__version__) >= (2, 14)


def methods_for(device: torch.device) -> list[str]:
    backends = aanet_kernels.available_backends(device)
    kinds = ("vmap", "compiled", "loop") if COMPILES else ("vmap", "loop")
    return [f"{kind}_{backend}" for backend in backends for kind in kinds]


def make_per_sample_grads(
    case: Case, method: str, device: torch.device
) -> Callable[[], dict[str, Tensor]]:
    """A function computing ``{parameter name: (N, *shape) gradients}`` for ``method``, on fixed
    random inputs and weights (the same for every method)."""
    kind, backend = method.split("_", 1)
    torch.manual_seed(0)
    layer = case.layer(device, backend)
    x = torch.randn(case.samples, case.channels, case.size, case.size, device=device)
    target = torch.randn_like(x)
    params = {name: p.detach() for name, p in layer.named_parameters()}

    def sample_loss(p: dict[str, Tensor], xi: Tensor, ti: Tensor) -> Tensor:
        out = functional_call(layer, p, (xi.unsqueeze(0),))
        return (out - ti.unsqueeze(0)).square().sum()

    if kind in ("vmap", "compiled"):
        per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
        if kind == "compiled":
            per_sample = torch.compile(per_sample, fullgraph=True)
        return lambda: per_sample(params, x, target)

    def loop() -> dict[str, Tensor]:
        grads: dict[str, list[Tensor]] = {name: [] for name in params}
        for xi, ti in zip(x, target, strict=True):
            loss = (layer(xi.unsqueeze(0)) - ti.unsqueeze(0)).square().sum()
            for name, g in zip(
                params, torch.autograd.grad(loss, list(layer.parameters())), strict=True
            ):
                grads[name].append(g)
        return {name: torch.stack(g) for name, g in grads.items()}

    return loop


def disagreement(found: dict[str, Tensor], expected: dict[str, Tensor]) -> float:
    """The largest relative error over the parameters' per-sample gradients."""
    return max(
        ((found[n] - e).abs().max() / e.abs().max().clamp_min(1e-12)).item()
        for n, e in expected.items()
    )


def measure_memory(case: Case, method: str, device: torch.device) -> int | str:
    """Peak extra bytes of one call (after an unmeasured one), or why there is none."""
    return common.warm_peak_memory(lambda: make_per_sample_grads(case, method, device), device)


def check_method(
    case: Case, method: str, device: torch.device, expected: dict[str, Tensor]
) -> tuple[Callable[[], dict[str, Tensor]] | None, str]:
    """``method``'s function and ``"ok"`` when its per-sample gradients match ``expected``; else
    no function and why (wrong gradients, or the error it raised)."""
    try:
        fn = make_per_sample_grads(case, method, device)
        error = disagreement(fn(), expected)
    except Exception as failure:  # e.g. a compiler error: recorded, the other methods go on
        return None, common.error_status(failure)
    if error < 1e-4:
        return fn, "ok"
    return None, f"wrong: relative error {error:.2g}"


def memory_worker_main() -> None:
    """CPU memory worker: a JSON job on stdin, ``{"label|method": bytes or why none}`` on
    stdout."""
    if not common.in_memory_worker():
        raise RuntimeError("--memory-worker: start it with benchmarks.common.run_worker")
    out = {}
    for item in json.load(sys.stdin):
        case = Case(**item["case"])
        out[f"{case.label}|{item['method']}"] = measure_memory(
            case, item["method"], torch.device("cpu")
        )
    print(json.dumps(out))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=common.description(__doc__), allow_abbrev=False)
    parser.add_argument("--device", default=common.default_device())
    parser.add_argument(
        "--samples", type=common.positive_int, default=None, help="N (default: 16 CPU, 64 GPU)"
    )
    parser.add_argument("--channels", type=common.positive_int, default=64)
    parser.add_argument("--sizes", type=common.positive_int, nargs="+", default=[16, 28])
    parser.add_argument("--methods", help="comma-separated, e.g. vmap_cpu,loop_cpu")
    parser.add_argument("--warmup", type=common.non_negative_int, default=1)
    parser.add_argument("--repeats", type=common.positive_int, default=7)
    parser.add_argument(
        "--budget", type=common.non_negative_float, default=10.0, help="seconds per method"
    )
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:  # the layer's own rules (dv < channels, ...), before anything runs
        Case(1, args.channels, 1).layer(torch.device("meta"), "reference")
    except ValueError as error:
        parser.error(f"--channels {args.channels}: {error}")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    """Run the benchmark; returns the rows it wrote."""
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker_main()
        return []
    device = common.benchmark_device(args.device)
    methods = common.pick_subset(args.methods, methods_for(device), "methods")
    samples = args.samples or (16 if device.type == "cpu" else 64)
    # One case per size: a repeated size would repeat its rows, the ratios all against the first.
    cases = [Case(samples, args.channels, size) for size in dict.fromkeys(args.sizes)]
    meta = common.run_metadata(device)

    rows: list[dict[str, object]] = []
    measured: list[tuple[Case, dict[str, object]]] = []  # the timed rows, for memory
    out_dir = common.out_dir(args.out_dir)
    for case in cases:
        timed, status = {}, {}
        try:
            expected = make_per_sample_grads(case, ORACLE, device)()
        except Exception as error:  # nothing to check the methods against: none is timed
            expected = None
            status = dict.fromkeys(methods, f"{ORACLE} failed: {common.error_status(error)}")
        for method in methods if expected is not None else ():
            fn, status[method] = check_method(case, method, device, expected)
            if fn is not None:
                timed[method] = (fn, None)
        timings = common.time_interleaved(
            timed, device, warmup=args.warmup, repeats=args.repeats,
            min_repeats=min(3, args.repeats), budget_s=args.budget,
        )  # fmt: skip
        for method in methods:
            row: dict[str, object] = {**asdict(case), "method": method, "status": status[method]}
            timing = timings.get(method)
            if isinstance(timing, str):
                row["status"] = timing
            elif timing is not None:
                row["time_ms"] = timing.median_s * 1e3
                measured.append((case, row))
            rows.append(row)
            print(f"{case.label:>16} {method:>16}: {common.fmt(row.get('time_ms'))} ms "
                  f"{row['status']}", flush=True)  # fmt: skip

    if not args.no_memory:
        if device.type == "cpu":
            jobs = [{"case": asdict(case), "method": row["method"]} for case, row in measured]
            worker = ["-m", "benchmarks.bench_per_sample_grads", "--memory-worker"]
            keys = [f"{case.label}|{row['method']}" for case, row in measured]
            peaks = common.worker_memory(worker, jobs, keys)
        else:
            peaks = {
                f"{case.label}|{row['method']}": measure_memory(case, str(row["method"]), device)
                for case, row in measured
            }
        for case, row in measured:
            peak = peaks[f"{case.label}|{row['method']}"]
            if isinstance(peak, int):
                row["peak_mib"] = peak / 2**20
            else:
                row["status"] = f"memory {peak}"
    write_results(rows, meta, out_dir, device)
    return rows


def _ratio(num: object, den: object) -> str | None:
    if not isinstance(num, float) or not isinstance(den, float) or den == 0:
        return None
    return f"{num / den:.2f}x"


def write_results(
    rows: Sequence[dict[str, object]], meta: dict[str, str], out_dir: Path, device: torch.device
) -> None:
    """``per_sample_grads_<device>.{csv,md}``: the rows, with time and memory ratios against the
    ``vmap_reference`` row of the same case."""
    table = []
    for r in rows:
        base = next((b for b in rows if b["method"] == BASELINE and b["size"] == r["size"]), {})
        table.append([
            f"N{r['samples']} C{r['channels']} {r['size']}x{r['size']}", r["method"],
            common.fmt(r.get("time_ms")), common.fmt(r.get("peak_mib")),
            _ratio(base.get("time_ms"), r.get("time_ms")),
            _ratio(base.get("peak_mib"), r.get("peak_mib")), r["status"],
        ])  # fmt: skip
    header = ["case", "method", "ms", "peak MiB", "speed vs vmap_reference"]
    header += ["memory: vmap_reference / this", "status"]
    stem = f"per_sample_grads_{common.device_slug(device)}"
    first = rows[0]
    md = (
        f"# Per-sample gradients of an AAConv2d layer: {meta['device_name']} ({meta['device']})"
        f"\n\n{meta['date']}; torch {meta['torch']}, {meta['cpu_threads']} CPU threads, float32. "
        f"`AAConv2d(C, C, 3, dk={first['dk']}, dv={first['dv']}, num_heads={first['heads']})`, "
        "relative logits on; each of N samples' gradient of every parameter. `vmap_*`: "
        "`torch.func.vmap(grad(loss))`; `compiled_*`: that under `torch.compile(fullgraph=True)` "
        "(Inductor, compiled before timing); `loop_*`: one backward per sample. Every method's "
        "gradients were checked against `loop_reference` before timing.\n\n"
        + common.markdown_table(table, header)
        + "\n"
    )
    keys = list(dict.fromkeys(k for r in rows for k in r))
    common.write_csv(
        [{**{k: r.get(k) for k in keys}, **meta} for r in rows], out_dir / f"{stem}.csv"
    )
    common.write_text(md, out_dir / f"{stem}.md")
    print(md)


if __name__ == "__main__":
    common.run_cli(main)
