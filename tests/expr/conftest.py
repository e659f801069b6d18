"""Expression-kernel tests: a call that silently fell back to torch would test the reference
against itself, so the fallback is forbidden (it raises instead)."""

from __future__ import annotations

import dataclasses

import pytest

from kernforge import config


@pytest.fixture(autouse=True)
def _no_fallback(monkeypatch):
    settings = dataclasses.replace(config.settings, disable_fallback=True)
    monkeypatch.setattr(config, "settings", settings)
