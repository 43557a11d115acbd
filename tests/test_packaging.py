"""What `pip install` of this repository ships: wheel and source distribution contents, and the
declared dependencies against what the code imports.

The wheel is built pure-Python (``AANET_KERNELS_NO_EXTENSION=1``) so the test takes seconds; the
extension is what `make build` checks.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("aanet", "aanet_kernels")
# Import name -> distribution name, where they differ.
DISTRIBUTIONS = {
    "yaml": "pyyaml",
    "PIL": "pillow",
    "cv2": "opencv-python-headless",
}


def _build(command: list[str], out: Path) -> Path:
    env = {**os.environ, "AANET_KERNELS_NO_EXTENSION": "1"}
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    (built,) = out.iterdir()
    return built


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps"]
    with zipfile.ZipFile(_build([*pip_wheel, ".", "-w", str(out)], out)) as archive:
        yield archive


@pytest.fixture(scope="module")
def wheel_names(wheel) -> set[str]:
    return set(wheel.namelist())


def _sources(package: str, suffix: str) -> set[str]:
    return {str(p.relative_to(ROOT)) for p in (ROOT / package).rglob(f"*{suffix}")}


def test_wheel_carries_every_module_and_the_aanet_presets(wheel_names):
    expected = _sources("aanet", ".py") | _sources("aanet_kernels", ".py")
    expected |= _sources("aanet/configs", ".yaml")
    expected = {p for p in expected if "__pycache__" not in p}
    assert expected <= wheel_names, sorted(expected - wheel_names)
    assert "aanet/configs/cpu.yaml" in wheel_names


def test_wheel_metadata_names_the_license_and_carries_its_text(wheel, wheel_names):
    """The license comes from setup.py (pyproject's ``dynamic``), so that setuptools older than 77
    can build: the wheel must still say it."""
    metadata = next(n for n in wheel_names if n.endswith(".dist-info/METADATA"))
    headers = wheel.read(metadata).decode().split("\n\n", 1)[0].splitlines()
    assert "License: BSD-3-Clause" in headers or "License-Expression: BSD-3-Clause" in headers
    assert any(
        n.endswith(".dist-info/licenses/LICENSE") or n.endswith("/LICENSE") for n in wheel_names
    )


def test_sdist_carries_what_setup_py_compiles(tmp_path):
    sdist = _build([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], tmp_path)
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    sources = set()
    for suffix in (".cpp", ".cu", ".cuh", ".h"):
        sources |= _sources("csrc", suffix)
    assert sources and sources <= names, sorted(sources - names)
    assert {"setup.py", "pyproject.toml", "README.md", "aanet/configs/cpu.yaml"} <= names


def _third_party_imports() -> set[str]:
    """Top-level modules imported anywhere in the two packages, stdlib and own packages left out."""
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in PACKAGES}


def test_every_imported_library_is_a_declared_dependency(wheel, wheel_names):
    """Each library the code imports is in the wheel's ``Requires-Dist`` (extras included)."""
    (metadata,) = [n for n in wheel_names if n.endswith(".dist-info/METADATA")]
    requirements = [
        line.split(":", 1)[1].strip()
        for line in wheel.read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    declared = {re.split(r"[\s;<>=!~\[]", r, maxsplit=1)[0].lower() for r in requirements}
    missing = {
        module
        for module in _third_party_imports()
        if DISTRIBUTIONS.get(module, module).lower() not in declared
    }
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"


@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU build of torch never compiles CUDA")
def test_setup_py_names_a_cuda_home_that_is_not_a_toolkit_root(tmp_path):
    """torch guesses CUDA_HOME from the nvcc on PATH; a wrong guess must stop the build with a
    message naming CUDA_HOME, before ninja fails on a missing header."""
    env = {**os.environ, "CUDA_HOME": str(tmp_path)}
    env.pop("AANET_KERNELS_SKIP_CUDA", None)
    env.pop("AANET_KERNELS_NO_EXTENSION", None)
    result = subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert f"CUDA_HOME={str(tmp_path)!r} is not a CUDA toolkit root" in result.stderr
    assert "AANET_KERNELS_SKIP_CUDA=1" in result.stderr
