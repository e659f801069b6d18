"""Fixtures for the CUDA C++ tests: every test gets its own cubin cache folder."""

from __future__ import annotations

import dataclasses

import pytest

from kernforge import config
from kernforge import cuda as kcuda


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """A fresh ``KERNFORGE_CACHE_DIR`` (through config) and empty in-memory caches."""
    d = tmp_path / "kf-cache"
    monkeypatch.setattr(config, "settings", dataclasses.replace(config.settings, cache_dir=d))
    kcuda.clear_memory_cache()
    kcuda.cache.reset_stats()
    yield d
    kcuda.clear_memory_cache()
