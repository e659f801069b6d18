"""The cubin cache: in memory, and on disk under ``KERNFORGE_CACHE_DIR/cuda``.

An entry is keyed by the SHA-256 of everything that decides the cubin: the source, the
in-memory headers, the options, the arch, the NVRTC version, a digest of kernforge's shipped
headers, and :data:`FORMAT_VERSION`. On disk it is one file::

    MAGIC (8 bytes) | header length (4 bytes, little endian) | header (JSON) | cubin

where the header records the key, the cubin's size and SHA-256, and NVRTC's log. A file whose
magic, header, key, size or checksum does not match is a miss (counted in ``corrupt``) and is
rebuilt, never loaded. Writes go to a temporary file in the same folder, then ``os.replace``:
readers see the old entry or the new one, never a part, and concurrent writers of one key
write the same bytes, so the last rename wins harmlessly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .. import config
from ..fileio import write_atomic

#: Bump when the entry layout or anything else that changes cubins without changing the key
#: (e.g. default options) changes: old entries then simply stop matching.
FORMAT_VERSION = 1
MAGIC = b"KFCUBIN\x01"
_SUFFIX = ".kfcubin"


@dataclass
class Stats:
    """Cache counters since process start (or :func:`reset_stats`)."""

    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0  # compiled by NVRTC
    corrupt: int = 0  # disk entries rejected (truncated, flipped bytes, wrong key)
    writes: int = 0
    write_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return dict(self.__dict__)


@dataclass
class Entry:
    """A cached compile: the cubin and NVRTC's log (warnings)."""

    cubin: bytes
    log: str = ""
    meta: dict = field(default_factory=dict)


stats = Stats()
_memory: dict[str, Entry] = {}
_lock = threading.Lock()
_key_locks: dict[str, threading.Lock] = {}


def reset_stats() -> None:
    """Zero the counters in :data:`stats`."""
    global stats
    stats.__dict__.update(Stats().__dict__)


def clear_memory() -> None:
    """Forget the in-memory entries (disk entries stay), e.g. to test the disk path."""
    with _lock:
        _memory.clear()


def key_lock(key: str) -> threading.Lock:
    """A lock per key, so threads of one process compile a given source once."""
    with _lock:
        return _key_locks.setdefault(key, threading.Lock())


@functools.cache
def shipped_headers_digest() -> str:
    """SHA-256 over kernforge's shipped headers, so editing one invalidates old entries."""
    from .nvrtc import INCLUDE_DIR

    h = hashlib.sha256()
    for p in sorted(INCLUDE_DIR.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(INCLUDE_DIR)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def make_key(
    source: str,
    *,
    arch: str,
    options: Sequence[str],
    nvrtc_version: tuple[int, int],
    headers: Mapping[str, str] | None = None,
    include_dirs: Sequence[str] = (),
) -> str:
    """The cache key (hex SHA-256) of one compile."""
    blob = json.dumps(
        {
            "format": FORMAT_VERSION,
            "source": source,
            "headers": sorted((headers or {}).items()),
            "options": list(options),
            "arch": arch,
            "nvrtc": list(nvrtc_version),
            "shipped": shipped_headers_digest(),
            "include_dirs": list(include_dirs),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_dir() -> Path:
    """The on-disk folder of cubins: ``KERNFORGE_CACHE_DIR/cuda`` (read from config on each
    call, so a changed setting takes effect)."""
    return Path(config.settings.cache_dir) / "cuda"


def path_for(key: str) -> Path:
    """Where the entry for ``key`` lives on disk."""
    return cache_dir() / key[:2] / f"{key}{_SUFFIX}"


def encode(key: str, entry: Entry) -> bytes:
    """The on-disk bytes of an entry."""
    header = json.dumps(
        {
            "format": FORMAT_VERSION,
            "key": key,
            "size": len(entry.cubin),
            "sha256": hashlib.sha256(entry.cubin).hexdigest(),
            "log": entry.log,
            "meta": entry.meta,
        }
    ).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + entry.cubin


def decode(key: str, data: bytes) -> Entry | None:
    """The entry in ``data``, or None when anything about it does not check out."""
    if len(data) < len(MAGIC) + 4 or not data.startswith(MAGIC):
        return None
    (hlen,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    if start + hlen > len(data):
        return None
    try:
        header = json.loads(data[start : start + hlen])
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    cubin = data[start + hlen :]
    if (
        header.get("format") != FORMAT_VERSION
        or header.get("key") != key
        or header.get("size") != len(cubin)
        or header.get("sha256") != hashlib.sha256(cubin).hexdigest()
    ):
        return None
    return Entry(cubin=cubin, log=str(header.get("log", "")), meta=dict(header.get("meta", {})))


def get_memory(key: str) -> Entry | None:
    """The in-memory entry for ``key`` (counted as a memory hit), or None."""
    entry = _memory.get(key)
    if entry is not None:
        stats.memory_hits += 1
    return entry


def get_disk(key: str) -> Entry | None:
    """The on-disk entry for ``key`` if present and intact (counted), else None."""
    path = path_for(key)
    try:
        data = path.read_bytes()
    except OSError:
        return None
    entry = decode(key, data)
    if entry is None:
        stats.corrupt += 1
        return None
    stats.disk_hits += 1
    with _lock:
        _memory[key] = entry
    return entry


def put(key: str, entry: Entry) -> None:
    """Store ``entry`` in memory and, atomically, on disk (a disk failure only warns)."""
    with _lock:
        _memory[key] = entry
    path = path_for(key)
    try:
        write_atomic(path, encode(key, entry), fsync=True)
        stats.writes += 1
    except OSError as exc:
        stats.write_errors += 1
        warnings.warn(
            f"kernforge could not write the cubin cache entry {path} ({exc}); the kernel works "
            "but will be recompiled in the next process. Set KERNFORGE_CACHE_DIR to a writable "
            "folder.",
            RuntimeWarning,
            stacklevel=3,
        )
