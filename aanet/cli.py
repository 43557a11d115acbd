"""The ``aanet`` command: generate, train, evaluate, predict, export, and ``run`` (all of them)."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from aanet.config import (
    Config,
    make_config,
    preset_names,
    read_config_file,
    unread_options,
    upsampling_warning,
)
from aanet.ranks import rank_and_world

# What `aanet evaluate` does not use: it takes every option from the checkpoint's config and
# measures the test set on disk (a synthetic one as training generated it: nothing is drawn
# again), so a flag among these would be ignored without a word (a config file may still hold
# them).
_UNUSED_BY_EVALUATE = (
    "lr", "weight_decay", "epochs", "loss", "heatmap_reg", "compile", "on_nan", "out",
    "num_train", "num_test", "image_size", "seed",
)  # fmt: skip
# How torch re-raises the error of a DataLoader worker: the worker's whole traceback is its
# message, the original one on the last line that starts with its type (qualified by its
# module unless a builtin); what a caller added after it stays.
_WORKER_TRACEBACK = re.compile(
    r"Caught (?P<type>\w+) in DataLoader worker process \d+\.\n"
    r"Original Traceback \(most recent call last\):\n.*\n(?:[\w.]+\.)?(?P=type): (?P<message>.*)\n",
    re.DOTALL,
)

# What gloo raises on a rank whose peer process ended (torch 2.14: "[.../gloo/transport/tcp/
# pair.cc:545] Read error [127.0.0.1]:6540: Connection reset by peer. This is typically ...").
_GLOO_PEER_GONE = re.compile(r"^\[[^\]]*gloo[^\]]*\].*\b(?:Connection (?:reset|closed) by peer)")

_CHECKPOINT_HELP = "a training checkpoint (the last.pt that `aanet train` writes)"


def _user_path(text: str) -> str:
    """A path argument, a leading ``~`` the home folder (``--out=~/runs`` reaches us as it is)."""
    return os.path.expanduser(text)


def _add_config_flags(
    parser: argparse.ArgumentParser,
    defaults: dict[str, Any] | None = None,
    skip: tuple[str, ...] = (),
    default_note: str | None = None,
) -> None:
    """One flag per :class:`Config` field but those in ``skip``; a flag given on the command line
    beats the file. The help shows ``defaults`` (the command's own base: the ``cpu`` preset for
    ``run``) over the dataclass's, or ``default_note`` instead of any value."""
    from aanet.config import option_choices

    parser.add_argument(
        "--config",
        type=_user_path,
        help=f"YAML/JSON file or preset name ({', '.join(preset_names())}); its values beat the "
        "defaults, and flags beat it",
    )
    choices = option_choices()
    for f in fields(Config):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        default = (defaults or {}).get(f.name, default)
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        helptext = default_note or f"default: {shown if shown != '' else 'none'}"
        if f.name in choices:
            helptext = f"{', '.join(choices[f.name])}; {helptext}"
        if f.type == "bool":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=helptext
            )
        elif f.type == "list[int]":
            parser.add_argument(flag, type=int, nargs="+", default=None, help=helptext)
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            parser.add_argument(flag, type=kind, default=None, help=helptext)


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> Config:
    """Defaults, then ``base``, then the config file, then the flags."""
    values = dict(base or {})
    given = read_config_file(args.config) if args.config else {}
    for f in fields(Config):
        flag = getattr(args, f.name, None)
        if flag is not None:
            given[f.name] = flag
    values.update(given)
    config = make_config(values)
    log = logging.getLogger("aanet")
    for name in unread_options(config, given):
        log.warning("%s is not read with data %r: it changes nothing", name, config.data)
    if upsampling := upsampling_warning(config):
        log.warning("%s", upsampling)
    # For the message of an interrupted run: its out, and the last.pt found there before it.
    args.resolved_config = config
    saved = Path(config.out) / "last.pt"
    args.saved_before = saved.stat().st_mtime_ns if saved.is_file() else None
    return config


def _cmd_generate(args: argparse.Namespace) -> None:
    from aanet.datasets.synthetic import SyntheticConfig, generate

    root = generate(
        args.out,
        SyntheticConfig(args.num_train, args.num_test, args.image_size, args.seed),
        option="out",
    )
    print(f"synthetic WFLW-layout set in {root}")


def _cmd_train(args: argparse.Namespace) -> None:
    from aanet.evaluate import format_table
    from aanet.train import train

    result = train(config_from_args(args), resume=args.resume, progress=not args.no_progress)
    if "report" in result:
        print(format_table(result["report"]))


def _cmd_evaluate(args: argparse.Namespace) -> None:
    import torch
    from torch.utils.data import DataLoader

    from aanet import checkpoint
    from aanet.datasets import sources
    from aanet.datasets.dataset import LandmarkDataset
    from aanet.datasets.records import BadDataLog
    from aanet.evaluate import (
        check_report_path,
        format_table,
        predict_errors,
        subset_report,
        write_json,
    )
    from aanet.inference import model_from_state, saved_config
    from aanet.train import attention_backend, pick_device

    out = Path(args.json or Path(args.checkpoint).parent / "eval.json")
    check_report_path(out, args.checkpoint)  # before the model runs over the whole test set
    saved = checkpoint.load(args.checkpoint)
    checkpoint.require(saved, ("model", "config"), args.checkpoint)
    trained = saved_config(saved, args.checkpoint)
    config = config_from_args(args, base=saved["config"])
    config.check_same_model(trained, args.checkpoint)
    device = pick_device(config.device)
    model = model_from_state(saved, device, args.checkpoint)
    try:
        records = sources.load_split(config, "test")
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{error} (the data paths come from the checkpoint's config, relative to where it was "
            "trained; give --data-root / --test-root for this directory)"
        ) from error
    test_set = LandmarkDataset(records, config.input_size, on_error=config.on_error)
    loader = DataLoader(test_set, batch_size=config.batch_size, num_workers=config.workers)
    with attention_backend(config.backend), torch.no_grad():
        predictions = predict_errors(model, loader, device, config.amp, config.normalization)
    BadDataLog("skip", list(predictions.left_out)).summarize(
        "test faces whose image does not decode (left out of the metrics)",
        len(predictions.face_errors),
    )
    report = subset_report(predictions)
    print(format_table(report))
    write_json(report, out)
    print(f"wrote {out}")


def _cmd_predict(args: argparse.Namespace) -> None:
    import json

    from aanet.inference import load_model
    from aanet.predict import check_image_output, predict_image, write_results
    from aanet.train import attention_backend, pick_device

    image = Path(args.image)
    out = Path(args.output or image.with_name(f"{image.stem}_landmarks.png"))
    check_image_output(out, {"input image": image, "checkpoint": args.checkpoint})
    device = pick_device(args.device)
    model = load_model(args.checkpoint, device)
    with attention_backend(args.backend):
        annotated, faces = predict_image(
            model, args.image, device, detect=not args.no_detect, box=args.box
        )
    json_path = out.with_suffix(".json") if args.json else None
    report = write_results(annotated, faces, out, json_path, image)
    # With --json, stdout is the JSON alone (for a pipe), so the summary goes to stderr.
    fell_back = not args.no_detect and faces[0]["source"] == "whole image"
    how = " (no face found: the whole image as its box)" if fell_back else ""
    summary = f"{len(faces)} face(s){how}; wrote {out}" + (f" and {json_path}" if json_path else "")
    print(summary, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(report))


def _cmd_export(args: argparse.Namespace) -> None:
    from aanet.export import SUFFIXES, check_output_name, export, format_for
    from aanet.files import check_output_path
    from aanet.inference import load_model

    fmt = format_for(args.output, args.format)
    out = Path(args.output or Path(args.checkpoint).with_suffix(SUFFIXES[fmt]))
    # Both before the checkpoint is read, not after:
    check_output_name(out, fmt)
    check_output_path(out, "output", {"checkpoint": args.checkpoint})
    error = export(load_model(args.checkpoint), out, fmt, args.backend)
    print(f"wrote {out} ({fmt}); max output difference from eager: {error:.3g}")


def _cmd_run(args: argparse.Namespace) -> None:
    from aanet.demo import run_demo

    run_demo(
        config_from_args(args, base=read_config_file("cpu")),
        resume=args.resume,
        progress=not args.no_progress,
    )


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations (argparse takes `--ep` for `--epochs` by default): a later option sharing
    # a prefix would silently change what a saved command line means.
    # The docstring without its reST literal marks (double backquotes).
    description = (__doc__ or "").replace("``", "")
    parser = argparse.ArgumentParser(prog="aanet", description=description, allow_abbrev=False)
    parser.add_argument(
        "--debug", action="store_true", help="on an error, the full traceback, not one line"
    )
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        parser_class=functools.partial(argparse.ArgumentParser, allow_abbrev=False),
    )

    from aanet.config import option_choices

    backends = ", ".join(option_choices()["backend"])  # as train's --help lists them

    gen = sub.add_parser("generate", help="write the synthetic WFLW-layout face set")
    gen.add_argument(
        "--out", type=_user_path, default="runs/data/synthetic", help="default: %(default)s"
    )
    gen.add_argument("--num-train", type=int, default=1500, help="default: %(default)s")
    gen.add_argument("--num-test", type=int, default=300, help="default: %(default)s")
    gen.add_argument("--image-size", type=int, default=160, help="default: %(default)s")
    gen.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    gen.set_defaults(func=_cmd_generate)

    tr = sub.add_parser("train", help="train AANet (works under torchrun for DDP)")
    _add_config_flags(tr)
    tr.add_argument(
        "--resume", nargs="?", const="auto", type=_user_path,
        help="checkpoint to continue (without a value: <out>/last.pt)",
    )  # fmt: skip
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(func=_cmd_train)

    ev = sub.add_parser(
        "evaluate", help="NME / FR / AUC on the test set and the WFLW or 300W subsets"
    )
    ev.add_argument("--checkpoint", required=True, type=_user_path, help=_CHECKPOINT_HELP)
    ev.add_argument(
        "--json",
        type=_user_path,
        help="where to write the report (default: eval.json beside the checkpoint)",
    )
    _add_config_flags(ev, skip=_UNUSED_BY_EVALUATE, default_note="default: the checkpoint's")
    ev.set_defaults(func=_cmd_evaluate)

    pr = sub.add_parser("predict", help="detect faces in an image and draw their landmarks")
    pr.add_argument(
        "image", type=_user_path, help="the photo to find faces in (or to crop by --box)"
    )
    pr.add_argument("--checkpoint", required=True, type=_user_path, help=_CHECKPOINT_HELP)
    pr.add_argument(
        "--output", type=_user_path, help="annotated image (default: <image>_landmarks.png)"
    )
    pr.add_argument("--json", action="store_true", help="also write and print the numbers as JSON")
    pr.add_argument("--no-detect", action="store_true", help="use the whole image as the face box")
    pr.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"),
                    help="the face box, instead of detecting faces")  # fmt: skip
    pr.add_argument(
        "--device", default="auto", help="auto, cpu, cuda or cuda:N; default: %(default)s"
    )
    pr.add_argument(
        "--backend", default="auto", help=f"attention backend: {backends}; default: %(default)s"
    )
    pr.set_defaults(func=_cmd_predict)

    ex = sub.add_parser("export", help="TorchScript / torch.export / ONNX, checked against eager")
    ex.add_argument("--checkpoint", required=True, type=_user_path, help=_CHECKPOINT_HELP)
    ex.add_argument(
        "--format", choices=("torchscript", "export", "onnx"),
        help="default: the one --output names (.pt2, .onnx, .ts.pt or .ts), else export",
    )  # fmt: skip
    ex.add_argument(
        "--output",
        type=_user_path,
        help="default: the checkpoint's name with .pt2, .ts.pt or .onnx for --format",
    )
    ex.add_argument(
        "--backend", default="reference",
        help=f"attention backend recorded in the file: {backends}; default: %(default)s",
    )  # fmt: skip
    ex.set_defaults(func=_cmd_export)

    run = sub.add_parser(
        "run",
        help="generate, train, evaluate, predict, export: the `make run` job",
        description="The `make run` job, from the cpu preset: options come from the cpu preset, "
        "then --config, then flags.",
    )
    _add_config_flags(run, defaults=read_config_file("cpu"))
    run.add_argument(
        "--resume", action="store_true",
        help="continue the training of an interrupted run from <out>/last.pt, then the rest",
    )  # fmt: skip
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=_cmd_run)
    return parser


def _without_worker_traceback(message: str) -> str:
    """``message`` with a DataLoader worker's traceback (:data:`_WORKER_TRACEBACK`) replaced by
    the message of the error it ends with, as ``--workers 0`` gives it."""
    found = _WORKER_TRACEBACK.search(message)
    if found is None:
        return message
    return message[: found.start()] + found["message"] + message[found.end() :]


def _error_text(error: Exception) -> str:
    """The line an error gets: an errno error as a sentence (``str()`` starts it with
    ``[Errno 13]`` and quotes its file), a DataLoader worker's traceback shortened, and gloo's
    words for a peer that went away replaced by what happened (that peer's own line gives the
    cause)."""
    message = str(error)
    if isinstance(error, OSError) and error.strerror:
        files = [str(f) for f in (error.filename, error.filename2) if f is not None]
        message = ": ".join([" -> ".join(files), error.strerror] if files else [error.strerror])
    if _GLOO_PEER_GONE.search(message):
        return "another process of the launch stopped (its own line says why)"
    return _without_worker_traceback(message)


def _what_is_saved(args: argparse.Namespace) -> str:
    """For an interrupted ``train`` or ``run``: what ``last.pt`` holds and how to go on."""
    config = getattr(args, "resolved_config", None)
    if args.command not in ("train", "run") or config is None:
        return ""
    saved = Path(config.out) / "last.pt"
    if not saved.is_file():
        return f" before its first epoch ended: no checkpoint in {config.out}"
    try:
        from aanet import checkpoint

        done = f" epoch {checkpoint.load(saved)['epoch'] + 1} of {config.epochs}"
    except Exception:  # noqa: BLE001 - the message is all that is left to give
        done = ""
    unchanged = saved.stat().st_mtime_ns == getattr(args, "saved_before", None)
    earlier = " (an earlier run's: this one ended no epoch)" if unchanged else ""
    return f"; {saved} holds{done}{earlier}: the same command with --resume continues from there"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``aanet`` console script. Under ``torchrun`` only rank 0 logs below
    the error level (every rank reads the same data: its warnings would repeat once per rank),
    an error names the rank that raised it, Ctrl-C is reported by rank 0 alone, and commands
    other than ``train`` and ``run`` run on rank 0 alone."""
    args = build_parser().parse_args(argv)
    try:
        rank, world = rank_and_world()
    except ValueError as error:  # RANK, WORLD_SIZE as no torchrun launch sets them
        if args.debug:
            raise
        print(f"aanet {args.command}: error: {error} (aanet --debug: traceback)", file=sys.stderr)
        return 2
    main_process = rank == 0
    # aanet's own progress at INFO; other libraries (onnxscript prints hundreds of INFO lines on
    # an ONNX export) from WARNING up.
    logging.basicConfig(
        level=logging.WARNING if main_process else logging.ERROR,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aanet").setLevel(logging.INFO if main_process else logging.ERROR)
    if world > 1 and args.command not in ("train", "run"):
        # One process's work (two would print twice and write the same files at once).
        if rank > 0:
            return 0
        logging.getLogger("aanet").info(
            "aanet %s runs in one process: rank 0 does it, the other ranks exit", args.command
        )
    try:
        args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        if rank > 0:
            # Ctrl-C reaches every rank of a torchrun launch: rank 0's line (it writes last.pt)
            # says it all, once.
            return 130
        print(f"aanet {args.command}: interrupted{_what_is_saved(args)}", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, FloatingPointError) as error:
        if args.debug:
            raise
        where = f" on rank {rank} of {world}" if world > 1 else ""
        print(
            f"aanet {args.command}: error{where}: {_error_text(error)} (aanet --debug: traceback)",
            file=sys.stderr,
        )
        return 2
    return 0
