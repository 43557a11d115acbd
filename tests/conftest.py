"""Shared pytest setup: the interpreter folder, markers for absent hardware, NaN-poisoned
allocations."""

from __future__ import annotations

import os

import pytest
import torch

# tests/triton_interpret needs TRITON_INTERPRET=1 before Triton is imported, so it runs in its own
# process (`make test` does both). Any other run, `pytest -m gpu tests` on a GPU machine included,
# leaves that folder out instead of failing at its collection.
if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore = ["triton_interpret"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is present on this machine")
    for item in items:
        if "gpu" in item.keywords:
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
