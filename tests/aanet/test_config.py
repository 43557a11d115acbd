"""Run configurations: presets load, and every bad value is refused with the option named."""

from __future__ import annotations

import pytest

from aanet.cli import main
from aanet.config import make_config, preset_names, read_config_file


@pytest.mark.parametrize("preset", preset_names())
def test_presets_are_valid(preset: str):
    config = make_config(read_config_file(preset))
    assert config.epochs >= 1 and config.batch_size >= 1


@pytest.mark.parametrize(
    "values,message",
    [
        ({"batch_size": 0}, "batch_size: expected at least 1"),
        ({"epochs": -1}, "epochs: expected at least 1"),
        ({"num_heads": 0}, "num_heads: expected at least 1"),
        ({"image_size": 7}, "image_size: expected at least 8"),
        ({"workers": -2}, "workers: expected at least 0"),
        ({"lr": 0.0}, "lr: expected a positive number"),
        ({"lr": float("nan")}, "lr: expected a finite number"),
        ({"heatmap_reg": -1.0}, "heatmap_reg: expected at least 0"),
        ({"heatmap_reg": float("inf")}, "heatmap_reg: expected a finite number"),
        ({"lr": "fast"}, "lr: expected a number"),
        ({"epochs": 2.5}, "epochs: expected an int"),
        ({"attention": "yes"}, "attention: expected true or false"),
        ({"blocks": []}, "blocks: expected one or more positive ints"),
        ({"blocks": [1, 0]}, "blocks: expected one or more positive ints"),
        ({"loss": "mae"}, "loss: expected one of"),
        ({"data": "celeba"}, "data: expected one of"),
        ({"on_error": "ignore"}, "on_error: expected one of"),
        ({"backend": "fast"}, "backend: expected one of"),
        ({"compile": "max-autotune"}, "compile: expected one of"),
        ({"compile": True}, "compile: expected a string"),
        ({"device": "gpu"}, "device: expected auto, cpu, cuda or cuda:N"),
        ({"seed": -1}, "seed: expected at least 0"),
        # Overflowed torch's 64-bit seed without a name, or only at the second epoch (seed + 1).
        ({"seed": 2**64 - 1}, r"seed: expected at most 2\*\*32 - 1 = 4294967295"),
        ({"seed": 10**23}, r"seed: expected at most 2\*\*32 - 1"),
        ({"normalization": "inter-eye"}, "normalization: expected one of .*'inter-pupil'"),
        ({"normalization": 1}, "normalization: expected a string"),
    ],
    ids=lambda v: str(v)[:40] if isinstance(v, dict) else "",
)
def test_bad_values_are_named(values: dict, message: str):
    with pytest.raises(ValueError, match=message):
        make_config(values)


def test_yaml_exponent_strings_are_numbers(tmp_path):
    """PyYAML reads ``lr: 1e-3`` (no dot) as a string; it is taken as the number it means."""
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-3\nweight_decay: 5e-4\ndevice: cuda:1\n")
    config = make_config(read_config_file(path))
    assert config.lr == 1e-3 and config.weight_decay == 5e-4 and config.device == "cuda:1"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "0"], "batch_size: expected at least 1"),
        (["--normalization", "inter-eye"], "normalization: expected one of"),
    ],
)
def test_cli_refuses_a_bad_flag_before_any_work(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(["train", *flags, "--out", str(out), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_the_normalization_defaults_to_inter_ocular_in_every_preset():
    assert make_config({}).normalization == "inter-ocular"
    for preset in preset_names():
        assert make_config(read_config_file(preset)).normalization == "inter-ocular", preset


def test_cli_debug_flag_lets_the_error_through_with_its_traceback(tmp_path):
    with pytest.raises(ValueError, match="batch_size: expected at least 1"):
        main(["--debug", "train", "--batch-size", "0", "--out", str(tmp_path), "--no-progress"])


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("run.yaml", "lr: [1e-3\n", "not valid YAML"),
        ("run.json", '{"lr": 1e-3,}', "not valid JSON"),
    ],
)
def test_a_config_file_with_a_syntax_error_is_named(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=f"config {path}: {message}"):
        read_config_file(path)


@pytest.mark.parametrize("text", ["? [a, b]\n: 1\n", "{a: 1}: 2\n"])
def test_a_yaml_key_that_is_a_list_or_mapping_is_named(tmp_path, text):
    """An unhashable key raised a bare TypeError from the duplicate-key check (exit 1)."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    message = f"(?s)config {path}: not valid YAML: .*found unhashable key"
    with pytest.raises(ValueError, match=message):
        read_config_file(path)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("run.yaml", "lr: 1e-3\nepochs: 3\nlr: 1e-2\n"),
        ("run.json", '{"lr": 1e-3, "epochs": 3, "lr": 1e-2}'),
    ],
)
def test_an_option_given_twice_in_a_config_file_is_refused(tmp_path, name, text):
    """YAML and JSON readers keep the last of two equal keys; a config that sets one option twice
    is a mistake whichever value was meant."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=f"config {path}: .*lr is given twice"):
        read_config_file(path)


def test_a_yaml_merge_key_may_still_be_overridden():
    """Overriding a merged key (``<<: *base`` then the key) is YAML's intent, not a duplicate."""
    import yaml

    from aanet.config import _yaml_loader_of_unique_keys

    text = "base: &base {lr: 0.1, epochs: 2}\nrun:\n  <<: *base\n  lr: 0.01\n"
    loaded = yaml.load(text, Loader=_yaml_loader_of_unique_keys())
    assert loaded["run"] == {"lr": 0.01, "epochs": 2}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"width": 8}, "width: 8 is too narrow for num_heads=4 at stride 8"),
        ({"width": 1}, "width: expected at least 2"),
        ({"input_size": 16, "blocks": [1, 1, 1, 1]}, "input_size: 4 stages .* at least 32"),
    ],
)
def test_a_network_that_cannot_be_built_names_the_option(changes, message):
    from aanet.model import build_model

    with pytest.raises(ValueError, match=message):
        build_model(make_config(changes).model_config())
