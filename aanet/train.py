"""``aanet train``: the training loop, single process or DDP under ``torchrun``."""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from aanet import checkpoint
from aanet.config import Config, check_device_name
from aanet.datasets import sources
from aanet.datasets.augment import AugmentConfig
from aanet.datasets.dataset import LandmarkDataset
from aanet.evaluate import amp_dtype, predict_errors, subset_report
from aanet.losses import build_training_loss
from aanet.metrics import summarize
from aanet.model import HEATMAP_STRIDE, build_model
from aanet_kernels import resolve_backend, use_backend

log = logging.getLogger("aanet.train")
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "history", "config")
CSV_FIELDS = (
    "epoch",
    "train_loss",
    "test_nme",
    "test_fr",
    "test_auc",
    "lr",
    "images_per_s",
    "seconds",
    "skipped_steps",
)


@dataclass
class Dist:
    """This process's place in a (possibly one-process) group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the ``torchrun`` group when ``WORLD_SIZE > 1`` (NCCL on GPUs, gloo on the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: the local GPU if there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    check_device_name(name)
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device: {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def attention_backend(name: str) -> contextlib.AbstractContextManager[None]:
    """``use_backend(name)``, except that ``auto`` (every command's default) enters nothing, so
    that ``AANET_KERNELS_BACKEND`` and a ``use_backend`` around the call still choose, as they do
    for any ``AAConv2d`` (``use_backend("auto")`` would override both)."""
    return contextlib.nullcontext() if name == "auto" else use_backend(name)


def _barrier(group: Dist) -> None:
    if group.world > 1:
        dist.barrier()


def make_loaders(config: Config, group: Dist) -> tuple[DataLoader, DataLoader, DistributedSampler]:
    """Augmented, sharded training loader and plain test loader."""
    if group.main:
        sources.prepare(config)
    _barrier(group)
    train_set = LandmarkDataset(
        sources.load_split(config, "train"), config.input_size, AugmentConfig(), seed=config.seed
    )
    test_set = LandmarkDataset(sources.load_split(config, "test"), config.input_size)
    # The sampler's shuffle depends only on (seed, epoch): a resumed run sees the same order.
    sampler = DistributedSampler(
        train_set, group.world, group.rank, shuffle=True, seed=config.seed, drop_last=True
    )
    per_rank = max(1, config.batch_size // group.world)
    if len(train_set) // group.world < per_rank:
        raise ValueError(
            f"batch_size: {config.batch_size} is more than the {len(train_set)} training images "
            f"allow ({group.world} process(es), {per_rank} images each per step, full batches "
            f"only): an epoch would take no step; lower --batch-size or add images"
        )
    common = {"num_workers": config.workers, "persistent_workers": config.workers > 0}
    train = DataLoader(train_set, per_rank, sampler=sampler, drop_last=True, **common)
    test = DataLoader(test_set, per_rank, shuffle=False, **common)
    return train, test, sampler


def follow_config(scheduler: torch.optim.lr_scheduler.CosineAnnealingLR, config: Config) -> None:
    """Make a loaded optimizer and cosine schedule train with the run's ``epochs``, ``lr`` and
    ``weight_decay`` (``load_state_dict`` brings back the checkpoint's). With another ``--epochs``
    or ``--lr`` the run continues on the new cosine from the current epoch (``--epochs 60`` after
    a 30-epoch run: one 60-epoch cosine, not the loaded one climbing back up): the learning rate
    is set to the new curve's value now and the scheduler's steps then follow that curve."""
    groups = scheduler.optimizer.param_groups
    for group in groups:
        group["weight_decay"] = config.weight_decay
    bases = [config.lr] * len(groups)
    if scheduler.T_max == config.epochs and scheduler.base_lrs == bases:
        return  # the loaded rate is already on this curve (re-placing it could move it an ulp)
    scheduler.T_max, scheduler.base_lrs = config.epochs, bases
    progress = min(scheduler.last_epoch, config.epochs) / config.epochs
    eta_min = scheduler.eta_min
    for group in groups:
        group["initial_lr"] = config.lr
        group["lr"] = eta_min + (config.lr - eta_min) * (1 + math.cos(math.pi * progress)) / 2


def loss_is_finite(loss: torch.Tensor, group: Dist) -> bool:
    """Whether the loss is finite on every rank (under DDP all ranks must skip a step together,
    or the gradient all-reduce of the others would wait forever)."""
    finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    if group.world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def mean_over_ranks(total: float, steps: int, device: torch.device) -> float:
    """``total / steps`` with both summed over the ranks of an initialised group: under DDP the
    mean over every rank's steps, not over this rank's shard only."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return total / max(1, steps)
    sums = torch.tensor([total, float(steps)], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    return sums[0].item() / max(1.0, sums[1].item())


def handle_nonfinite_loss(
    policy: str, loss: torch.Tensor, epoch: int, step: int, saved: Path
) -> None:
    """``on_nan``: ``stop`` raises an error naming the step, ``skip`` logs and drops the step."""
    where, value = f"epoch {epoch}, step {step}", float(loss.detach())
    if policy == "stop":
        last = (
            f"the last completed epoch is in {saved} (resume with --resume)"
            if saved.is_file()
            else "no epoch has completed yet"
        )
        raise FloatingPointError(
            f"non-finite loss ({value:g}, here or on another rank) at {where}; {last}; pass "
            f"--on-nan skip to drop such steps instead"
        )
    log.warning("non-finite loss (%g) at %s: step skipped (--on-nan skip)", value, where)


def _write_csv(path: Path, history: list[dict[str, float]]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    """PNG of the training loss and the test NME per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(epochs, [row["train_loss"] for row in history], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", yscale="log", title="loss")
    right.plot(epochs, [100 * row["test_nme"] for row in history], marker="o", color="C1")
    right.set(xlabel="epoch", ylabel="NME (%)", title="test NME (inter-ocular)")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(
    config: Config, resume: str | None = None, progress: bool = True, stop_after: int | None = None
) -> dict[str, Any]:
    """Train as configured; returns the final test metrics and the history.

    Every epoch ends with an evaluation, a CSV row, a plot and an atomic checkpoint
    ``<out>/last.pt`` holding model, optimizer, scheduler, RNG states and the epoch, so that
    ``resume`` (a path, or ``"auto"`` for ``<out>/last.pt``) continues exactly. ``stop_after``
    ends this call after that many epochs, as an interruption would (the tests use it).
    """
    group = init_distributed(torch.device("cuda" if config.device.startswith("cuda") else "cpu"))
    device = pick_device(config.device, group.local_rank)
    if config.attention:  # a backend that cannot run on this device fails before the data is read
        resolve_backend(config.backend, device)
    out = Path(config.out)
    if group.main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model = build_model(config.model_config()).to(device)  # before the data: a bad shape fails fast
    train_loader, test_loader, sampler = make_loaders(config, group)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda")
    history: list[dict[str, float]] = []
    start = 0
    if resume:
        path = out / "last.pt" if resume == "auto" else Path(resume)
        state = checkpoint.load(path, map_location=device)
        checkpoint.require(state, RESUME_KEYS, path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        follow_config(scheduler, config)
        scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        history, start = state["history"], state["epoch"] + 1
        if group.main:
            log.info("resumed from %s at epoch %d", path, start)
    net = (
        DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        if group.world > 1
        else model
    )
    # Only the training forward (and with it the backward) is compiled: evaluation runs the plain
    # model, other batch sizes and no_grad would each be another graph for little time.
    train_net = net if config.compile == "none" else torch.compile(net, backend=config.compile)
    loss_fn = build_training_loss(config.loss, config.heatmap_reg)

    with attention_backend(config.backend):
        last = config.epochs if stop_after is None else min(config.epochs, start + stop_after)
        for epoch in range(start, last):
            sampler.set_epoch(epoch)
            train_loader.dataset.set_epoch(epoch)
            model.train()
            began, seen, total, skipped = time.perf_counter(), 0, 0.0, 0
            bar = tqdm(
                train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                disable=not (progress and group.main), dynamic_ncols=True,
            )  # fmt: skip
            for step, batch in enumerate(bar, start=1):
                images = batch["image"].to(device, non_blocking=True)
                target = batch["landmarks"].to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp_dtype(device), enabled=config.amp):
                    coords, _, logits = train_net(images)
                loss = loss_fn(coords.float(), logits, target, HEATMAP_STRIDE)
                optimizer.zero_grad(set_to_none=True)
                if not loss_is_finite(loss, group):
                    handle_nonfinite_loss(config.on_nan, loss, epoch + 1, step, out / "last.pt")
                    skipped += 1
                    continue
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                seen += len(images) * group.world
                total += float(loss.detach())
                rate = seen / (time.perf_counter() - began)
                bar.set_postfix(loss=f"{total / (step - skipped):.4g}", img_s=f"{rate:.1f}")
            trained_lr = optimizer.param_groups[0]["lr"]  # step() sets the next epoch's
            scheduler.step()
            if group.world > 1:
                # DDP keeps parameters in step but each rank's BatchNorm statistics follow its own
                # last batch: take rank 0's, so that every replica is the checkpointed model.
                for buffer in model.buffers():
                    dist.broadcast(buffer, 0)
            seconds = time.perf_counter() - began
            train_loss = mean_over_ranks(total, len(train_loader) - skipped, device)
            row = {
                "epoch": epoch + 1, "train_loss": train_loss, "skipped_steps": skipped,
                "lr": trained_lr, "images_per_s": seen / seconds,
                "seconds": seconds,
            }  # fmt: skip
            if group.main:
                metrics = summarize(
                    predict_errors(model, test_loader, device, config.amp).face_errors
                )
                row.update(test_nme=metrics["nme"], test_fr=metrics["fr"], test_auc=metrics["auc"])
                history.append(row)
                log.info(
                    "epoch %d: loss %.4g, test NME %.2f%%, FR %.2f%%, AUC %.4f, %.1f img/s",
                    epoch + 1, row["train_loss"], 100 * metrics["nme"], 100 * metrics["fr"],
                    metrics["auc"], row["images_per_s"],
                )  # fmt: skip
                state = {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "rng": checkpoint.rng_state(), "epoch": epoch, "history": history,
                    "config": config.to_dict(),
                }  # fmt: skip
                checkpoint.save_atomic(state, out / "last.pt")
                _write_csv(out / "log.csv", history)
                plot_curves(history, out / "curves.png")
            _barrier(group)

    result: dict[str, Any] = {"history": history, "out": str(out), "model": model}
    if group.main:
        result["report"] = subset_report(predict_errors(model, test_loader, device, config.amp))
    return result
