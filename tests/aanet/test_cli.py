"""The ``aanet`` command line: config files, help, paths, interruption, a second run."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch

from aanet import checkpoint
from aanet.cli import build_parser, config_from_args, main
from aanet.config import Config, make_config, read_config_file


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        (
            "run.yaml",
            b"lr: 0.1\nout: caf\xe9\n",
            r"config .*run\.yaml: not UTF-8 text \(line 2: byte 0xe9\)",
        ),
        ("run.yaml", "learning_rate: 0.1\n", r"run\.yaml: unknown option 'learning_rate' .*'lr'"),
        ("run.yaml", "batch-size: 8\n", r"unknown option 'batch-size' \(did you mean 'batch_size'"),
        ("run.yaml", "epocs: 3\n", r"unknown option 'epocs' \(did you mean 'epochs'"),
        ("run.yaml", "1: 2\nnull: 3\n", r"unknown options 1, None; known: data, "),
        ("run.txt", "lr: 0.1\n", r"run\.txt: expected a \.yaml, \.yml or \.json file"),
        ("run.yaml", "- lr\n", r"expected a mapping of option names to values, got a list"),
    ],
)
def test_a_bad_config_file_is_one_clear_error(tmp_path, name, data, message):
    with pytest.raises(ValueError, match=message):
        read_config_file(write(tmp_path / name, data))


def test_a_folder_as_the_config_is_called_a_folder(tmp_path):
    with pytest.raises(IsADirectoryError, match=f"config: {tmp_path} is a folder"):
        read_config_file(tmp_path)


def test_a_suffix_in_capitals_and_an_empty_file_are_read(tmp_path):
    assert read_config_file(write(tmp_path / "run.YAML", "lr: 0.1  # comment\n")) == {"lr": 0.1}
    assert read_config_file(write(tmp_path / "run.yml", "# nothing yet\n")) == {}


def test_unknown_keys_are_refused_by_make_config_too():
    with pytest.raises(ValueError, match=r"config: unknown option 'num_head' .*'num_heads'"):
        make_config({"num_head": 2})


def test_a_home_folder_tilde_is_expanded_in_config_files_and_path_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = make_config(read_config_file(write(tmp_path / "r.yaml", "data_root: ~/d s\n")))
    assert config.data_root == str(tmp_path / "d s")
    args = build_parser().parse_args(["train", "--out=~/runs/a b", "--config", "~/r.yaml"])
    assert config_from_args(args).out == str(tmp_path / "runs/a b")
    args = build_parser().parse_args(["evaluate", "--checkpoint=~/last.pt", "--json=~/e.json"])
    assert args.checkpoint == str(tmp_path / "last.pt") and args.json == str(tmp_path / "e.json")
    args = build_parser().parse_args(
        ["predict", "~/p.png", "--checkpoint", "c", "--output=~/o.png"]
    )
    assert (args.image, args.output) == (str(tmp_path / "p.png"), str(tmp_path / "o.png"))


def test_flags_beat_the_config_file_which_beats_the_base(tmp_path):
    path = write(tmp_path / "r.yaml", "lr: 0.01\nepochs: 5\n")
    args = build_parser().parse_args(["run", "--config", str(path), "--epochs", "7"])
    config = config_from_args(args, base=read_config_file("cpu"))
    assert (config.lr, config.epochs, config.width) == (0.01, 7, 48)


def help_of(capsys, command: str) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_run_help_shows_the_cpu_preset_it_starts_from(capsys):
    text = help_of(capsys, "run")
    assert "--epochs EPOCHS default: 12" in text and "--width WIDTH default: 48" in text
    assert "--out OUT default: runs/aanet-cpu" in text and "--resume" in text
    assert "--loss LOSS mse, l1, wing, awing; default: mse" in text


def test_evaluate_offers_no_flag_it_would_ignore(capsys):
    """Until 2026-12-03 it offered the synthetic set's --num-train, --num-test, --image-size and
    --seed, and ignored them: it measures the test set on disk, drawn as the training run drew
    it."""
    text = help_of(capsys, "evaluate")
    assert "--lr" not in text and "--epochs" not in text and "--out " not in text
    for unused in ("--num-train", "--num-test", "--image-size", "--seed"):
        assert unused not in text
    assert "--batch-size BATCH_SIZE default: the checkpoint's" in text
    for flag, value in (("--out", "elsewhere"), ("--num-test", "4"), ("--seed", "1")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["evaluate", "--checkpoint", "c.pt", flag, value])


def test_generate_help_lists_its_defaults(capsys):
    assert "--num-train NUM_TRAIN default: 1500" in help_of(capsys, "generate")


@pytest.mark.parametrize("command, default", [("predict", "auto"), ("export", "reference")])
def test_predict_and_export_help_list_the_backends_they_take(capsys, command, default):
    """Until 2026-12-06 their ``--backend`` said "attention backend" (export: without its default)
    where train's lists the allowed values, as the README says each command's --help does."""
    text = help_of(capsys, command)
    assert f"auto, reference, cpu, cuda, triton; default: {default}" in text, text


def test_run_resume_continues_the_training_of_out(monkeypatch):
    seen = {}
    monkeypatch.setattr("aanet.demo.run_demo", lambda config, **kwargs: seen.update(kwargs))
    assert main(["run", "--resume", "--no-progress"]) == 0
    assert seen == {"resume": True, "progress": False}


def interrupted_train(tmp_path, monkeypatch, epoch: int | None):
    def fake_train(config, **kwargs):
        if epoch is not None:
            state = {"epoch": epoch, "model": {"w": torch.zeros(1)}}
            checkpoint.save_atomic(state, Path(config.out) / "last.pt")
        raise KeyboardInterrupt

    monkeypatch.setattr("aanet.train.train", fake_train)
    return main(["train", "--out", str(tmp_path / "run"), "--epochs", "5", "--no-progress"])


def test_ctrl_c_says_what_last_pt_holds_and_how_to_go_on(tmp_path, monkeypatch, capsys):
    assert interrupted_train(tmp_path, monkeypatch, epoch=1) == 130
    err = capsys.readouterr().err.strip()
    assert err == (
        f"aanet train: interrupted; {tmp_path / 'run' / 'last.pt'} holds epoch 2 of 5: the same "
        "command with --resume continues from there"
    )


def test_ctrl_c_before_the_first_epoch_says_nothing_was_saved(tmp_path, monkeypatch, capsys):
    assert interrupted_train(tmp_path, monkeypatch, epoch=None) == 130
    err = capsys.readouterr().err.strip()
    expected = "aanet train: interrupted before its first epoch ended: no checkpoint in"
    assert err == f"{expected} {tmp_path / 'run'}"


def test_a_second_run_in_one_out_says_it_replaces_the_first(tmp_path, monkeypatch, caplog):
    import aanet.train

    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"an earlier run")
    monkeypatch.setattr(aanet.train, "_train", lambda *args: {})
    caplog.set_level(logging.INFO, "aanet")
    aanet.train.train(Config(device="cpu", out=str(out)))
    assert "holds an earlier run: this one starts over and replaces it" in caplog.text
    caplog.clear()
    aanet.train.train(Config(device="cpu", out=str(out)), resume="auto")
    assert "earlier run" not in caplog.text


def test_ctrl_c_under_torchrun_is_one_line_rank_0s(tmp_path, monkeypatch, capsys):
    """Ctrl-C reaches every process of a launch: each printed its own line until 2026-12-04."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert interrupted_train(tmp_path, monkeypatch, epoch=1) == 130
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert interrupted_train(tmp_path, monkeypatch, epoch=1) == 130
    assert capsys.readouterr().err.startswith("aanet train: interrupted; ")


def test_a_rank_whose_peer_stopped_says_so_not_in_gloos_words(tmp_path, monkeypatch, capsys):
    def fake_train(config, **kwargs):
        raise RuntimeError(
            "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
            "[127.0.0.1]:6540: Connection reset by peer. This is typically caused by a remote "
            "worker hanging or bugs in the application."
        )

    monkeypatch.setattr("aanet.train.train", fake_train)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (
        "aanet train: error on rank 0 of 2: another process of the launch stopped (its own line "
        "says why) (aanet --debug: traceback)"
    )


def test_ctrl_c_names_an_earlier_runs_checkpoint_as_such(tmp_path, monkeypatch, capsys):
    (tmp_path / "run").mkdir()
    checkpoint.save_atomic({"epoch": 4, "model": {}}, tmp_path / "run" / "last.pt")
    assert interrupted_train(tmp_path, monkeypatch, epoch=None) == 130
    err = capsys.readouterr().err
    assert "holds epoch 5 of 5 (an earlier run's: this one ended no epoch): the same command" in err


@pytest.mark.parametrize(
    ("argv", "unread"),
    [
        (["train", "--test-root", "t"], ["test_root"]),
        (["train", "--data", "wflw", "--num-train", "9", "--image-size", "64"],
         ["num_train", "image_size"]),
        (["train", "--data", "300w", "--test-root", "t", "--num-test", "5"], ["num_test"]),
        (["train", "--data", "wflw", "--data-root", "w"], []),
    ],
)  # fmt: skip
def test_an_option_the_data_set_does_not_read_is_warned_about(argv, unread, caplog):
    """--test-root with synthetic data, --num-train with WFLW: accepted, but they change nothing,
    so each is named in a warning; options the data set reads are not."""
    with caplog.at_level(logging.WARNING, logger="aanet"):
        config_from_args(build_parser().parse_args(argv))
    warned = [r.getMessage() for r in caplog.records if "changes nothing" in r.getMessage()]
    assert [m.split()[0] for m in warned] == unread


@pytest.mark.parametrize(
    ("argv", "warned"),
    [
        (["train", "--image-size", "64"], True),
        (["train", "--image-size", "200", "--input-size", "256"], True),
        (["train", "--image-size", "128"], False),
        (["train", "--data", "wflw", "--image-size", "64"], False),
    ],
)
def test_synthetic_images_below_the_input_size_are_warned_about(argv, warned, caplog):
    """Synthetic images smaller than the network input are upsampled into blur: a warning names
    both sizes; WFLW photos (image_size unread there) are not concerned."""
    with caplog.at_level(logging.WARNING, logger="aanet"):
        config = config_from_args(build_parser().parse_args(argv))
    upsampled = [r.getMessage() for r in caplog.records if "upsampled" in r.getMessage()]
    expected = f"image_size {config.image_size} is below input_size {config.input_size}"
    assert [m.startswith(expected) for m in upsampled] == ([True] if warned else [])


def test_a_preset_under_the_flags_is_not_warned_about(caplog):
    """``aanet run`` starts from the cpu preset (synthetic sizes in it): ``--data wflw`` there
    must not warn about the preset's values, only about what the user gave."""
    args = build_parser().parse_args(["run", "--data", "wflw"])
    with caplog.at_level(logging.WARNING, logger="aanet"):
        config_from_args(args, base=read_config_file("cpu"))
    assert not [r for r in caplog.records if "changes nothing" in r.getMessage()]


def tiny_checkpoint(path: Path) -> Path:
    """An untrained model's checkpoint at ``path``."""
    from aanet.model import build_model

    config = make_config({"input_size": 32, "width": 16, "blocks": [1, 1], "device": "cpu"})
    model = build_model(config.model_config())
    checkpoint.save_atomic({"model": model.state_dict(), "config": config.to_dict()}, path)
    return path


def test_evaluate_refuses_a_json_it_cannot_write_before_it_evaluates(tmp_path, monkeypatch, capsys):
    """A --json that is a folder, or below a file, was found after the whole evaluation."""
    saved = tiny_checkpoint(tmp_path / "last.pt")
    monkeypatch.setattr("aanet.evaluate.predict_errors", lambda *a, **k: pytest.fail("evaluated"))
    write(tmp_path / "a_file", "")
    for json_path, message in (
        (tmp_path, "is a folder"),
        (tmp_path / "a_file" / "e.json", "a_file is a file, not a folder"),
    ):
        assert main(["evaluate", "--checkpoint", str(saved), "--json", str(json_path)]) == 2
        error = capsys.readouterr().err
        assert "aanet evaluate: error: json: " in error and message in error, error


def test_evaluate_refuses_a_json_that_is_its_checkpoint_or_not_json(tmp_path, monkeypatch, capsys):
    """Until 2026-12-03 ``--json last.pt`` replaced the checkpoint by its own report, and
    ``--json log.csv`` the training log, exit status 0; a report where no file can be made
    (``/proc``) was named by its temporary file, after the evaluation."""
    from aanet.evaluate import write_json

    saved = tiny_checkpoint(tmp_path / "last.pt")
    log_csv = write(tmp_path / "log.csv", "epoch,train_loss\n1,0.5\n")
    before = {path: path.read_bytes() for path in (saved, log_csv)}
    (tmp_path / "sub").mkdir()
    monkeypatch.setattr("aanet.evaluate.predict_errors", lambda *a, **k: pytest.fail("evaluated"))
    for json_path, message in (
        (saved, f"{saved} is the checkpoint, which it would overwrite"),
        (tmp_path / "sub" / ".." / "last.pt", "last.pt is the checkpoint"),
        (log_csv, f"expected a file name ending in .json, got {str(log_csv)!r}"),
        (Path("/proc/e.json"), "cannot write in /proc, for /proc/e.json"),
    ):
        assert main(["evaluate", "--checkpoint", str(saved), "--json", str(json_path)]) == 2
        error = capsys.readouterr().err
        assert error.startswith("aanet evaluate: error: json: ") and message in error, error
    assert {path: path.read_bytes() for path in before} == before
    with pytest.raises(OSError, match=r"could not write /proc/e.json \("):
        write_json({}, "/proc/e.json")


def test_a_data_error_in_a_loader_worker_is_one_line_as_without_workers(tmp_path, capsys):
    """Until 2026-12-03, with ``--workers 1``, an image that does not decode under ``--on-error
    stop`` ended the run with the worker's whole traceback (``Caught DataError in DataLoader
    worker process 0. Original Traceback ...``, some 30 lines) where ``--workers 0`` gave one line
    naming the file and line."""
    from aanet.datasets import synthetic

    root = synthetic.generate(tmp_path / "data", synthetic.SyntheticConfig(4, 1, 32))
    image = root / "WFLW_images" / "synthetic_train" / "00001.png"
    jpeg = cv2.imencode(".jpg", cv2.imread(str(image)))[1].tobytes()
    image.write_bytes(jpeg[: len(jpeg) * 2 // 3])  # a cut-off JPEG: loads, does not decode
    errors = []
    for workers in ("0", "1"):
        argv = ["train", "--data", "wflw", "--data-root", str(root), "--input-size", "32",
                "--width", "16", "--blocks", "1", "1", "--batch-size", "4", "--epochs", "1",
                "--device", "cpu", "--no-progress", "--on-error", "stop", "--workers", workers,
                "--out", str(tmp_path / f"run{workers}")]  # fmt: skip
        assert main(argv) == 2
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1], errors[1]
    assert errors[1].count("\n") == 1 and "Traceback" not in errors[1]
    assert f"cannot decode image {image}" in errors[1] and "no epoch has completed" in errors[1]


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--ep", "1"],
        ["--deb", "train"],
        ["evaluate", "--checkpoint", "c.pt", "--js", "r.json"],
    ],
)
def test_abbreviated_options_are_refused(argv, capsys):
    # Until 2026-12-02 argparse took `--ep` for `--epochs`: a later option sharing the prefix
    # would have changed what a saved command line meant.
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert "unrecognized arguments" in capsys.readouterr().err


def test_the_cli_logs_aanet_progress_but_not_other_libraries_info(tmp_path):
    """An ONNX export made onnxscript print hundreds of INFO lines under aanet's own: the root
    logger is at WARNING, aanet's at INFO (in a fresh process: pytest configures logging)."""
    script = (
        "import logging\n"
        "from aanet.cli import main\n"
        # A command that parses and then fails at once (a user error): logging is set up by then.
        "assert main(['export', '--checkpoint', 'missing.pt']) == 2\n"
        "logging.getLogger('onnxscript.optimizer').info('third-party detail')\n"
        "logging.getLogger('onnxscript.optimizer').warning('third-party warning')\n"
        "logging.getLogger('aanet.export').info('aanet progress')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert "INFO aanet.export: aanet progress" in result.stderr
    assert "WARNING onnxscript.optimizer: third-party warning" in result.stderr
    assert "third-party detail" not in result.stderr


def test_aanet_runs_demo_photo_that_cannot_be_written_is_an_error(tmp_path, monkeypatch):
    """``cv2.imwrite`` returns False rather than raise: until 2026-12-04 ``aanet run`` went on to
    read the photo it had not written."""
    from aanet.demo import demo_photo

    monkeypatch.setattr(cv2, "imwrite", lambda path, image: False)
    with pytest.raises(OSError, match=r"cannot write the demo photo .*photo\.png"):
        demo_photo(tmp_path / "photo.png")


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (OSError(28, "could not write run/log.csv (No space left on device)"),
         "could not write run/log.csv (No space left on device)"),
        (FileNotFoundError(2, "No such file or directory", "faces/a.png"),
         "faces/a.png: No such file or directory"),
        (OSError("a message of our own"), "a message of our own"),
    ],
)  # fmt: skip
def test_an_os_error_is_a_sentence_without_its_errno(error, line, monkeypatch, capsys):
    """``str()`` of an errno error reads "[Errno 28] ..." (and quotes its file): until
    2026-12-04 the CLI printed that."""

    def fake_train(config, **kwargs):
        raise error

    monkeypatch.setattr("aanet.train.train", fake_train)
    assert main(["train", "--no-progress"]) == 2
    assert (
        capsys.readouterr().err.strip() == f"aanet train: error: {line} (aanet --debug: traceback)"
    )


@pytest.mark.parametrize("argv", [[], ["generate"], ["train"], ["evaluate"], ["run"]])
def test_help_reads_as_text_without_rest_literal_marks(argv, capsys):
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    shown = capsys.readouterr().out
    assert "usage: aanet" in shown and "``" not in shown
