"""tests/hf: transformers is optional (skipped without it), nothing is downloaded, and every
test leaves transformers unpatched (module globals are process-wide)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from kernforge.hf import attention, patching  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


@pytest.fixture(autouse=True)
def _unpatched():
    """Undo whatever a test left patched: names, and rope held by models it did not unpatch."""
    attention._warned.clear()
    yield
    for name in list(patching._by_name):
        patching.unpatch(name)
    for model_type, hold in list(patching._rope.items()):
        patching.ARCHITECTURES[model_type].module().apply_rotary_pos_emb = hold.original
        del patching._rope[model_type]
