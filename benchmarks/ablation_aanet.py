"""AANet with and without attention: same data, seed and budget; a table and a plot.

Trains the two variants of a preset (``--attention`` and ``--no-attention``) one after the other
through ``aanet.train.train``, then writes ``aanet_ablation_<name>.md`` (whole-set metrics, the
confidence summary, each WFLW subset) and ``aanet_ablation_<name>.png`` (training loss and test
NME per epoch, both variants on the same axes). Each variant's run directory keeps its checkpoint,
so ``--resume`` continues a killed ablation where it stopped.

    python benchmarks/ablation_aanet.py --config cpu --epochs 24     # about 30 minutes on 2 cores
    python benchmarks/ablation_aanet.py --config cpu --epochs 24 --seed 1 \
        --data-root runs/data/synthetic-seed1 --runs-dir runs/ablation-seed1 \
        --name synthetic_cpu_seed1
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from aanet.config import Config, make_config, read_config_file  # noqa: E402
from aanet.evaluate import NOT_SUBSETS  # noqa: E402
from aanet.files import replacing  # noqa: E402
from benchmarks import common  # noqa: E402

VARIANTS = {"attention": True, "no-attention": False}


def variant_config(args: argparse.Namespace, attention: bool, name: str) -> Config:
    """The preset with this run's budget, regulariser weight and variant."""
    values = read_config_file(args.config)
    values.update(attention=attention, out=str(args.runs_dir / name))
    for key in ("epochs", "heatmap_reg", "seed", "device", "data_root"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    return make_config(values)


def run_variant(config: Config, resume: bool, progress: bool) -> dict[str, Any]:
    """Train one variant (continuing its checkpoint with ``resume``); metrics and history."""
    from aanet.train import train

    checkpoint = Path(config.out) / "last.pt"
    result = train(config, resume="auto" if resume and checkpoint.exists() else None,
                   progress=progress)  # fmt: skip
    parameters = sum(p.numel() for p in result["model"].parameters())
    return {"report": result["report"], "history": result["history"], "parameters": parameters}


def summary_table(results: dict[str, dict[str, Any]]) -> str:
    header = ["model", "parameters", "NME %", "FR@0.1 %", "AUC@0.1", "best epoch NME %"]
    header += ["median confidence", "rank correlation, confidence vs error"]
    rows = []
    for name, result in results.items():
        full, confidence = result["report"]["full"], result["report"]["confidence"]
        best = min(row["test_nme"] for row in result["history"])
        rows.append([
            f"AANet, {name}", f"{result['parameters']:,}", f"{100 * full['nme']:.2f}",
            f"{100 * full['fr']:.2f}", f"{full['auc']:.4f}", f"{100 * best:.2f}",
            f"{confidence['median']:.2f}", f"{confidence['rank_correlation']:+.2f}",
        ])  # fmt: skip
    return common.markdown_table(rows, header)


def subset_table(results: dict[str, dict[str, Any]]) -> str:
    """Per subset: faces, then NME % / FR@0.1 % / AUC@0.1 of each variant."""
    names = list(results)
    first = results[names[0]]["report"]
    subsets = [s for s in first if s not in NOT_SUBSETS]
    rows = []
    for subset in subsets:
        cells = [subset, first[subset]["count"]]
        for name in names:
            m = results[name]["report"][subset]
            cells.append(f"{100 * m['nme']:.2f} / {100 * m['fr']:.2f} / {m['auc']:.4f}")
        rows.append(cells)
    return common.markdown_table(rows, ["subset", "faces", *names])


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Training loss and test NME per epoch, one line per variant; written whole or not at all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 30, not 3 x 10^1, on the log axes

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, result in results.items():
        epochs = [row["epoch"] for row in result["history"]]
        left.plot(epochs, [row["train_loss"] for row in result["history"]], marker=".", label=name)
        right.plot(
            epochs, [100 * row["test_nme"] for row in result["history"]], marker=".", label=name
        )
    left.set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss")
    right.set(xlabel="epoch", ylabel="NME (%)", yscale="log", title="test NME (inter-ocular)")
    for axis in (left, right):
        axis.grid(alpha=0.3, which="both")
        axis.yaxis.set_major_formatter(plain)
        axis.yaxis.set_minor_formatter(plain)
        axis.legend()
    fig.tight_layout()
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=100)  # the temporary name ends in .png: savefig's format
    finally:
        plt.close(fig)


def _name(text: str) -> str:
    """``--name``: letters, digits, ``_`` and ``-`` (it goes into the result files' names; a
    ``/`` would put them elsewhere, and nothing else is checked until both variants trained)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        raise argparse.ArgumentTypeError(
            f"expected letters, digits, '_' and '-' only, got {text!r}"
        )
    return text


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=common.description(__doc__), allow_abbrev=False)
    parser.add_argument("--config", default="cpu", help="preset name or YAML/JSON file")
    parser.add_argument("--epochs", type=common.positive_int, help="default: the preset's")
    parser.add_argument("--heatmap-reg", type=float, help="default: the preset's or Config's")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="default: the preset's")
    parser.add_argument(
        "--data-root",
        help="default: the preset's; give each --seed its own (the synthetic set follows the seed)",
    )
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS_DIR)
    parser.add_argument(
        "--name", type=_name, default="synthetic_cpu", help="suffix of the result files"
    )
    parser.add_argument("--resume", action="store_true", help="continue the variants' checkpoints")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:  # a bad preset or value is refused here, by name, before either variant trains
        configs = {name: variant_config(args, on, name) for name, on in VARIANTS.items()}
    except (OSError, ValueError) as error:
        raise SystemExit(str(error)) from None
    out_dir = common.out_dir(args.out_dir)  # checked now, not after the training
    results = {
        name: run_variant(config, args.resume, not args.no_progress)
        for name, config in configs.items()
    }
    config = configs["attention"]
    meta = common.run_metadata(torch.device(config.device if config.device != "auto" else "cpu"))
    stem = f"aanet_ablation_{args.name}"
    plot(results, out_dir / f"{stem}.png")
    md = (
        f"# AANet with and without attention: {config.data} set, {meta['device_name']}\n\n"
        f"{meta['date']}; torch {meta['torch']}, {meta['cpu_threads']} CPU threads. Same data "
        f"({config.num_train:,} training / {config.num_test:,} test faces), seed {config.seed} "
        f"and budget: `--config {args.config}` ({config.input_size}x{config.input_size} input, "
        f"width {config.width}, blocks {config.blocks}, loss {config.loss} with heat-map "
        f"regulariser weight {config.heatmap_reg:g}, Adam lr {config.lr:g}, batch "
        f"{config.batch_size}, cosine schedule) for {config.epochs} epochs, one seed per "
        f"variant. Command: `python benchmarks/ablation_aanet.py {' '.join(argv or sys.argv[1:])}`"
        f".\n\n" + summary_table(results) + "\n\nPer WFLW subset (NME % / FR@0.1 % / AUC@0.1):\n\n"
        + subset_table(results) + f"\n\n![curves]({stem}.png)\n"
    )  # fmt: skip
    common.write_text(md, out_dir / f"{stem}.md")
    print(md)
    return results


if __name__ == "__main__":
    common.run_cli(main)
