"""Training steps, exact resume, DDP replicas, prediction and export, on tiny models."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from aanet.cli import main
from aanet.config import Config
from aanet.datasets import synthetic, wflw
from aanet.datasets.augment import AugmentConfig
from aanet.datasets.dataset import LandmarkDataset
from aanet.datasets.wflw import load_wflw
from aanet.export import export
from aanet.inference import load_model
from aanet.losses import build_loss, heatmap_divergence
from aanet.model import HEATMAP_STRIDE, ModelConfig, build_model
from aanet.train import pick_device, train
from aanet_kernels import reference, use_backend

HERE = Path(__file__).parent


def tiny_config(tmp: Path, **changes) -> Config:
    config = Config(
        data_root=str(tmp / "data"), num_train=16, num_test=8, image_size=64, input_size=32,
        width=16, blocks=[1, 1, 1], batch_size=8, epochs=2, device="cpu", out=str(tmp / "run"),
    )  # fmt: skip
    return dataclasses.replace(config, **changes)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Config:
    config = tiny_config(tmp_path_factory.mktemp("trained"), epochs=1)
    train(config, progress=False)
    return config


@pytest.mark.parametrize("attention", [True, False], ids=["attention", "no-attention"])
def test_a_few_steps_lower_the_loss(tmp_path, attention):
    torch.manual_seed(0)
    root = synthetic.generate(tmp_path, synthetic.SyntheticConfig(8, 1, 64))
    data = LandmarkDataset(load_wflw(root, "train"), 32, AugmentConfig())
    batch = torch.utils.data.default_collate([data[i] for i in range(8)])
    model = build_model(ModelConfig(input_size=32, width=16, blocks=(1, 1, 1), attention=attention))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = build_loss("mse")
    losses = []
    for _ in range(12):
        coords, _, logits = model(batch["image"])
        loss = loss_fn(coords, logits, batch["landmarks"], HEATMAP_STRIDE)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_heatmap_regulariser_sharpens_the_maps_and_raises_confidence(tmp_path):
    torch.manual_seed(0)
    root = synthetic.generate(tmp_path, synthetic.SyntheticConfig(8, 1, 64))
    data = LandmarkDataset(load_wflw(root, "train"), 32, AugmentConfig())
    batch = torch.utils.data.default_collate([data[i] for i in range(8)])
    model = build_model(ModelConfig(input_size=32, width=16, blocks=(1, 1, 1)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    divergences, confidences = [], []
    for _ in range(20):
        _, confidence, logits = model(batch["image"])
        loss = heatmap_divergence(logits, batch["landmarks"], HEATMAP_STRIDE)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        divergences.append(loss.item())
        confidences.append(confidence.median().item())
    assert divergences[-1] < 0.5 * divergences[0], divergences
    assert confidences[-1] > 2 * confidences[0], confidences


def test_attention_flag_switches_the_layer():
    from aanet_kernels import AAConv2d

    with_attention = build_model(ModelConfig(input_size=32, width=16, blocks=(1, 1, 1)))
    without = build_model(ModelConfig(input_size=32, width=16, blocks=(1, 1, 1), attention=False))
    assert any(isinstance(m, AAConv2d) for m in with_attention.modules())
    assert not any(isinstance(m, AAConv2d) for m in without.modules())


def test_model_outputs_and_backends_agree():
    model = build_model(ModelConfig(input_size=32, width=16, blocks=(1, 1, 1))).eval()
    torch.nn.init.normal_(model.head[-1].weight, std=0.1)  # non-flat maps
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), use_backend("reference"):
        coords, confidence, logits = model(x)
        assert coords.shape == (2, 98, 2) and confidence.shape == (2, 98)
        assert logits.shape == (2, 98, 8, 8)
        assert ((confidence > 0) & (confidence <= 1)).all()
        assert ((coords >= -0.5) & (coords <= 31.5)).all()
    with torch.no_grad():
        auto, _, _ = model(x)
    torch.testing.assert_close(auto, coords, atol=1e-4, rtol=1e-4)


def test_resume_equals_uninterrupted(tmp_path):
    straight = train(tiny_config(tmp_path / "a"), progress=False)
    interrupted = tiny_config(tmp_path / "b")
    train(interrupted, progress=False, stop_after=1)
    assert len(json.loads(json.dumps(torch.load(Path(interrupted.out) / "last.pt",
                                                weights_only=False)["history"]))) == 1  # fmt: skip
    resumed = train(interrupted, resume="auto", progress=False)
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [r["train_loss"] for r in straight["history"]] == [
        r["train_loss"] for r in resumed["history"]
    ]
    rows = (Path(interrupted.out) / "log.csv").read_text().splitlines()
    assert len(rows) == 3 and (Path(interrupted.out) / "curves.png").stat().st_size > 0


def test_worker_processes_augment_each_epoch_as_one_process_does(tmp_path):
    """Until 2026-12-01 a loader with workers (``--workers``; 8 in the gpu preset) augmented every
    epoch as its first: the persistent workers kept the copy of the dataset they started with,
    whose epoch ``set_epoch`` no longer reached (and a resumed run differed from a straight one)."""
    a = train(tiny_config(tmp_path / "a"), progress=False)["model"].state_dict()
    b = train(tiny_config(tmp_path / "b", workers=1), progress=False)["model"].state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_with_more_epochs_continues_one_longer_cosine(tmp_path):
    """``--epochs 3 --resume`` after a 1-epoch run: epochs 2 and 3 follow the 3-epoch cosine
    (the loaded 1-epoch schedule would climb back to the peak)."""
    first = tiny_config(tmp_path, epochs=1)
    train(first, progress=False)
    resumed = train(dataclasses.replace(first, epochs=3), resume="auto", progress=False)
    lrs = [row["lr"] for row in resumed["history"]]
    cosine = [first.lr * (1 + np.cos(np.pi * e / 3)) / 2 for e in (1, 2)]
    assert lrs[0] == first.lr  # the 1-epoch run's only epoch
    assert lrs[1:] == pytest.approx(cosine, abs=1e-12)


def test_resume_with_another_lr_and_weight_decay_trains_with_them(tmp_path):
    """``--resume --lr 2e-3 --weight-decay 1e-4`` after an epoch at 1e-3 and no decay: the
    optimizer and schedule take the new values (``load_state_dict`` would bring back the old ones
    while the checkpoint's config recorded the new), the rate on the new base's cosine."""
    first = tiny_config(tmp_path, epochs=3)
    train(first, progress=False, stop_after=1)
    second = dataclasses.replace(first, lr=2e-3, weight_decay=1e-4)
    resumed = train(second, resume="auto", progress=False, stop_after=1)
    lrs = [row["lr"] for row in resumed["history"]]
    assert lrs[0] == first.lr
    assert lrs[1] == pytest.approx(second.lr * (1 + np.cos(np.pi / 3)) / 2, abs=1e-12)
    saved = torch.load(Path(first.out) / "last.pt", weights_only=False)
    assert saved["config"] == second.to_dict()
    assert saved["scheduler"]["base_lrs"] == [second.lr]
    for group in saved["optimizer"]["param_groups"]:
        assert group["weight_decay"] == second.weight_decay and group["initial_lr"] == second.lr
        # After epoch 2's step: the rate epoch 3 trains with.
        assert group["lr"] == pytest.approx(second.lr * (1 + np.cos(2 * np.pi / 3)) / 2, abs=1e-12)


def test_the_lr_column_is_the_rate_the_epoch_trained_with(trained):
    """Epoch 1 trains at ``lr`` itself (the rate after ``scheduler.step()`` is the next epoch's:
    0 after a 1-epoch run's only epoch)."""
    saved = torch.load(Path(trained.out) / "last.pt", weights_only=False)
    assert [row["lr"] for row in saved["history"]] == [trained.lr]
    rows = (Path(trained.out) / "log.csv").read_text().splitlines()
    column = rows[0].split(",").index("lr")
    assert float(rows[1].split(",")[column]) == trained.lr


def test_a_batch_larger_than_the_training_set_is_refused(tmp_path):
    with pytest.raises(ValueError, match="batch_size: 32 is more than the 16 training images"):
        train(tiny_config(tmp_path, batch_size=32), progress=False)


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(tmp_path):
    """Until 2026-12-01 ``--batch-size 7`` on 2 processes trained with steps of 6, unsaid."""
    from aanet.train import Dist, make_loaders

    with pytest.raises(ValueError, match="batch_size: 7 images a step do not split evenly over 2"):
        make_loaders(tiny_config(tmp_path, batch_size=7), Dist(rank=0, world=2))
    assert not (tmp_path / "data").exists()  # refused before the data was generated


def test_a_backend_that_cannot_run_here_is_refused_before_the_data_is_read(tmp_path):
    # On the CPU device the cuda backend cannot run: refused before the synthetic set is drawn.
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        train(tiny_config(tmp_path, backend="cuda"), progress=False)
    assert not (tmp_path / "data").exists()


def test_compiled_training_follows_eager_training(tmp_path, monkeypatch):
    # aot_eager traces the step as Inductor would (Dynamo, AOT autograd, the fused op in the
    # graph) without minutes of code generation; tests/test_aaconv.py runs Inductor itself.
    torch._dynamo.reset()
    eager = train(tiny_config(tmp_path / "eager", epochs=1), progress=False)
    compilers = []
    real_compile = torch.compile

    def recording_compile(model, **options):
        compilers.append(options.get("backend"))
        return real_compile(model, **options)

    monkeypatch.setattr(torch, "compile", recording_compile)
    compiled = train(
        tiny_config(tmp_path / "compiled", epochs=1, compile="aot_eager"), progress=False
    )
    assert compilers == ["aot_eager"]
    a, b = eager["model"].state_dict(), compiled["model"].state_dict()
    assert list(a) == list(b), "a compiled model's checkpoint must keep the plain parameter names"
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    saved = torch.load(Path(compiled["out"]) / "last.pt", weights_only=False)
    assert saved["config"]["compile"] == "aot_eager" and list(saved["model"]) == list(a)


def resumable_copy(trained: Config, tmp: Path, **changes) -> Config:
    """``trained``'s config with ``changes``, its ``last.pt`` copied to a fresh ``out``."""
    config = dataclasses.replace(trained, out=str(tmp / "run"), **changes)
    Path(config.out).mkdir(parents=True)
    shutil.copy(Path(trained.out) / "last.pt", Path(config.out) / "last.pt")
    return config


def test_resume_refuses_another_network_or_a_missing_file_before_the_data_is_read(
    trained, tmp_path
):
    """Until 2026-12-02 ``--resume --width 32`` on a width-16 checkpoint drew (or read) the data
    first and then ended with torch's ``load_state_dict`` error, some 130 lines; a missing
    ``last.pt`` was found after the data too."""
    config = resumable_copy(trained, tmp_path, width=32, data_root=str(tmp_path / "data"))
    with pytest.raises(ValueError, match=r"width: .* was trained with width=16; --resume contin"):
        train(config, resume="auto", progress=False)
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nothing.pt"):
        train(config, resume=str(tmp_path / "nothing.pt"), progress=False)
    assert not (tmp_path / "data").exists()


def test_resume_of_a_finished_run_says_there_is_nothing_to_train(trained, tmp_path, caplog):
    """Until 2026-12-02 it logged "resumed ... at epoch 1" (the next epoch, counted from 0) and
    evaluated without a word. A temporary checkpoint that a run killed while writing it left
    behind is removed."""
    import logging

    config = resumable_copy(trained, tmp_path)
    stale = Path(config.out) / ".last.pt.k1ll3d.tmp.pt"  # as aanet.files names it
    stale.write_bytes(b"half a checkpoint")
    caplog.set_level(logging.INFO, "aanet")
    result = train(config, resume="auto", progress=False)
    assert "its 1 epoch(s) are done and --epochs is 1: nothing to train" in caplog.text
    assert "resumed from" not in caplog.text and len(result["history"]) == 1
    assert not stale.exists()


def test_resume_with_options_that_change_the_run_says_so(trained, tmp_path, caplog):
    """Another batch size, loss or number of processes trains on (the README's promise of an
    exact continuation is for the same options), with a warning naming them."""
    config = resumable_copy(trained, tmp_path)
    train(config, resume="auto", progress=False, stop_after=0)
    assert "resuming with" not in caplog.text  # the same options, 1 process: nothing to say
    saved = torch.load(Path(config.out) / "last.pt", weights_only=False)
    saved["world"] = 2  # as a 2-process run writes it
    torch.save(saved, Path(config.out) / "last.pt")
    changed = dataclasses.replace(config, batch_size=4, loss="l1")
    train(changed, resume="auto", progress=False, stop_after=0)
    assert re.search(
        r"resuming with batch_size=4, loss=l1, processes=1 \(.* was trained with batch_size=8, "
        r"loss=mse, processes=2\): the run goes on with them",
        caplog.text,
    ), caplog.text


def test_resume_with_amp_of_a_run_trained_without_it_trains_on(trained, tmp_path, monkeypatch):
    """Until 2026-12-06 ``--resume --amp`` on a GPU of a run trained without ``--amp`` (or on a
    CPU) stopped with torch's "The source state dict is empty, possibly because it was saved
    from a disabled instance of GradScaler", where the README promises a warning and training on.
    The GPU's enabled scaler is stood in for by an enabled CPU one."""
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: real("cpu"))
    config = resumable_copy(trained, tmp_path, amp=True, epochs=2)
    result = train(config, resume="auto", progress=False)
    assert [row["epoch"] for row in result["history"]] == [1, 2]
    saved = torch.load(Path(config.out) / "last.pt", weights_only=False)
    assert saved["scaler"]["scale"] > 0  # the new scaler's state, saved for the next resume


def test_a_second_run_into_the_same_out_is_refused(tmp_path):
    """Until 2026-12-02 two runs given one ``--out`` both trained, each replacing the other's
    ``last.pt``, ``log.csv`` and ``curves.png`` every epoch. The lock (what a running ``aanet
    train`` holds) is taken here by the test."""
    import fcntl

    config = tiny_config(tmp_path)
    Path(config.out).mkdir(parents=True)
    held = os.open(Path(config.out) / ".aanet-train.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(held, b"4242\n")
        with pytest.raises(RuntimeError, match=r"another aanet train \(pid 4242\) is writing to"):
            train(config, progress=False)
    finally:
        os.close(held)
    assert not (tmp_path / "data").exists()  # refused before the data was drawn


def test_an_out_that_cannot_be_written_is_refused_before_training(tmp_path, monkeypatch):
    """Until 2026-12-02 a read-only ``--out`` was found at the first checkpoint, after a whole
    epoch. (As root, which may write anywhere, a refused file creation stands in for it.)"""
    import tempfile

    config = tiny_config(tmp_path)
    Path(config.out).mkdir(parents=True)
    real = tempfile.TemporaryFile

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == Path(config.out):
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    Path(config.out).chmod(0o555)
    try:
        with pytest.raises(OSError, match=r"out: cannot write to .*run \(Permission denied\)"):
            train(config, progress=False)
    finally:
        Path(config.out).chmod(0o755)
    assert not (tmp_path / "data").exists()


def test_checkpoint_is_written_atomically(tmp_path):
    from aanet.checkpoint import save_atomic

    save_atomic({"x": torch.arange(3)}, tmp_path / "c.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind
    assert torch.equal(torch.load(tmp_path / "c.pt")["x"], torch.arange(3))
    # The mode a plain file gets (the temporary file was private, 0600).
    (tmp_path / "plain").write_text("")
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``args`` run by two CPU processes under ``torch.distributed.run`` (gloo)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent.parent))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", *args,
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def test_ddp_on_gpus_with_device_auto_joins_with_nccl(tmp_path, monkeypatch):
    """``--device auto`` (the default) on a GPU machine trains on the GPUs, so the group must be
    NCCL's and each rank on its LOCAL_RANK's GPU (until 2026-12-01 ``auto`` gave gloo)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(str(device)))

    def init_process_group(backend):
        calls.append(backend)
        raise InterruptedError  # stop there

    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    with pytest.raises(InterruptedError):
        train(tiny_config(tmp_path, device="auto"), progress=False)
    assert calls == ["cuda:1", "nccl"]


def test_ddp_with_a_numbered_gpu_is_refused(tmp_path, monkeypatch):
    """``--device cuda:1`` under torchrun would put every rank on GPU 1 (NCCL then fails on the
    duplicate GPU); it is refused before the group is joined, naming what to pass instead."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "init_process_group", pytest.fail)
    with pytest.raises(
        ValueError, match=r"device: 'cuda:1' would put all 2 processes.*--device cuda"
    ):
        train(tiny_config(tmp_path, device="cuda:1"), progress=False)


def test_a_gpu_this_machine_does_not_have_is_refused_naming_what_to_change(monkeypatch):
    """``torchrun --nproc-per-node 4`` on a 2-GPU machine: ranks 2 and 3 are refused in one line
    naming the flag (until 2026-12-03 CUDA's "invalid device ordinal" and its four lines of
    advice on asynchronous errors), as is a single process's ``--device cuda:2``."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", pytest.fail)
    visible = r"2 GPU\(s\) visible \(cuda:0 to cuda:1\)"
    with pytest.raises(ValueError, match=rf"LOCAL_RANK 2 needs GPU 2.*{visible}.*-per-node 2 at"):
        pick_device("auto", local_rank=2, world=4)
    with pytest.raises(
        ValueError, match=rf"device: 'cuda:2' requested, and this machine has {visible}"
    ):
        pick_device("cuda:2")


def test_curves_are_replaced_atomically(tmp_path, monkeypatch):
    """A plot cut short (a kill, a full disk) leaves the last complete ``curves.png``, as the CSV
    and the checkpoint do (until 2026-12-01 it was written in place), and closes its figure."""
    from matplotlib.figure import Figure

    from aanet.train import plot_curves

    history = [{"epoch": 1, "train_loss": 2.0, "test_nme": 0.5}]
    path = tmp_path / "curves.png"
    plot_curves(history, path)
    complete = path.read_bytes()

    def cut_short(self, fname, **options):
        Path(fname).write_bytes(complete[:100])
        raise OSError("No space left on device")

    import matplotlib.pyplot as plt

    monkeypatch.setattr(Figure, "savefig", cut_short)
    open_before = plt.get_fignums()
    with pytest.raises(OSError, match="No space left"):
        plot_curves(history * 2, path)
    assert path.read_bytes() == complete
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temporary left
    assert plt.get_fignums() == open_before  # the failed figure closed, not kept by pyplot


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Config:
    """A 1-epoch run of two CPU processes under ``torch.distributed.run`` (gloo)."""
    config = tiny_config(tmp_path_factory.mktemp("ddp"), epochs=1, batch_size=8)
    done = torchrun(str(HERE / "ddp_worker.py"), json.dumps(config.to_dict()))
    assert done.returncode == 0, done.stderr[-3000:]
    return config


def test_ddp_a_nan_loss_on_one_rank_stops_every_rank_naming_it(tmp_path):
    """Rank 1's loss is NaN at its second step: both ranks stop there (neither waits in the
    gradient all-reduce), and the error says whose loss it was (until 2026-12-01 each rank
    printed its own loss, rank 0 a finite one, "here or on another rank")."""
    config = tiny_config(tmp_path, epochs=1)
    done = torchrun(str(HERE / "ddp_worker.py"), json.dumps(config.to_dict()), "1:2", timeout=120)
    assert done.returncode != 0
    message = "non-finite loss (nan on rank 1) at epoch 1, step 2; no epoch has completed yet"
    assert done.stderr.count(message) == 2, done.stderr[-3000:]  # one per rank


def ddp_command(config: Config, *args: str) -> subprocess.CompletedProcess:
    """``aanet train`` as configured (a JSON config file beside its output), two processes."""
    path = Path(config.out).with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config.to_dict()))
    return torchrun("-m", "aanet", "train", "--config", str(path), *args)


def tiny_data(config: Config) -> Path:
    """The synthetic set ``config`` asks for, written now (training will reuse it)."""
    wanted = synthetic.SyntheticConfig(
        config.num_train, config.num_test, config.image_size, config.seed
    )
    return synthetic.generate(config.data_root, wanted)


@pytest.fixture(scope="module")
def ddp_cli_run(tmp_path_factory) -> tuple[Config, subprocess.CompletedProcess]:
    """``aanet train`` under ``torchrun`` with its progress bar, on data with one bad line."""
    config = tiny_config(tmp_path_factory.mktemp("ddp_cli"), epochs=1)
    annotations = wflw.annotation_file(tiny_data(config), "train")
    good = annotations.read_text().splitlines()[0].split()
    with annotations.open("a") as handle:
        handle.write(" ".join([*good[:-1], "synthetic_train/missing.png"]) + "\n")
    done = ddp_command(config)
    assert done.returncode == 0, done.stderr[-3000:]
    return config, done


def test_ddp_warns_about_bad_data_once_not_once_per_rank(ddp_cli_run):
    _, done = ddp_cli_run
    assert done.stderr.count("skipped 1 bad entries") == 1, done.stderr[-3000:]
    assert done.stderr.count("epoch 1: loss") == 1


def test_ddp_progress_bar_shows_the_loss_over_every_rank_as_logged(ddp_cli_run):
    """One bar (rank 0's), its running loss the mean over both ranks' steps: at the epoch's end
    the value the log line and ``log.csv`` get (until 2026-12-01 rank 0's own running loss)."""
    _, done = ddp_cli_run
    # Every step's set_postfix redraws the bar, so its last drawing has the epoch's final loss
    # (the drawing at 100% is left to tqdm's timing: sometimes there is none).
    shown = re.findall(r"epoch 1/1:.*?loss=([^,\]]+)", done.stderr)
    logged = re.findall(r"epoch 1: loss ([^,]+),", done.stderr)
    assert shown and len(logged) == 1, done.stderr[-3000:]
    assert shown[-1] == logged[0]


def test_ddp_evaluate_runs_once_on_rank_0(ddp_cli_run, tmp_path):
    """``aanet evaluate`` under ``torchrun``: one table and one report (until 2026-12-01 every
    rank evaluated, printed the table and wrote the same file at once)."""
    config, _ = ddp_cli_run
    out = tmp_path / "eval.json"
    checkpoint = str(Path(config.out) / "last.pt")
    done = torchrun("-m", "aanet", "evaluate", "--checkpoint", checkpoint, "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("NME %") == 1 and done.stdout.count(f"wrote {out}") == 1
    assert json.loads(out.read_text())["full"]["count"] == 8


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "1"}, "RANK=1, WORLD_SIZE unset: not a process of a torchrun launch"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2, WORLD_SIZE=2: not a process of a torchrun"),
        (
            {"WORLD_SIZE": "two"},
            "WORLD_SIZE: expected a whole number (torchrun sets it), got 'two'",
        ),
        ({"LOCAL_RANK": "x"}, "LOCAL_RANK: expected a whole number (torchrun sets it), got 'x'"),
    ],
)
def test_launch_variables_that_no_torchrun_sets_are_refused_in_one_line(
    env, message, tmp_path, monkeypatch, capsys
):
    """Until 2026-12-03 a ``RANK=1`` left in the shell made a lone process train as rank 1: no
    checkpoint, no log line, exit status 0; a ``WORLD_SIZE`` that is not a number was a
    traceback."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = tiny_config(tmp_path, epochs=1)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(config.to_dict()))
    assert main(["train", "--config", str(path), "--no-progress"]) == 2
    assert f"aanet train: error: {message}" in capsys.readouterr().err
    assert not Path(config.out).exists()


def test_aanet_run_on_another_rank_than_0_stops_after_training(tmp_path, monkeypatch):
    """Under ``torchrun`` rank 1's ``train`` returns no report; ``aanet run`` there has nothing
    more to do (until 2026-12-01 it failed with ``KeyError: 'report'``, and ``torchrun`` then
    stopped rank 0 in the middle of its evaluation)."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    trained = []
    monkeypatch.setattr(
        "aanet.train.train",
        lambda config, resume, progress: trained.append(config) or {"history": []},
    )
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--epochs", "1", "--no-progress"]) == 0
    assert len(trained) == 1 and not out.exists()


def test_ddp_an_image_that_fails_on_one_rank_ends_every_rank_naming_it(tmp_path):
    """Under ``--on-error stop`` a truncated image (its header reads: found only when its rank
    reads it) stops that rank; the other, waiting in the step's all-reduce, ends too instead of
    waiting for a timeout, and each error line says which rank it comes from. (Under ``skip``,
    test_bad_images: the next face stands in for it.)"""
    config = tiny_config(tmp_path, epochs=1, on_error="stop")
    image = wflw.load_wflw(tiny_data(config), "train")[3].image_path
    jpeg = cv2.imencode(".jpg", cv2.imread(str(image)))[1].tobytes()
    image.write_bytes(jpeg[: len(jpeg) * 2 // 3])  # a JPEG under a .png name: Pillow reads both
    done = ddp_command(config, "--no-progress")
    assert done.returncode != 0
    failed = r"aanet train: error on rank [01] of 2: .*:4: cannot decode image"
    assert re.search(failed, done.stderr), done.stderr[-3000:]
    # The other rank, if its collective failed before torchrun stopped it, says so in our words
    # (until 2026-12-04 gloo's "Connection reset by peer ... GLHF!").
    assert "by peer" not in done.stderr, done.stderr[-3000:]


def test_ddp_two_cpu_processes_keep_replicas_identical(ddp_run):
    config = ddp_run
    rank0 = torch.load(Path(config.out) / "rank0.pt")
    rank1 = torch.load(Path(config.out) / "rank1.pt")
    fresh = build_model(config.model_config()).state_dict()
    assert any(not torch.equal(rank0[k], fresh[k]) for k in rank0)  # it did train
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


def test_ddp_train_loss_is_the_mean_over_every_ranks_steps(ddp_run):
    """Not rank 0's shard only: the logged loss averages both ranks' steps."""
    out = Path(ddp_run.out)
    losses = [json.loads((out / f"rank{rank}_losses.json").read_text()) for rank in (0, 1)]
    assert len(losses[0]) == len(losses[1]) == 2  # 16 images, 2 ranks, 4 a step
    every = losses[0] + losses[1]
    logged = torch.load(out / "last.pt", weights_only=False)["history"][0]["train_loss"]
    assert logged == pytest.approx(sum(every) / len(every), rel=1e-12)
    assert logged != pytest.approx(sum(losses[0]) / len(losses[0]), rel=1e-6)


def test_predict_writes_image_and_json(trained, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    image, _, _ = synthetic.render_face(np.random.default_rng(5), 96)
    cv2.imwrite(str(photo), image)
    out = tmp_path / "annotated.png"
    checkpoint = Path(trained.out) / "last.pt"
    code = main(
        ["predict", str(photo), "--checkpoint", str(checkpoint), "--output", str(out), "--json"]
    )
    assert code == 0
    annotated = cv2.imread(str(out))
    assert annotated.shape == image.shape and not np.array_equal(annotated, image)
    faces = json.loads(out.with_suffix(".json").read_text())["faces"]
    assert faces and all(len(f["landmarks"]) == 98 and len(f["confidence"]) == 98 for f in faces)
    printed = capsys.readouterr()
    assert json.loads(printed.out)["faces"] == faces  # stdout is the JSON alone, for a pipe
    assert "face(s); wrote" in printed.err


@pytest.mark.parametrize(
    "box,message",
    [
        ((10, 10, 5, 30), "x0 < x1"),
        ((10, 10, 30, 10), "y0 < y1"),
        ((0, 0, float("nan"), 20), "finite"),
        ((100, 0, 120, 20), "lies outside the 80x64 image"),
        ((1, 2, 3), "expected finite"),
    ],
)
def test_predict_refuses_a_bad_box(trained, tmp_path, box, message):
    from aanet.predict import predict_image

    image = tmp_path / "face.png"
    cv2.imwrite(str(image), np.full((64, 80, 3), 127, np.uint8))
    model = load_model(Path(trained.out) / "last.pt")
    with pytest.raises(ValueError, match=f"box: .*{message}"):
        predict_image(model, image, torch.device("cpu"), box=np.array(box, dtype=np.float64))


def test_predict_names_a_missing_or_undecodable_image(trained, tmp_path):
    from aanet.predict import predict_image

    model = load_model(Path(trained.out) / "last.pt")
    with pytest.raises(FileNotFoundError, match="image: no such file: .*missing.png"):
        predict_image(model, tmp_path / "missing.png", torch.device("cpu"))
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="image: .*notes.png is not an image that decodes"):
        predict_image(model, text, torch.device("cpu"))


def test_predict_without_a_face_warns_and_uses_the_whole_image(trained, tmp_path, caplog):
    from aanet.predict import predict_image

    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((64, 80, 3), 127, np.uint8))
    model = load_model(Path(trained.out) / "last.pt")
    _, faces = predict_image(model, blank, torch.device("cpu"))
    # The detector ran (OpenCV's bundled Haar cascade is a dependency) and found nothing.
    assert "no face found" in caplog.text and "no bundled Haar cascade" not in caplog.text
    assert len(faces) == 1


def test_export_matches_eager(trained, tmp_path):
    model = load_model(Path(trained.out) / "last.pt")
    assert export(model, tmp_path / "model.pt2", "export") <= 1e-4
    with pytest.raises(ValueError, match="output: a torch.export file is a .pt2 archive"):
        export(model, tmp_path / "model.pt", "export")
    assert not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize("attention", [True, False], ids=["attention", "no-attention"])
def test_torchscript_export_matches_eager(tmp_path, attention):
    config = ModelConfig(input_size=32, width=16, blocks=(1, 1, 1), attention=attention)
    model = build_model(config)
    torch.nn.init.normal_(model.head[-1].weight, std=0.1)
    with warnings.catch_warnings():  # the file is checked on another batch: no TracerWarning
        warnings.simplefilter("error", torch.jit.TracerWarning)
        assert export(model.eval(), tmp_path / "model.ts.pt", "torchscript") <= 1e-4


def test_evaluate_cli_writes_table_and_json(trained, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert (
        main(["evaluate", "--checkpoint", str(Path(trained.out) / "last.pt"), "--json", str(out)])
        == 0
    )
    report = json.loads(out.read_text())
    assert report["full"]["count"] == 8
    confidence = report["confidence"]
    assert 0.0 <= confidence["median"] <= 1.0 and -1.0 <= confidence["rank_correlation"] <= 1.0
    assert "NME %" in capsys.readouterr().out


def test_training_evaluates_with_the_configured_normalization_and_records_it(
    tmp_path, caplog, capsys
):
    """Until 2026-12-01 every epoch's evaluation was inter-ocular, whatever the run. The
    checkpoint's config carries it: ``aanet evaluate`` measures by it unless told otherwise."""
    import logging

    from aanet.evaluate import predict_errors
    from aanet.metrics import summarize

    caplog.set_level(logging.INFO, "aanet")
    config = tiny_config(tmp_path, epochs=1, normalization="inter-pupil")
    result = train(config, progress=False)
    (row,) = result["history"]
    assert (
        row["normalization"] == "inter-pupil" and result["report"]["normalization"] == "inter-pupil"
    )
    assert result["report"]["full"]["nme"] == pytest.approx(row["test_nme"], rel=1e-6)
    test_set = LandmarkDataset(load_wflw(config.data_root, "test"), config.input_size)
    loader = torch.utils.data.DataLoader(test_set, batch_size=8)
    for normalization in ("inter-pupil", "inter-ocular"):
        tested = predict_errors(result["model"], loader, torch.device("cpu"), False, normalization)
        nme = summarize(tested.face_errors)["nme"]
        assert (nme == pytest.approx(row["test_nme"], rel=1e-6)) == (normalization == "inter-pupil")
    assert f"test NME {100 * row['test_nme']:.2f}% (inter-pupil)" in caplog.text
    header, values = (Path(config.out) / "log.csv").read_text().splitlines()
    assert dict(zip(header.split(","), values.split(","), strict=True))["normalization"] == (
        "inter-pupil"
    )
    checkpoint = str(Path(config.out) / "last.pt")
    for flags, expected in (
        ([], "inter-pupil"),
        (["--normalization", "inter-ocular"], "inter-ocular"),
    ):
        out = tmp_path / f"{expected}.json"
        assert main(["evaluate", "--checkpoint", checkpoint, "--json", str(out), *flags]) == 0
        assert json.loads(out.read_text())["normalization"] == expected
    assert main(["evaluate", "--checkpoint", checkpoint, "--normalization", "pupils"]) == 2
    assert "normalization: expected one of" in capsys.readouterr().err


def test_evaluate_writes_beside_the_checkpoint_it_was_given(trained, tmp_path):
    """A checkpoint copied elsewhere: its report goes beside the copy, not over the report of the
    run that trained it."""
    copy = tmp_path / "elsewhere" / "model.pt"
    copy.parent.mkdir()
    shutil.copy(Path(trained.out) / "last.pt", copy)
    original = Path(trained.out) / "eval.json"
    before = original.read_bytes() if original.exists() else None
    assert main(["evaluate", "--checkpoint", str(copy)]) == 0
    assert json.loads((copy.parent / "eval.json").read_text())["full"]["count"] == 8
    assert (original.read_bytes() if original.exists() else None) == before


def test_evaluate_elsewhere_says_which_option_gives_the_data(trained, tmp_path, capsys):
    checkpoint = str(Path(trained.out) / "last.pt")
    missing = str(tmp_path / "no-data")
    assert main(["evaluate", "--checkpoint", checkpoint, "--data-root", missing]) == 2
    assert "give --data-root / --test-root" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--input-size", "64"], "input_size: .* was trained with input_size=32"),
        (["--no-attention"], "attention: .* was trained with attention=True"),
        (["--width", "32"], "width: .* was trained with width=16"),
        (["--data", "300w", "--test-root", "x"], "data: .* predicts 98 landmarks"),
    ],
)
def test_evaluate_refuses_options_that_describe_another_model(trained, flags, message, capsys):
    """Until 2026-12-01 ``--input-size 64`` on a model trained at 32 cropped the test set at 64
    and reported the wrong NME without a word."""
    checkpoint = str(Path(trained.out) / "last.pt")
    assert main(["evaluate", "--checkpoint", checkpoint, *flags]) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none present)")
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_training_on_the_gpu(tmp_path, amp):
    result = train(tiny_config(tmp_path, epochs=2, device="cuda", amp=amp), progress=False)
    losses = [row["train_loss"] for row in result["history"]]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert next(result["model"].parameters()).is_cuda


def test_cli_names_user_errors_without_a_traceback(trained, tmp_path, capsys):
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}}, foreign)
    image = tmp_path / "face.png"
    cv2.imwrite(str(image), np.full((64, 64, 3), 128, np.uint8))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    checkpoint = str(Path(trained.out) / "last.pt")
    cases = [
        (["evaluate", "--checkpoint", str(foreign)], "checkpoint lacks ['config']"),
        (["predict", str(image), "--checkpoint", checkpoint, "--output", str(tmp_path / "out")],
         "output: expected an image file name"),
        (["predict", str(image), "--checkpoint", checkpoint, "--device", "gpu"],
         "device: expected auto, cpu, cuda or cuda:N"),
        (["generate", "--out", str(a_file)], "exists and is not a folder"),
        (["generate", "--out", str(tmp_path / "g"), "--image-size", "0"],
         "image_size: expected an int of at least 8"),
        (["generate", "--out", str(tmp_path / "g"), "--num-train", "-3"],
         "num_train: expected an int of at least 1"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


def test_commands_left_at_backend_auto_follow_the_environment_variable(
    trained, tmp_path, monkeypatch, capsys
):
    # `--backend auto` (the default) leaves the choice to AANET_KERNELS_BACKEND, as it is for
    # any AAConv2d; until 2026-12-01 the commands entered use_backend("auto"), which overrode it.
    calls = []
    original = reference.attention_2d_reference

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(reference, "attention_2d_reference", counted)
    monkeypatch.setenv("AANET_KERNELS_BACKEND", "reference")
    image = tmp_path / "face.png"
    cv2.imwrite(str(image), np.full((64, 64, 3), 128, np.uint8))
    checkpoint = str(Path(trained.out) / "last.pt")
    commands = {
        "predict": ["predict", str(image), "--checkpoint", checkpoint, "--no-detect"],
        "evaluate": ["evaluate", "--checkpoint", checkpoint, "--json", str(tmp_path / "e.json")],
    }
    for name, argv in commands.items():
        calls.clear()
        assert main(argv) == 0, capsys.readouterr().err
        assert calls, f"{name} did not use the backend AANET_KERNELS_BACKEND names"
    calls.clear()
    train(dataclasses.replace(trained, out=str(tmp_path / "run")), progress=False)
    assert calls, "train did not use the backend AANET_KERNELS_BACKEND names"


def test_the_make_run_job_writes_everything_it_promises(tmp_path, capsys):
    """``aanet run`` (what ``make run`` does) on a tiny configuration: exit 0 and every artefact."""
    out = tmp_path / "run"
    argv = ["run", "--data-root", str(tmp_path / "data"), "--num-train", "16", "--num-test", "8",
            "--image-size", "64", "--input-size", "32", "--width", "16", "--blocks", "1", "1", "1",
            "--batch-size", "8", "--epochs", "1", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    names = ("last.pt", "log.csv", "curves.png", "eval.json", "photo.png", "photo_landmarks.png",
             "photo_landmarks.json", "aanet.pt2")  # fmt: skip
    assert all((out / name).stat().st_size > 0 for name in names)
    report = json.loads((out / "eval.json").read_text())
    assert 0 <= report["full"]["nme"] < 1 and report["full"]["count"] == 8
    printed = capsys.readouterr().out
    assert "NME" in printed and "1 epoch on the synthetic set" in printed


@pytest.mark.parametrize("data", ["synthetic", "wflw", "300w"])
def test_the_make_run_summary_names_the_data_it_trained_on(data):
    """Until 2026-12-06 ``aanet run --data 300w`` (or ``wflw``) ended with "1 epoch on the
    synthetic set"."""
    from aanet.demo import headline

    line = headline(Config(data=data, epochs=1), {"nme": 0.05, "fr": 0.0, "auc": 0.5})
    name = {"synthetic": "the synthetic set", "wflw": "WFLW", "300w": "300W"}[data]
    assert line.startswith(f"AANet (with attention), 1 epoch on {name}: NME 5.00%"), line
