"""Every ``KERNFORGE_*`` setting, read in one place.

Settings are read from the environment once, at import, into :data:`settings`. Tests and
tools that change the environment afterwards call :func:`reload`.

- ``KERNFORGE_BACKEND`` (auto | cuda | triton | torch, default auto): backend for catalog ops.
- ``KERNFORGE_DISABLE_FALLBACK`` (0 | 1, default 0): raise ``UnsupportedError`` instead of
  falling back to torch when the chosen backend cannot run the inputs.
- ``KERNFORGE_INTERPRET`` (auto | 0 | 1, default auto): run Triton kernels in Triton's CPU
  interpreter; auto means "when there is no CUDA GPU". Read once, at import.
- ``KERNFORGE_CACHE_DIR`` (a path, default ~/.cache/kernforge): compiled artefacts, tuning.
- ``KERNFORGE_CHECK_INDICES`` (0 | 1, default 1): check index inputs (rope's position ids)
  against their table before launch; costs a device sync.
- ``KERNFORGE_TUNE`` (auto | off, default auto): auto measures the candidate configs of a
  tuned kernel on the GPU the first time a shape bucket is seen and remembers the best on disk;
  off never measures (remembered choices, else each kernel's shipped default).
- ``KERNFORGE_PRETUNED`` (0 | 1, default 1): use the configs shipped per GPU arch
  (kernforge/tune/pretuned/<arch>.json) for shapes not tuned on this machine, so common shapes
  tune nothing on a fresh install.
- ``KERNFORGE_TUNE_MODEL`` (auto | on | off, default auto): prune tuning with the learned
  performance model (kernforge.tune.model): measure only its top-k of the kernel's wide
  candidate space. auto: when a model was trained (``kernforge tune --model train``) and
  scikit-learn or xgboost is installed; on: also train one from the measurement store if none
  was; off: measure each kernel's short list.
- ``KERNFORGE_TUNE_TOPK`` (an int >= 1, default 5): candidates measured per key when pruning.
- ``TRITON_CACHE_DIR``: Triton's compiled binaries. When unset, kernforge points it at
  ``KERNFORGE_CACHE_DIR/triton`` (here, at import), so that ``kernforge warmup`` and
  ``kernforge cache`` find and keep them; a value set by the user is left alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import ConfigError

BACKENDS = ("auto", "cuda", "triton", "torch")


def _flag(env: dict[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; use 1 or 0")


def _choice(env: dict[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    raw = env.get(name, "").strip().lower() or default
    if raw not in choices:
        raise ConfigError(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return raw


def _positive(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{name}={raw!r} is not a positive integer; use e.g. {default}")
    return value


@dataclass(frozen=True)
class Settings:
    """The parsed ``KERNFORGE_*`` environment. See the module docstring for the table."""

    backend: str = "auto"
    disable_fallback: bool = False
    interpret: str = "auto"  # "auto" | "0" | "1"
    cache_dir: Path = Path("~/.cache/kernforge").expanduser()
    check_indices: bool = True
    tune: str = "auto"  # "auto" | "off"
    pretuned: bool = True
    tune_model: str = "auto"  # "auto" | "on" | "off"
    tune_topk: int = 5

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        """Parse settings from ``env`` (default: ``os.environ``); raises ``ConfigError``."""
        env = dict(os.environ if env is None else env)
        cache = env.get("KERNFORGE_CACHE_DIR") or "~/.cache/kernforge"
        return cls(
            backend=_choice(env, "KERNFORGE_BACKEND", BACKENDS, "auto"),
            disable_fallback=_flag(env, "KERNFORGE_DISABLE_FALLBACK", False),
            interpret=_choice(env, "KERNFORGE_INTERPRET", ("auto", "0", "1"), "auto"),
            cache_dir=Path(cache).expanduser(),
            check_indices=_flag(env, "KERNFORGE_CHECK_INDICES", True),
            tune=_choice(env, "KERNFORGE_TUNE", ("auto", "off"), "auto"),
            pretuned=_flag(env, "KERNFORGE_PRETUNED", True),
            tune_model=_choice(env, "KERNFORGE_TUNE_MODEL", ("auto", "on", "off"), "auto"),
            tune_topk=_positive(env, "KERNFORGE_TUNE_TOPK", 5),
        )

    def describe(self) -> dict[str, str]:
        """The settings as strings, for ``kernforge info`` and benchmark records."""
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}


settings: Settings = Settings.from_env()

#: The TRITON_CACHE_DIR value kernforge set (None when the user set one or none was set yet).
_triton_dir_set: str | None = None


def _point_triton_cache() -> None:
    """Point Triton's binary cache under KERNFORGE_CACHE_DIR unless the user chose a folder
    (Triton reads the variable each time it looks up a kernel)."""
    global _triton_dir_set
    current = os.environ.get("TRITON_CACHE_DIR")
    if current and current != _triton_dir_set:
        return  # the user's choice
    _triton_dir_set = str(settings.cache_dir / "triton")
    os.environ["TRITON_CACHE_DIR"] = _triton_dir_set


def triton_cache_dir() -> Path:
    """The folder of Triton's compiled binaries (``TRITON_CACHE_DIR``; see the module doc)."""
    return Path(os.environ.get("TRITON_CACHE_DIR") or settings.cache_dir / "triton").expanduser()


_point_triton_cache()


def reload(env: dict[str, str] | None = None) -> Settings:
    """Re-read the environment (or ``env``) into :data:`settings` and return it.

    ``KERNFORGE_INTERPRET`` only takes effect at import: Triton fixes the interpreter choice
    when kernels are decorated.
    """
    global settings
    settings = Settings.from_env(env)
    _point_triton_cache()
    return settings
