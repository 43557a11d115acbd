"""Shared pytest setup: the interpreter folder, markers for absent hardware, NaN-poisoned
allocations."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# A fresh Inductor cache for each session, set before torch is imported: PyTorch keys its FX-graph
# cache on the graph, not on what custom ops' fake kernels return (pytorch/pytorch#160472), so a
# graph compiled by an older checkout (another lse dtype, say) would be reused and fail its own
# output checks. A TORCHINDUCTOR_CACHE_DIR set outside is kept.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="aanet-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

# tests/triton_interpret needs TRITON_INTERPRET=1 before Triton is imported, so it runs in its own
# process (`make test` does both). Any other run, `pytest -m gpu tests` on a GPU machine included,
# leaves that folder out instead of failing at its collection.
if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore = ["triton_interpret"]

# On a GPU each Triton kernel runs its first configuration: autotuning would compile and time all
# of them for each of the suite's dozens of shapes (minutes). tests/test_triton_gpu.py checks every
# configuration on its own; the benchmarks autotune.
os.environ.setdefault("AANET_KERNELS_TRITON_AUTOTUNE", "0")


def _preload_extension(path: str) -> None:
    """Load the compiled extension from ``path`` as ``aanet_kernels._C`` before the package is
    imported, so that the package uses it instead of the build in the source tree (`make
    sanitize` points this at the AddressSanitizer/UBSan build)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("aanet_kernels._C", path)
    if spec is None or spec.loader is None or not os.path.isfile(path):
        raise RuntimeError(f"AANET_KERNELS_TEST_EXTENSION: no extension module at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["aanet_kernels._C"] = module


if os.environ.get("AANET_KERNELS_TEST_EXTENSION"):
    _preload_extension(os.environ["AANET_KERNELS_TEST_EXTENSION"])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is present on this machine")
    for item in items:
        # The marker, not item.keywords: a parameter id "gpu" is a keyword too.
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture
def poisoned_allocations():
    """Every torch.empty in the test is filled with NaN, so a kernel that leaves part of an output
    it allocated unwritten gives NaN instead of passing by luck."""
    import torch.utils.deterministic as det

    previous = (torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=True)
    det.fill_uninitialized_memory = previous[1]
