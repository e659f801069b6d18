"""Fixtures of the tuning tests."""

from __future__ import annotations

import pytest

from kernforge import config


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """An empty KERNFORGE_CACHE_DIR for one test."""
    monkeypatch.setenv("KERNFORGE_CACHE_DIR", str(tmp_path))
    config.reload()
    yield tmp_path
    monkeypatch.delenv("KERNFORGE_CACHE_DIR")
    config.reload()
