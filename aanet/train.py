"""``aanet train``: the training loop, single process or DDP under ``torchrun``."""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
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
from aanet.datasets.dataset import EpochIndices, LandmarkDataset
from aanet.datasets.records import BadDataLog, DataError
from aanet.evaluate import amp_dtype, predict_errors, subset_report
from aanet.files import remove_stale_temporaries, replacing
from aanet.losses import build_training_loss
from aanet.metrics import summarize
from aanet.model import HEATMAP_STRIDE, build_model
from aanet.ranks import is_main_process, local_rank, rank_and_world
from aanet_kernels import resolve_backend, use_backend

log = logging.getLogger("aanet.train")
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "history", "config")
# Options that, changed on --resume, make the rest of the run differ from an uninterrupted one
# (other images, order, augmentation, loss or arithmetic): it goes on with them, and says so.
# Options of the network's shape are refused instead; epochs, lr and weight_decay are followed
# (follow_config); the others (paths, workers, policies, backend) do not change the training.
NOT_EXACT_ON_RESUME = (
    "data", "num_train", "num_test", "image_size", "seed", "batch_size", "loss", "heatmap_reg",
    "amp",
)  # fmt: skip
LOCK_NAME = ".aanet-train.lock"
# What a run writes into --out each epoch.
OUTPUTS = ("last.pt", "log.csv", "curves.png")
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
    "skipped_faces",
    "normalization",
)


@dataclass
class Dist:
    """This process's place in a (possibly one-process) group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0


def init_distributed(device: torch.device) -> Dist:
    """Join the ``torchrun`` group when ``WORLD_SIZE > 1`` (NCCL on GPUs, gloo on the CPU)."""
    if rank_and_world()[1] == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank())


def pick_device(name: str, local_rank: int = 0, world: int = 1) -> torch.device:
    """``auto``: the local GPU if there is one, else the CPU. A GPU without an index is
    ``local_rank``'s; one with an index is refused when ``world > 1`` (it would put every rank
    of a ``torchrun`` launch on the same GPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    check_device_name(name)
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device: {name!r} requested but CUDA is not available")
        if device.index is not None and world > 1:
            raise ValueError(
                f"device: {name!r} would put all {world} processes on one GPU; under torchrun "
                f"pass --device cuda (or auto): each process takes the GPU of its LOCAL_RANK"
            )
        if device.index is None:
            device = torch.device("cuda", local_rank)
        check_gpu_index(device, name, world)
        torch.cuda.set_device(device)
    return device


def check_gpu_index(device: torch.device, name: str, world: int) -> None:
    """Refuse a GPU this process cannot see, naming what to change: CUDA's own error is "invalid
    device ordinal" and four lines of advice on asynchronous kernel errors, and under ``torchrun``
    it is what ``--nproc-per-node`` above the number of GPUs gives."""
    count = torch.cuda.device_count()
    if device.index < count:
        return
    visible = f"{count} GPU(s) visible (cuda:0 to cuda:{count - 1})" if count else "no GPU visible"
    if world > 1:
        raise ValueError(
            f"device: {name!r} on a rank of LOCAL_RANK {device.index} needs GPU {device.index}, "
            f"and this machine has {visible}: give torchrun --nproc-per-node {count} at most"
        )
    raise ValueError(f"device: {name!r} requested, and this machine has {visible}")


def attention_backend(name: str) -> contextlib.AbstractContextManager[None]:
    """``use_backend(name)``, except that ``auto`` (every command's default) enters nothing, so
    that ``AANET_KERNELS_BACKEND`` and a ``use_backend`` around the call still choose, as they do
    for any ``AAConv2d`` (``use_backend("auto")`` would override both)."""
    return contextlib.nullcontext() if name == "auto" else use_backend(name)


def _barrier(group: Dist) -> None:
    if group.world > 1:
        dist.barrier()


def per_rank_batch(batch_size: int, world: int) -> int:
    """The images each of ``world`` ranks takes a step: ``batch_size`` is the step's total, so it
    must split evenly (7 over 2 ranks would silently train with steps of 6)."""
    if batch_size % world:
        nearest = max(world, round(batch_size / world) * world)
        raise ValueError(
            f"batch_size: {batch_size} images a step do not split evenly over {world} processes "
            f"(each takes an equal share); give a multiple of {world}, e.g. {nearest}"
        )
    return batch_size // world


def make_loaders(config: Config, group: Dist) -> tuple[DataLoader, DataLoader, EpochIndices]:
    """Augmented, sharded training loader, plain test loader, and the training sampler (its
    ``set_epoch`` chooses the epoch's order and augmentations, in the worker processes too)."""
    per_rank = per_rank_batch(config.batch_size, group.world)  # before any data is made
    sources.check_sources(config)
    if is_main_process():
        sources.prepare(config)
    _barrier(group)
    train_set = LandmarkDataset(
        sources.load_split(config, "train"), config.input_size, AugmentConfig(), config.seed,
        config.on_error,
    )  # fmt: skip
    test_set = LandmarkDataset(
        sources.load_split(config, "test"), config.input_size, on_error=config.on_error
    )
    # The sampler's shuffle depends only on (seed, epoch): a resumed run sees the same order.
    # The epoch goes with each index: a worker's copy of the dataset would keep its first epoch.
    sampler = EpochIndices(
        DistributedSampler(
            train_set, group.world, group.rank, shuffle=True, seed=config.seed, drop_last=True
        )
    )
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


def mean_over_ranks(loss: torch.Tensor, group: Dist) -> float:
    """This step's loss averaged over the ranks, non-finite if any rank's is. It is the one
    all-reduce (of one number) a step needs anyway: under DDP all ranks must skip or stop at a
    non-finite loss together, or the gradient all-reduce of the others would wait forever."""
    value = loss.detach().to(torch.float64).reshape(1)
    if group.world > 1:
        dist.all_reduce(value)
    return value.item() / group.world


def nonfinite_losses(loss: torch.Tensor, group: Dist) -> str:
    """The non-finite losses and, under DDP, their ranks (``nan on rank 1``). Every rank calls
    this at the same step (all see the non-finite mean), so the gather, paid only then, is safe."""
    value = loss.detach().to(torch.float64).reshape(1)
    if group.world == 1:
        return f"{value.item():g}"
    values = [torch.empty_like(value) for _ in range(group.world)]
    dist.all_gather(values, value)
    named = [(rank, v.item()) for rank, v in enumerate(values) if not math.isfinite(v.item())]
    return ", ".join(f"{v:g} on rank {rank}" for rank, v in named)


def saved_so_far(saved: Path) -> str:
    """What a run that stops now leaves: the checkpoint ``saved`` to resume from, or nothing."""
    if saved.is_file():
        return f"the last completed epoch is in {saved} (resume with --resume)"
    return "no epoch has completed yet"


def handle_nonfinite_loss(policy: str, losses: str, epoch: int, step: int, saved: Path) -> None:
    """``on_nan``: ``stop`` raises an error naming the step, ``skip`` logs and drops the step;
    ``losses`` is what :func:`nonfinite_losses` says."""
    where = f"epoch {epoch}, step {step}"
    if policy == "stop":
        raise FloatingPointError(
            f"non-finite loss ({losses}) at {where}; {saved_so_far(saved)}; pass "
            f"--on-nan skip to drop such steps instead"
        )
    log.warning("non-finite loss (%s) at %s: step skipped (--on-nan skip)", losses, where)


def gather_left_out(mine: list[str], group: Dist) -> list[str]:
    """The faces every rank left out this epoch (``"left_out"`` of its samples), for rank 0 to
    report. Every rank calls this once an epoch: a gather only where some rank found one would
    leave the others waiting."""
    if group.world == 1:
        return mine
    every: list[list[str] | None] = [None] * group.world
    dist.all_gather_object(every, mine)
    return [error for errors in every for error in errors or ()]


def report_left_out(errors: list[str], reported: set[str], source: str, faces: int) -> None:
    """Log the faces of ``errors`` not yet in ``reported`` (each file once a run) and add them;
    ``faces`` is the size of the set they were left out of."""
    new = [error for error in dict.fromkeys(errors) if error not in reported]
    reported.update(new)
    BadDataLog("skip", new).summarize(source, faces - len(reported))


@contextlib.contextmanager
def claim_out(out: Path) -> Iterator[None]:
    """Rank 0's hold on the run folder ``out`` while the run lasts (a lock the system drops when
    the process ends, however it ends). Refused at once, before any data is read: a folder that
    cannot be written (found otherwise at the first checkpoint, an epoch later) and one another
    run holds (two runs would interleave their epochs in one ``last.pt`` and ``log.csv``).
    What a run killed while writing an output left (its temporary file) is removed."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out: {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise OSError(f"out: cannot write to {out} ({error.strerror or error})") from error
    try:
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no lock
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(handle, 32, 0).decode(errors="replace").strip()
                raise RuntimeError(
                    f"out: another aanet train{f' (pid {holder})' if holder else ''} is writing "
                    f"to {out}; wait for it to end or give another --out"
                ) from None
            os.ftruncate(handle, 0)
            os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
        try:
            tempfile.TemporaryFile(dir=out).close()  # the lock may be an old file: try a new one
        except OSError as error:
            raise OSError(f"out: cannot write to {out} ({error.strerror or error})") from error
        for written in OUTPUTS:  # a run killed while writing one left its temporary file
            remove_stale_temporaries(out / written)
        yield
    finally:
        os.close(handle)  # and with it the lock


def check_resume(state: dict[str, Any], config: Config, path: Path, group: Dist) -> None:
    """Refuse a checkpoint whose network ``config`` does not describe (its weights would not
    load), and warn (rank 0) when the run goes on with options that make it differ from an
    uninterrupted one: another data set, seed, batch size, loss, ``--amp`` or number of
    processes."""
    checkpoint.require(state, RESUME_KEYS, path)
    from aanet.inference import saved_config

    trained = saved_config(state, path)
    config.check_same_model(trained, path, uses="--resume continues that network")
    changed = [
        (name, getattr(trained, name), getattr(config, name))
        for name in NOT_EXACT_ON_RESUME
        if getattr(config, name) != getattr(trained, name)
    ]
    world = state.get("world")  # absent from older checkpoints
    if world is not None and world != group.world:
        changed.append(("processes", world, group.world))
    if changed and is_main_process():
        log.warning(
            "resuming with %s (%s was trained with %s): the run goes on with them, but not as "
            "the uninterrupted run would have",
            ", ".join(f"{name}={new}" for name, _, new in changed), path,
            ", ".join(f"{name}={old}" for name, old, _ in changed),
        )  # fmt: skip


def _write_csv(path: Path, history: list[dict[str, Any]]) -> None:
    with replacing(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(history)


@contextlib.contextmanager
def _write_errors_name(saved: Path) -> Iterator[None]:
    """An epoch's outputs that cannot be written (``out`` made read-only, the disk full) end the
    run: the error also says what it leaves (each output is replaced whole or not at all)."""
    try:
        yield
    except OSError as error:
        # strerror: the message without the "[Errno 13] " that str() puts before it.
        raise type(error)(f"{error.strerror or error}; {saved_so_far(saved)}") from error


@contextlib.contextmanager
def _data_errors_name(saved: Path) -> Iterator[None]:
    """Under ``on_error="stop"`` an image that does not decode ends the run: the error also says
    what it leaves (the checkpoint of the last completed epoch is kept as it was)."""
    try:
        yield
    except DataError as error:
        raise DataError(
            f"{error}; {saved_so_far(saved)}; pass --on-error skip to leave such faces out"
        ) from error


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """PNG of the training loss and the test NME per epoch (its normalisation in the title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    try:
        _draw_curves(left, right, epochs, history)
        fig.tight_layout()
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:  # a figure left open would stay in pyplot's registry for the whole run
        plt.close(fig)


def _draw_curves(left: Any, right: Any, epochs: list[int], history: list[dict[str, Any]]) -> None:
    left.plot(epochs, [row["train_loss"] for row in history], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", yscale="log", title="loss")
    right.plot(epochs, [100 * row["test_nme"] for row in history], marker="o", color="C1")
    # A row from before the normalisation was recorded was measured inter-ocular.
    used = dict.fromkeys(row.get("normalization") or "inter-ocular" for row in history)
    right.set(xlabel="epoch", ylabel="NME (%)", title=f"test NME ({', '.join(used)})")
    for axis in (left, right):
        axis.grid(alpha=0.3)


def train(
    config: Config, resume: str | None = None, progress: bool = True, stop_after: int | None = None
) -> dict[str, Any]:
    """Train as configured; returns the final test metrics and the history.

    Every epoch ends with an evaluation, a CSV row, a plot and an atomic checkpoint
    ``<out>/last.pt`` holding model, optimizer, scheduler, RNG states and the epoch, so that
    ``resume`` (a path, or ``"auto"`` for ``<out>/last.pt``) continues exactly. ``stop_after``
    ends this call after that many epochs, as an interruption would (the tests use it).
    """
    # The device first (torchrun's LOCAL_RANK picks the GPU): it decides the backend, and
    # `auto` on a GPU machine is NCCL's.
    device = pick_device(config.device, local_rank(), rank_and_world()[1])
    if config.attention:  # a backend that cannot run on this device fails before the data is read
        resolve_backend(config.backend, device)
    group = init_distributed(device)
    out = Path(config.out)
    with claim_out(out) if is_main_process() else contextlib.nullcontext():
        if not resume and is_main_process() and (out / "last.pt").is_file():
            log.warning(
                "%s holds an earlier run: this one starts over and replaces it (and log.csv, "
                "curves.png) when its first epoch ends; --resume continues it instead, another "
                "--out keeps both",
                out / "last.pt",
            )
        return _train(config, resume, progress, stop_after, device, group, out)


def _train(
    config: Config, resume: str | None, progress: bool, stop_after: int | None,
    device: torch.device, group: Dist, out: Path,
) -> dict[str, Any]:  # fmt: skip
    torch.manual_seed(config.seed)
    model = build_model(config.model_config()).to(device)  # before the data: a bad shape fails fast
    state: dict[str, Any] = {}
    if resume:  # read before the data too: a missing, damaged or unfitting file fails fast
        path = out / "last.pt" if resume == "auto" else Path(resume)
        state = checkpoint.load(path, map_location=device)
        check_resume(state, config, path, group)
        model.load_state_dict(state["model"])
    train_loader, test_loader, sampler = make_loaders(config, group)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda")
    history: list[dict[str, Any]] = []
    start = 0
    # Faces whose image did not decode, each named once a run: kept in the checkpoint, so that a
    # resumed run does not name them again (it still tries them: a replaced file trains again).
    train_left_out: set[str] = set()
    test_left_out: set[str] = set()
    if resume:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        follow_config(scheduler, config)
        if state["scaler"] or not scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        # else a run trained without a scaler (no --amp, or on a CPU) resumed with --amp on a
        # GPU: the new scaler starts at its initial scale (loading the disabled one's empty state
        # is torch's error "The source state dict is empty")
        checkpoint.set_rng_state(state["rng"])
        history, start = state["history"], state["epoch"] + 1
        named = state.get("named_bad_faces", {})  # absent from older checkpoints
        train_left_out.update(named.get("train", ()))
        test_left_out.update(named.get("test", ()))
        if is_main_process() and start < config.epochs:
            log.info("resumed from %s after epoch %d of %d", path, start, config.epochs)
        elif is_main_process():
            log.warning(
                "%s: its %d epoch(s) are done and --epochs is %d: nothing to train (give a "
                "larger --epochs to train on); evaluating it",
                path, start, config.epochs,
            )  # fmt: skip
    net = (
        DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        if group.world > 1
        else model
    )
    # Only the training forward (and with it the backward) is compiled: evaluation runs the plain
    # model, other batch sizes and no_grad would each be another graph for little time.
    train_net = net if config.compile == "none" else torch.compile(net, backend=config.compile)
    loss_fn = build_training_loss(config.loss, config.heatmap_reg)

    with attention_backend(config.backend), _data_errors_name(out / "last.pt"):
        last = config.epochs if stop_after is None else min(config.epochs, start + stop_after)
        for epoch in range(start, last):
            sampler.set_epoch(epoch)
            model.train()
            began, seen, total, skipped, left_out = time.perf_counter(), 0, 0.0, 0, []
            bar = tqdm(
                train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                disable=not (progress and is_main_process()), dynamic_ncols=True,
            )  # fmt: skip
            for step, batch in enumerate(bar, start=1):
                left_out.extend(error for error in batch["left_out"] if error)
                images = batch["image"].to(device, non_blocking=True)
                target = batch["landmarks"].to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp_dtype(device), enabled=config.amp):
                    coords, _, logits = train_net(images)
                loss = loss_fn(coords.float(), logits, target, HEATMAP_STRIDE)
                optimizer.zero_grad(set_to_none=True)
                step_loss = mean_over_ranks(loss, group)
                if not math.isfinite(step_loss):
                    losses = nonfinite_losses(loss, group)
                    handle_nonfinite_loss(config.on_nan, losses, epoch + 1, step, out / "last.pt")
                    skipped += 1
                    continue
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                seen += len(images) * group.world
                total += step_loss  # so the bar shows what log.csv will: every rank's mean
                rate = seen / (time.perf_counter() - began)
                bar.set_postfix(loss=f"{total / (step - skipped):.4g}", img_s=f"{rate:.1f}")
            trained_lr = optimizer.param_groups[0]["lr"]  # step() sets the next epoch's
            with warnings.catch_warnings():
                # After an epoch whose steps were all skipped (or, under fp16, all left out by
                # the gradient scaler) torch warns that the schedule "skips its first value":
                # it follows the epochs here, so that is what it should do.
                warnings.filterwarnings(
                    "ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning
                )
                scheduler.step()
            left_out = gather_left_out(left_out, group)
            if group.world > 1:
                # DDP keeps parameters in step but each rank's BatchNorm statistics follow its own
                # last batch: take rank 0's, so that every replica is the checkpointed model.
                for buffer in model.buffers():
                    dist.broadcast(buffer, 0)
            seconds = time.perf_counter() - began
            trained_steps = len(train_loader) - skipped
            # No step trained (--on-nan skip skipped them all): no loss to report, not a loss of 0.
            train_loss = total / trained_steps if trained_steps else math.nan
            if not trained_steps and is_main_process():
                log.warning(
                    "epoch %d: every step was skipped (non-finite loss): train_loss is NaN",
                    epoch + 1,
                )
            row = {
                "epoch": epoch + 1, "train_loss": train_loss, "skipped_steps": skipped,
                "skipped_faces": len(left_out), "lr": trained_lr, "images_per_s": seen / seconds,
                "seconds": seconds, "normalization": config.normalization,
            }  # fmt: skip
            if is_main_process():
                report_left_out(
                    left_out, train_left_out, f"epoch {epoch + 1}: training faces whose image "
                    "does not decode (each replaced in its batch by the next face)",
                    len(train_loader.dataset),
                )  # fmt: skip
                tested = predict_errors(
                    model, test_loader, device, config.amp, config.normalization
                )
                report_left_out(
                    list(tested.left_out), test_left_out, f"epoch {epoch + 1}: test faces whose "
                    "image does not decode (left out of the metrics)", len(test_loader.dataset),
                )  # fmt: skip
                metrics = summarize(tested.face_errors)
                row.update(test_nme=metrics["nme"], test_fr=metrics["fr"], test_auc=metrics["auc"])
                history.append(row)
                faces = f", {metrics['count']} of {len(test_loader.dataset)} faces"
                log.info(
                    "epoch %d: loss %.4g, test NME %.2f%% (%s%s), FR %.2f%%, AUC %.4f, %.1f img/s",
                    epoch + 1, row["train_loss"], 100 * metrics["nme"], config.normalization,
                    faces if tested.left_out else "", 100 * metrics["fr"], metrics["auc"],
                    row["images_per_s"],
                )  # fmt: skip
                state = {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "rng": checkpoint.rng_state(), "epoch": epoch, "history": history,
                    "config": config.to_dict(), "world": group.world,
                    "named_bad_faces": {
                        "train": sorted(train_left_out), "test": sorted(test_left_out)
                    },
                }  # fmt: skip
                with _write_errors_name(out / "last.pt"):
                    checkpoint.save_atomic(state, out / "last.pt")
                    _write_csv(out / "log.csv", history)
                    plot_curves(history, out / "curves.png")
            _barrier(group)

    result: dict[str, Any] = {"history": history, "out": str(out), "model": model}
    if is_main_process():
        tested = predict_errors(model, test_loader, device, config.amp, config.normalization)
        result["report"] = subset_report(tested)
    return result
