"""Profile an ``attention_2d`` call or an ``AAConv2d`` training step.

    python -m aanet_kernels.profile --op attention_2d --backend cpu --shape 8,8,32,32,16,8
    python -m aanet_kernels.profile --op aaconv --device cuda --backend triton
    ncu --profile-from-start off -o attn \\
        python -m aanet_kernels.profile --device cuda --backend triton --mode fwd --single-launch
    nsys profile --capture-range=cudaProfilerApi \\
        python -m aanet_kernels.profile --device cuda --single-launch

Default mode: after warm-up (compilation, autotuning), ``--steps`` iterations run under
``torch.profiler``; it writes a Chrome trace (open in https://ui.perfetto.dev or chrome://tracing)
and a table of the operators and kernels with the most self time, and prints the table. Each phase
of a step is a named range, a ``record_function`` for the profiler and, on CUDA, an NVTX range for
Nsight Systems: ``relative_logits``, ``attention_2d.forward``, ``attention_2d.backward`` for the op;
``aaconv.forward``, ``aaconv.backward``, ``optimizer.step`` for the layer.

``--single-launch``: no profiler; after warm-up, exactly one forward (``--mode fwd``), one backward
(``--mode bwd``) or one of each (``fwdbwd``) runs between ``cudaProfilerStart`` and
``cudaProfilerStop``, so that Nsight Compute (``--profile-from-start off``) or Nsight Systems
(``--capture-range=cudaProfilerApi``) records those kernels and nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from aanet_kernels.backends import BACKENDS, _why_unavailable, available_backends
from aanet_kernels.nn import AAConv2d
from aanet_kernels.ops import attention_2d
from aanet_kernels.relative import relative_logits

OPS = ("attention_2d", "aaconv")
MODES = ("fwd", "bwd", "fwdbwd")


@contextlib.contextmanager
def phase(name: str, device: torch.device) -> Iterator[None]:
    """A named range: ``record_function`` for torch.profiler and, on CUDA, NVTX for Nsight."""
    nvtx = device.type == "cuda"
    if nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()


@dataclass
class Step:
    """One unit of profiled work split at the forward/backward boundary."""

    forward: Callable[[], Tensor]
    backward: Callable[[Tensor], None]


def attention_step(
    shape: Sequence[int], backend: str, device: torch.device, dtype: torch.dtype
) -> Step:
    """``relative_logits`` then ``attention_2d`` on fresh random inputs; ``shape`` is
    ``(B, Nh, H, W, dkh, dvh)``."""
    batch, heads, height, width, dkh, dvh = shape
    length = height * width

    def leaf(*size: int) -> Tensor:
        return torch.randn(size, device=device, dtype=dtype, requires_grad=True)

    q, k, v = (
        leaf(batch, heads, length, dkh),
        leaf(batch, heads, length, dkh),
        leaf(batch, heads, length, dvh),
    )
    rel_h, rel_w = leaf(2 * height - 1, dkh), leaf(2 * width - 1, dkh)

    def forward() -> Tensor:
        with phase("relative_logits", device):
            bias_h, bias_w = relative_logits(q * dkh**-0.5, rel_h, rel_w, height, width)
        with phase("attention_2d.forward", device):
            return attention_2d(
                q,
                k,
                v,
                bias_h,
                bias_w,
                height=height,
                width=width,
                scale=dkh**-0.5,
                backend=backend,
            )

    grad = torch.randn(batch, heads, length, dvh, device=device, dtype=dtype)

    def backward(out: Tensor) -> None:
        with phase("attention_2d.backward", device):
            out.backward(grad)

    return Step(forward, backward)


def aaconv_step(
    shape: Sequence[int], backend: str, device: torch.device, dtype: torch.dtype
) -> Step:
    """A training step of one ``AAConv2d`` (3x3, ``Nh`` heads, ``dk = Nh * dkh``, ``dv = Nh * dvh``)
    on a ``(B, 2 Nh max(dkh, dvh), H, W)`` input: forward, backward of the mean square, SGD step."""
    batch, heads, height, width, dkh, dvh = shape
    channels = 2 * heads * max(dkh, dvh)
    layer = AAConv2d(
        channels, channels, 3, dk=heads * dkh, dv=heads * dvh, num_heads=heads, backend=backend,
        input_size=(height, width), device=device, dtype=dtype,
    )  # fmt: skip
    optimizer = torch.optim.SGD(layer.parameters(), lr=1e-3)
    x = torch.randn(batch, channels, height, width, device=device, dtype=dtype)

    def forward() -> Tensor:
        with phase("aaconv.forward", device):
            return layer(x)

    def backward(out: Tensor) -> None:
        with phase("aaconv.backward", device):
            out.float().square().mean().backward()
        with phase("optimizer.step", device):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return Step(forward, backward)


def build_step(
    op: str, shape: Sequence[int], backend: str, device: torch.device, dtype: torch.dtype
) -> Step:
    """The ``Step`` of ``op`` (``attention_2d`` or ``aaconv``)."""
    if op == "attention_2d":
        return attention_step(shape, backend, device, dtype)
    if op == "aaconv":
        return aaconv_step(shape, backend, device, dtype)
    raise ValueError(f"op: expected one of {OPS}, got {op!r}")


def run_step(step: Step, mode: str) -> None:
    """One forward (``fwd``, without autograd), or forward and backward."""
    if mode == "fwd":
        with torch.no_grad():
            step.forward()
    else:
        step.backward(step.forward())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def single_launch(step: Step, mode: str, device: torch.device) -> float:
    """Run the chosen launch once between ``cudaProfilerStart/Stop``; returns its wall time (s)."""
    out = None if mode == "fwd" else step.forward()  # the forward a lone backward needs
    _sync(device)
    if device.type == "cuda":
        torch.cuda.cudart().cudaProfilerStart()
    start = time.perf_counter()
    if mode == "fwd":
        with torch.no_grad():
            step.forward()
    elif mode == "bwd":
        step.backward(out)
    else:
        step.backward(step.forward())
    _sync(device)
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.cudart().cudaProfilerStop()
    return elapsed


def profile_steps(
    step: Step,
    mode: str,
    device: torch.device,
    steps: int,
    out_dir: Path,
    stem: str,
    row_limit: int,
) -> tuple[Path, Path, str]:
    """Run ``steps`` steps under ``torch.profiler``; write the Chrome trace and top-ops table."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(
        activities=activities, record_shapes=True, profile_memory=True
    ) as prof:
        for i in range(steps):
            with phase(f"step_{i}", device):
                run_step(step, mode)
        _sync(device)
    # aanet's atomic writer, imported here: only the profiler's files need it, not the kernels.
    from aanet.files import replacing

    trace = out_dir / f"{stem}.trace.json"
    with replacing(trace) as tmp:  # whole or not at all, as every result file of the repository
        prof.export_chrome_trace(str(tmp))
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)
    table_path = out_dir / f"{stem}.top.txt"
    with replacing(table_path) as tmp:
        tmp.write_text(table + "\n")
    return trace, table_path, table


def _shape(text: str) -> tuple[int, ...]:
    parts = text.split(",")
    if len(parts) != 6 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"expected six positive ints B,Nh,H,W,dkh,dvh, got {text!r}"
        )
    return tuple(int(p) for p in parts)


def _at_least(least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}")
        return value

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m aanet_kernels.profile",
        description=__doc__.split("\n\n")[0].replace("``", ""),  # no reST literal marks
        allow_abbrev=False,
    )
    parser.add_argument("--op", choices=OPS, default="attention_2d")
    parser.add_argument("--backend", choices=("auto",) + BACKENDS, default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"))
    parser.add_argument(
        "--shape", type=_shape, default=(8, 8, 32, 32, 16, 8), help="B,Nh,H,W,dkh,dvh"
    )
    parser.add_argument("--mode", choices=MODES, default="fwdbwd")
    parser.add_argument(
        "--warmup", type=_at_least(0), default=2, help="untimed steps first (compile, autotune)"
    )
    parser.add_argument("--steps", type=_at_least(1), default=3, help="profiled steps")
    parser.add_argument("--row-limit", type=_at_least(1), default=25)
    parser.add_argument("--out-dir", type=Path, default=Path("profiles"))
    parser.add_argument(
        "--single-launch", action="store_true", help="one launch for Nsight Compute"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device: expected cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available on this machine")
    if args.backend != "auto" and args.backend not in available_backends(device):
        raise SystemExit(f"--backend {args.backend}: {_why_unavailable(args.backend, device)}")
    if args.op == "aaconv" and args.mode == "bwd":
        raise SystemExit("--mode bwd: the aaconv step profiles fwd or fwdbwd")
    if not args.single_launch:  # checked before the warm-up, which may autotune for minutes
        if args.out_dir.exists() and not args.out_dir.is_dir():
            raise SystemExit(f"--out-dir {args.out_dir}: expected a folder, got a file")
        try:
            args.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SystemExit(
                f"--out-dir {args.out_dir}: cannot create the folder ({error.strerror})"
            ) from None
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    step = build_step(args.op, args.shape, args.backend, device, dtype)
    for _ in range(args.warmup):
        run_step(step, args.mode)
    _sync(device)
    if args.single_launch:
        elapsed = single_launch(step, args.mode, device)
        print(
            f"single launch of {args.op} {args.mode} ({args.backend}): {elapsed * 1e3:.3f} ms wall"
        )
        return
    shape = "x".join(str(s) for s in args.shape)
    stem = f"{args.op}_{args.backend}_{args.mode}_{shape}_{device.type}"
    trace, table_path, table = profile_steps(
        step, args.mode, device, args.steps, args.out_dir, stem, args.row_limit
    )
    print(table)
    print(f"wrote {trace} (open in https://ui.perfetto.dev) and {table_path}")


def _cli() -> None:
    """``main`` as a command: a refusal (``SystemExit(message)``) ends as argparse's do, with
    ``PROG: error: message`` and exit status 2 rather than the message alone and status 1."""
    try:
        main()
    except SystemExit as refusal:
        if not isinstance(refusal.code, str):
            raise
        print(f"python -m aanet_kernels.profile: error: {refusal.code}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    _cli()
