"""Records of a configured data set: the synthetic set (generated on first use), WFLW or 300W."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from aanet.datasets import synthetic, w300, wflw
from aanet.datasets.records import Record

if TYPE_CHECKING:  # aanet.config imports this module: a run-time import would be a cycle
    from aanet.config import Config

DATASETS = ("synthetic", "wflw", "300w")
log = logging.getLogger("aanet.data")


def prepare(config: Config) -> None:
    """Generate the synthetic set if the config asks for it and it is not on disk yet."""
    if config.data == "synthetic":
        began = time.perf_counter()
        wanted = synthetic.SyntheticConfig(
            config.num_train, config.num_test, config.image_size, config.seed
        )
        log.info("synthetic set: %s in %s", wanted, config.data_root)
        synthetic.generate(config.data_root, wanted)
        log.info("synthetic set ready (%.1f s)", time.perf_counter() - began)


def check_sources(config: Config) -> None:
    """Raise, before any data is read, when the annotations of a split are not where the config
    says (a missing ``--test-root`` would otherwise show only once the whole training set had
    loaded). The synthetic set is checked by its generation."""
    for split in ("train", "test"):
        if config.data == "wflw":
            wflw.existing_annotation_file(Path(config.data_root), split)
        elif config.data == "300w":
            w300.existing_folder(_300w_folder(config, split))


def _300w_folder(config: Config, split: str) -> Path:
    folder = config.data_root if split == "train" else config.test_root
    if not folder:
        raise ValueError("test_root: the 300W test folder is needed for evaluation")
    return Path(folder)


def required_distances(config: Config, split: str) -> tuple[str, ...]:
    """The normalising distances a face of ``split`` must have (not zero) to be loaded: the
    inter-ocular one always (outer eye corners that coincide are a broken annotation, and the
    default NME would be undefined), and for the test set the one its NME is measured by
    (``config.normalization``). The training set does not depend on the normalisation, which
    only the evaluation uses."""
    if split == "test":
        return tuple(dict.fromkeys(("inter-ocular", config.normalization)))
    return ("inter-ocular",)


def load_split(config: Config, split: str) -> list[Record]:
    """The ``train`` or ``test`` records of the configured data set."""
    distances = required_distances(config, split)
    if config.data in ("synthetic", "wflw"):
        return wflw.load_wflw(config.data_root, split, config.on_error, distances)
    if config.data == "300w":
        folder = _300w_folder(config, split)
        records = w300.load_300w(folder, config.on_error, distances, split)
        if split == "test":
            w300.warn_without_subsets(records, folder)
        return records
    raise ValueError(f"data: expected one of {DATASETS}, got {config.data!r}")
