"""config: every KERNFORGE_* setting parsed in one place, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernforge import config
from kernforge.errors import ConfigError


def test_defaults():
    s = config.Settings.from_env({})
    assert s.backend == "auto" and s.disable_fallback is False and s.interpret == "auto"
    assert s.cache_dir == Path("~/.cache/kernforge").expanduser()
    assert s.check_indices is True


def test_values_parsed():
    s = config.Settings.from_env({
        "KERNFORGE_BACKEND": "Torch", "KERNFORGE_DISABLE_FALLBACK": "yes",
        "KERNFORGE_INTERPRET": "1", "KERNFORGE_CACHE_DIR": "/tmp/kf-cache",
        "KERNFORGE_CHECK_INDICES": "0",
    })  # fmt: skip
    assert (s.backend, s.disable_fallback, s.interpret) == ("torch", True, "1")
    assert s.cache_dir == Path("/tmp/kf-cache") and s.check_indices is False


@pytest.mark.parametrize(
    "env, word",
    [({"KERNFORGE_BACKEND": "cudnn"}, "KERNFORGE_BACKEND"),
     ({"KERNFORGE_DISABLE_FALLBACK": "maybe"}, "KERNFORGE_DISABLE_FALLBACK"),
     ({"KERNFORGE_INTERPRET": "2"}, "KERNFORGE_INTERPRET")],
)  # fmt: skip
def test_bad_values_raise(env, word):
    with pytest.raises(ConfigError, match=word):
        config.Settings.from_env(env)


def test_readme_lists_every_setting():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name in ["KERNFORGE_BACKEND", "KERNFORGE_DISABLE_FALLBACK", "KERNFORGE_INTERPRET",
                 "KERNFORGE_CACHE_DIR", "KERNFORGE_CHECK_INDICES"]:  # fmt: skip
        assert name in readme, name
        assert name in config.__doc__, name
