"""Run configuration: one flat dataclass, read from YAML/JSON and overridden by flags."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from aanet.model import ModelConfig

PRESETS = Path(__file__).parent / "configs"
NAN_POLICIES = ("stop", "skip")


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
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 30
    # run
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    backend: str = "auto"  # attention_2d backend: auto | reference | cpu | cuda | triton
    amp: bool = False
    on_nan: str = "stop"  # a non-finite loss: stop (error naming the step) or skip that step
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


def read_config_file(path: Path | str) -> dict[str, Any]:
    """Keys and values of a ``.yaml``/``.yml`` (needs PyYAML) or ``.json`` file; a bare name such
    as ``cpu`` means the preset ``aanet/configs/cpu.yaml``."""
    path = Path(path)
    if not path.exists() and (PRESETS / f"{path}.yaml").is_file():
        path = PRESETS / f"{path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"config: no such file {path} (presets: {preset_names()})")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(path.read_text()) or {}
    else:
        values = json.loads(path.read_text())
    if not isinstance(values, dict):
        raise ValueError(f"config {path}: expected a mapping of option names to values")
    return values


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def make_config(values: dict[str, Any]) -> Config:
    """A :class:`Config` from a mapping; unknown keys raise with the list of known ones."""
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config: unknown options {unknown}; known: {sorted(known)}")
    config = Config(**values)
    if config.on_nan not in NAN_POLICIES:
        raise ValueError(f"on_nan: expected one of {NAN_POLICIES}, got {config.on_nan!r}")
    return config
