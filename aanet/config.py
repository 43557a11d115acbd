"""Run configuration: one flat dataclass, read from YAML/JSON and overridden by flags."""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from aanet.model import ModelConfig

PRESETS = Path(__file__).parent / "configs"
NAN_POLICIES = ("stop", "skip")
COMPILERS = ("none", "inductor", "aot_eager")


@dataclass
class Config:
    """Everything a training run needs. Paths are relative to the working directory."""

    # data
    data: str = "synthetic"  # synthetic | wflw | 300w
    data_root: str = "runs/data/synthetic"  # WFLW root, or 300W training folder
    test_root: str = ""  # 300W test folder
    num_train: int = 1500  # synthetic set only
    num_test: int = 300
    image_size: int = 160
    on_error: str = "skip"  # bad annotations: skip (with a count in the log) or stop
    workers: int = 0
    # model
    input_size: int = 128
    width: int = 64
    blocks: list[int] = field(default_factory=lambda: [1, 1, 2])
    attention: bool = True
    num_heads: int = 4
    # optimisation (defaults from the AANet description: MSE, batch 64, Adam, lr 1e-3)
    loss: str = "mse"
    # Weight of the heat-map regulariser (losses.heatmap_divergence): 300 makes confidences
    # informative, and on a 24-epoch schedule the landmarks more accurate (README).
    heatmap_reg: float = 300.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 30
    # run
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    backend: str = "auto"  # attention_2d backend: auto | reference | cpu | cuda | triton
    amp: bool = False
    # torch.compile the training step's model: none | inductor (the default compiler) | aot_eager
    # (traced but not code-generated: to tell a compiler problem from a model one)
    compile: str = "none"
    on_nan: str = "stop"  # a non-finite loss: stop (error naming the step) or skip that step
    # evaluation (every epoch's and aanet evaluate's): the NME's distance, inter-ocular (outer
    # eye corners) or inter-pupil
    normalization: str = "inter-ocular"
    seed: int = 0
    out: str = "runs/aanet"

    def model_config(self) -> ModelConfig:
        """The network shape part."""
        return ModelConfig(
            num_points=68 if self.data == "300w" else 98,
            input_size=self.input_size,
            width=self.width,
            blocks=tuple(self.blocks),
            attention=self.attention,
            num_heads=self.num_heads,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_same_model(
        self,
        trained: Config,
        checkpoint: Path | str,
        uses: str = "evaluation runs that model as saved",
    ) -> None:
        """Refuse options that describe another network than the one ``checkpoint`` holds
        (trained with ``trained``): evaluation runs that model as it is, so a crop size it was
        not trained at, say, would only give a wrong NME; ``--resume`` continues that model.
        ``uses`` says, in the error, what is done with it."""
        mine, theirs = self.model_config(), trained.model_config()
        if mine.num_points != theirs.num_points:
            raise ValueError(
                f"data: {checkpoint} predicts {theirs.num_points} landmarks (trained on "
                f"{trained.data!r}), the {self.data!r} data has {mine.num_points}"
            )
        for name, value in asdict(mine).items():
            if value != getattr(theirs, name):
                raise ValueError(
                    f"{name}: {checkpoint} was trained with {name}={getattr(theirs, name)}; "
                    f"{uses}, got {name}={value}"
                )


def read_config_file(path: Path | str) -> dict[str, Any]:
    """Keys and values of a ``.yaml``/``.yml`` (needs PyYAML) or ``.json`` file (the suffix in any
    case); a bare name such as ``cpu`` means the preset ``aanet/configs/cpu.yaml``. A leading
    ``~`` is the home folder."""
    path = Path(path).expanduser()
    if not path.exists() and (PRESETS / f"{path}.yaml").is_file():
        path = PRESETS / f"{path}.yaml"
    if path.is_dir():
        raise IsADirectoryError(f"config: {path} is a folder, not a YAML/JSON file")
    if not path.is_file():
        raise FileNotFoundError(f"config: no such file {path} (presets: {preset_names()})")
    kind = path.suffix.lower()
    if kind not in (".yaml", ".yml", ".json"):
        raise ValueError(
            f"config {path}: expected a .yaml, .yml or .json file (or a preset: {preset_names()})"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:  # a bare "[Errno 13] Permission denied: 'run.yaml'" otherwise
        raise type(error)(f"config: cannot read {path} ({error.strerror})") from error
    except UnicodeDecodeError as error:
        line = error.object[: error.start].count(b"\n") + 1
        raise ValueError(
            f"config {path}: not UTF-8 text (line {line}: byte {error.object[error.start]:#04x})"
        ) from None
    if kind == ".json":
        try:
            values = json.loads(text, object_pairs_hook=_mapping_of_unique_keys)
        except json.JSONDecodeError as error:
            raise ValueError(f"config {path}: not valid JSON: {error}") from error
        except _DuplicateKey as error:
            raise ValueError(f"config {path}: {error}") from None
    else:
        import yaml

        try:
            values = yaml.load(text, Loader=_yaml_loader_of_unique_keys())
        except yaml.YAMLError as error:
            raise ValueError(f"config {path}: not valid YAML: {error}") from error
        if values is None:  # an empty file, or only comments: the defaults
            values = {}
    if not isinstance(values, dict):
        raise ValueError(
            f"config {path}: expected a mapping of option names to values, got a "
            f"{type(values).__name__}"
        )
    check_names(values, f"config {path}")
    return values


class _DuplicateKey(ValueError):
    """A key given twice in one mapping of a config file: YAML and JSON readers keep the last
    silently, so a run would quietly ignore the first value."""


def _mapping_of_unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise _DuplicateKey(f"{key} is given twice (the readers would keep the last silently)")
    return dict(pairs)


def _yaml_loader_of_unique_keys() -> type:
    """PyYAML's safe loader, refusing a key given twice in one mapping (merge keys ``<<`` may
    still be overridden, as YAML intends)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                # A list or mapping key (`? [a, b]`) is unhashable: SafeLoader refuses it below.
                if not isinstance(key, str | int | float | bool):
                    continue
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"{key} is given twice (the readers would keep the last silently)",
                        key_node.start_mark,
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def make_config(values: dict[str, Any]) -> Config:
    """A :class:`Config` from a mapping; unknown keys, wrong types and out-of-range values raise
    an error naming the option."""
    values = dict(values)
    check_names(values, "config")
    for f in fields(Config):
        # PyYAML reads an exponent without a dot (lr: 1e-3) as a string.
        if f.type == "float" and isinstance(values.get(f.name), str):
            try:
                values[f.name] = float(values[f.name])
            except ValueError:
                pass  # check_config names it
        if f.name in _PATHS and isinstance(values.get(f.name), str):
            values[f.name] = os.path.expanduser(values[f.name])
    config = Config(**values)
    check_config(config)
    return config


# Options that only some data sets read.
_READ_BY = {"num_train": ("synthetic",), "num_test": ("synthetic",), "image_size": ("synthetic",),
            "test_root": ("300w",)}  # fmt: skip


def unread_options(config: Config, given: Iterable[str]) -> list[str]:
    """The options among ``given`` that ``config.data`` does not read (``--test-root`` with
    synthetic data, ``--num-train`` with WFLW): worth a warning, as they change nothing."""
    return [name for name in given if config.data not in _READ_BY.get(name, (config.data,))]


def upsampling_warning(config: Config) -> str | None:
    """A warning when synthetic images are smaller than the network input: each face crop is then
    enlarged, so the network trains on blur and the NME measures detail that was never drawn."""
    if config.data != "synthetic" or config.image_size >= config.input_size:
        return None
    return (
        f"image_size {config.image_size} is below input_size {config.input_size}: every synthetic "
        f"face is upsampled (blurred) to the input; an image_size of at least {config.input_size} "
        "keeps its detail"
    )


# Path options: a leading ~ is the home folder (a shell leaves it as it is in a YAML file, and in
# --out=~/runs).
_PATHS = ("data_root", "test_root", "out")

# Names other tools use for an option, and what it is called here.
_ALIASES = {"learning_rate": "lr", "num_epochs": "epochs", "epoch": "epochs", "heads": "num_heads",
            "crop_size": "input_size", "output": "out", "out_dir": "out", "output_dir": "out",
            "dataset": "data", "num_workers": "workers", "batch": "batch_size"}  # fmt: skip


def _suggest(key: Any, known: list[str]) -> str | None:
    """The option a misspelt ``key`` most likely means, if any."""
    if not isinstance(key, str):
        return None
    name = key.strip().lower().replace("-", "_")
    if name in known:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return close[0] if close else None


def check_names(values: dict[Any, Any], where: str) -> None:
    """Raise ``ValueError`` naming each key of ``values`` that is not an option (``where`` says
    whose: ``config run.yaml``), with the option it most likely means."""
    known = [f.name for f in fields(Config)]
    unknown = [key for key in values if key not in known]
    if not unknown:
        return
    names = []
    for key in unknown:
        close = _suggest(key, known)
        names.append(f"{key!r} (did you mean {close!r}?)" if close else repr(key))
    listing = "" if all(_suggest(key, known) for key in unknown) else f"; known: {', '.join(known)}"
    plural = "s" if len(unknown) > 1 else ""
    raise ValueError(f"{where}: unknown option{plural} {', '.join(names)}{listing}")


# Options that must be at least 1, and at least 0.
_POSITIVE = ("num_train", "num_test", "image_size", "input_size", "width", "num_heads",
             "batch_size", "epochs")  # fmt: skip
_NON_NEGATIVE = ("workers", "weight_decay", "heatmap_reg", "seed")
# torch's generators take 64-bit seeds and the sampler seeds each epoch with seed + epoch: 32 bits
# (NumPy's legacy range) leave room for any number of epochs.
MAX_SEED = 2**32 - 1


def option_choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of each option that has a fixed set."""
    # Imported here: the data and kernel packages are heavier than reading a config.
    from aanet.datasets.records import ON_ERROR_CHOICES
    from aanet.datasets.sources import DATASETS
    from aanet.landmarks import NORMALIZATIONS
    from aanet.losses import LOSSES
    from aanet_kernels import BACKENDS

    return {
        "data": DATASETS,
        "on_error": ON_ERROR_CHOICES,
        "on_nan": NAN_POLICIES,
        "loss": LOSSES,
        "backend": ("auto", *BACKENDS),
        "compile": COMPILERS,
        "normalization": NORMALIZATIONS,
    }


_TYPE_WORDS = {"int": "an int", "float": "a number", "bool": "true or false",
               "list[int]": "a list of ints", "str": "a string"}  # fmt: skip


def _type_ok(value: Any, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "list[int]":
        return isinstance(value, list | tuple) and all(_type_ok(v, "int") for v in value)
    return isinstance(value, str)


def check_device_name(device: str) -> None:
    """Raise ``ValueError`` naming ``device`` unless it is auto, cpu, cuda or cuda:N."""
    if device != "auto" and device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {device!r}")


def check_config(config: Config) -> None:
    """Raise ``ValueError`` naming the option if a value has the wrong type or is out of range
    (a YAML typo or ``--batch-size 0`` fails here, before any data is read)."""
    for f in fields(Config):
        value = getattr(config, f.name)
        if not _type_ok(value, f.type):
            raise ValueError(f"{f.name}: expected {_TYPE_WORDS[f.type]}, got {value!r}")
        if f.type == "float" and not math.isfinite(value):
            raise ValueError(f"{f.name}: expected a finite number, got {value!r}")
    for name in _POSITIVE:
        if getattr(config, name) < 1:
            raise ValueError(f"{name}: expected at least 1, got {getattr(config, name)}")
    for name in _NON_NEGATIVE:
        if getattr(config, name) < 0:
            raise ValueError(f"{name}: expected at least 0, got {getattr(config, name)}")
    if config.seed > MAX_SEED:
        raise ValueError(f"seed: expected at most 2**32 - 1 = {MAX_SEED}, got {config.seed}")
    from aanet.datasets.synthetic import SMALLEST_IMAGE

    if config.image_size < SMALLEST_IMAGE:
        raise ValueError(f"image_size: expected at least {SMALLEST_IMAGE}, got {config.image_size}")
    if config.lr <= 0:
        raise ValueError(f"lr: expected a positive number, got {config.lr}")
    if not config.blocks or min(config.blocks) < 1:
        raise ValueError(f"blocks: expected one or more positive ints, got {config.blocks}")
    for name, allowed in option_choices().items():
        if getattr(config, name) not in allowed:
            raise ValueError(f"{name}: expected one of {allowed}, got {getattr(config, name)!r}")
    check_device_name(config.device)
