"""Roofline ceilings measured on the machine in the same run, and the roofline time of a workload.

Three ceilings, each measured once per run (``measure_ceilings``):

- matmul rate: FLOP/s of a large square ``torch.matmul`` in the benchmark dtype;
- exp rate: exponentials per second in fp32 (softmax statistics are fp32 in every backend). On a GPU
  a Triton kernel chains ``exp2`` in registers, so the special-function units, not memory, bound it;
  on the CPU ``torch.exp`` over a cache-resident buffer on one thread, times the thread count;
- copy bandwidth: bytes/s (read + write) of ``dst.copy_(src)`` on buffers far larger than caches.

The roofline time of a workload is the largest of ``flops / matmul rate``, ``exps / exp rate`` and
``bytes / bandwidth``; ``roofline time / measured time`` is the fraction of the roofline reached.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from benchmarks.common import synchronize, time_fn

try:
    import triton
    import triton.language as tl
except ImportError:  # the GPU exp ceiling needs Triton; the CPU one does not
    triton = None

if triton is not None:

    @triton.jit
    def _exp_chain(x_ptr, n, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        # x stays in [-1, 0): exp2 lands in [0.5, 1), times -0.75 back in [-0.75, -0.375).
        for _ in range(ITERS):
            x = tl.exp2(x) * -0.75
        tl.store(x_ptr + offs, x, mask=mask)


@dataclass(frozen=True)
class Ceilings:
    """Measured peak rates of one device."""

    matmul_flops_per_s: float
    exp_per_s: float
    copy_bytes_per_s: float
    matmul_dtype: str

    def as_dict(self) -> dict[str, float | str]:
        return asdict(self)


def _matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    timing = time_fn(
        lambda: torch.matmul(a, b, out=out), device, warmup=2, repeats=10, budget_s=1.0
    )
    return 2 * n**3 / timing.median_s


def _cuda_exp_rate(device: torch.device) -> float:
    if triton is None:
        raise RuntimeError("measuring the GPU exp ceiling needs triton, which is not installed")
    n, iters, block = 1 << 24, 256, 1024
    x = -torch.rand(n, device=device, dtype=torch.float32)
    grid = (triton.cdiv(n, block),)
    timing = time_fn(
        lambda: _exp_chain[grid](x, n, ITERS=iters, BLOCK=block),
        device,
        warmup=2,
        repeats=10,
        budget_s=1.0,
    )
    return n * iters / timing.median_s


def _cpu_exp_rate(device: torch.device) -> float:
    # 64 KiB: in cache. Timed on one thread (set, not left to ATen's parallel grain: with the
    # pool's threads woken per small call, a loaded machine timed their wake-ups, 70x under the
    # exp rate); the machine's rate is that times the threads.
    n, reps = 1 << 14, 500
    x = -torch.rand(n, device=device)
    out = torch.empty_like(x)

    def many() -> None:
        for _ in range(reps):
            torch.exp(x, out=out)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timing = time_fn(many, device, warmup=1, repeats=5, budget_s=1.0)
    finally:
        torch.set_num_threads(threads)
    return n * reps / timing.median_s * threads


def _copy_bandwidth(device: torch.device) -> float:
    numel = (1 << 28) if device.type == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of fp32
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, warmup=2, repeats=10, budget_s=1.0)
    return 2 * numel * 4 / timing.median_s


def measure_ceilings(device: torch.device | str, dtype: torch.dtype) -> Ceilings:
    """Measure the three ceilings on ``device``; matmuls in ``dtype``."""
    device = torch.device(device)
    exp_rate = _cuda_exp_rate(device) if device.type == "cuda" else _cpu_exp_rate(device)
    ceilings = Ceilings(
        matmul_flops_per_s=_matmul_rate(device, dtype),
        exp_per_s=exp_rate,
        copy_bytes_per_s=_copy_bandwidth(device),
        matmul_dtype=str(dtype).removeprefix("torch."),
    )
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ceilings


def roofline_time(
    flops: float, exps: float, nbytes: float, ceilings: Ceilings
) -> tuple[float, str]:
    """The least time the work can take on this device, and which ceiling binds."""
    bounds = {
        "matmul": flops / ceilings.matmul_flops_per_s,
        "exp": exps / ceilings.exp_per_s,
        "memory": nbytes / ceilings.copy_bytes_per_s,
    }
    bound = max(bounds, key=bounds.__getitem__)
    return bounds[bound], bound
