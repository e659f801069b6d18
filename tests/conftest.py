"""Shared fixtures: every test runs with kernel outputs NaN-poisoned and a clean dispatch state."""

from __future__ import annotations

import pytest
import torch

from kernforge import dispatch
from kernforge.kernels import common


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _poison_and_reset():
    common.poison_outputs(True)
    torch.manual_seed(torch.initial_seed() % 2**31)  # fresh inputs, reproducible per run seed
    yield
    common.poison_outputs(False)
    dispatch._backend_stack.clear()
    dispatch._default_backend = None
