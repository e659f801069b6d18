"""The cubin cache: hits, misses, corrupt entries, concurrent writers (no GPU needed)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import pytest

from kernforge import cuda as kcuda
from kernforge.cuda import cache

pytestmark = pytest.mark.skipif(
    kcuda.compile_available() is not None, reason=str(kcuda.compile_available())
)

SRC = r"""
extern "C" __global__ void scale(float* x, float a, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] *= a;
}
"""
ROOT = Path(__file__).resolve().parents[2]


def entries(d: Path) -> list[Path]:
    return sorted((d / "cuda").rglob("*.kfcubin"))


def test_miss_then_memory_hit_then_disk_hit(cache_dir):
    k1 = kcuda.compile(SRC, "scale", arch="sm_90")
    assert k1.origin == "compiled"
    assert kcuda.cache_stats()["misses"] == 1 and kcuda.cache_stats()["writes"] == 1
    (path,) = entries(cache_dir)
    assert path.name == f"{k1.key}.kfcubin"
    k2 = kcuda.compile(SRC, "scale", arch="sm_90")
    assert k2 is k1 and kcuda.cache_stats()["memory_hits"] == 1
    kcuda.clear_memory_cache()  # as in a new process
    k3 = kcuda.compile(SRC, "scale", arch="sm_90")
    assert k3.origin == "disk" and k3.cubin == k1.cubin
    assert kcuda.cache_stats()["disk_hits"] == 1 and kcuda.cache_stats()["misses"] == 1


def test_key_covers_source_options_arch(cache_dir):
    keys = {
        kcuda.compile(SRC, "scale", arch="sm_90").key,
        kcuda.compile(SRC, "scale", arch="sm_80").key,
        kcuda.compile(SRC, "scale", arch="sm_90", options=("-DX=1",)).key,
        kcuda.compile(SRC + "\n// edit\n", "scale", arch="sm_90").key,
    }
    assert len(keys) == 4 and len(entries(cache_dir)) == 4
    base = dict(arch="sm_90", options=(), headers=None)
    k_a = cache.make_key(SRC, nvrtc_version=(13, 0), **base)
    k_b = cache.make_key(SRC, nvrtc_version=(13, 1), **base)
    assert k_a != k_b  # a new NVRTC never reuses an old cubin


def corrupt_and_recompile(cache_dir, damage) -> None:
    k1 = kcuda.compile(SRC, "scale", arch="sm_90")
    (path,) = entries(cache_dir)
    good = path.read_bytes()
    path.write_bytes(damage(good))
    kcuda.clear_memory_cache()
    kcuda.cache.reset_stats()
    k2 = kcuda.compile(SRC, "scale", arch="sm_90")
    st = kcuda.cache_stats()
    assert k2.origin == "compiled", "a damaged entry must not be loaded"
    assert st["corrupt"] == 1 and st["misses"] == 1 and st["disk_hits"] == 0
    assert k2.cubin == k1.cubin
    assert path.read_bytes() == good  # rebuilt in place
    kcuda.clear_memory_cache()
    assert kcuda.compile(SRC, "scale", arch="sm_90").origin == "disk"


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # truncated cubin
        lambda b: b[:10],  # truncated header
        lambda b: b"",  # empty file
        lambda b: b[:-1] + bytes([b[-1] ^ 0xFF]),  # a flipped byte in the cubin
        lambda b: b[:100] + bytes([b[100] ^ 0x01]) + b[101:],  # a flipped bit in the header
        lambda b: b"XX" + b[2:],  # bad magic
        lambda b: b + b"trailing",  # extra bytes
    ],
    ids=["half", "header", "empty", "flip-cubin", "flip-header", "magic", "trailing"],
)
def test_corrupt_entry_is_detected_and_rebuilt(cache_dir, damage):
    corrupt_and_recompile(cache_dir, damage)


def test_entry_of_another_key_is_rejected(cache_dir):
    a = kcuda.compile(SRC, "scale", arch="sm_90")
    b = kcuda.compile(SRC, "scale", arch="sm_80")
    cache.path_for(a.key).write_bytes(cache.path_for(b.key).read_bytes())  # a misplaced file
    kcuda.clear_memory_cache()
    kcuda.cache.reset_stats()
    again = kcuda.compile(SRC, "scale", arch="sm_90")
    assert again.origin == "compiled" and kcuda.cache_stats()["corrupt"] == 1


def test_decode_round_trip():
    e = cache.Entry(cubin=b"\x7fELF" + os.urandom(100), log="w", meta={"a": 1})
    data = cache.encode("k" * 64, e)
    assert cache.decode("k" * 64, data) == e
    assert cache.decode("j" * 64, data) is None


def test_threads_compile_once(cache_dir):
    src = SRC + "\n// threads\n"
    out, errors = [], []

    def work():
        try:
            out.append(kcuda.compile(src, "scale", arch="sm_80"))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(out) == 8
    assert kcuda.cache_stats()["misses"] == 1
    assert len({k.cubin for k in out}) == 1


WORKER = textwrap.dedent(
    r"""
    import hashlib, sys
    from kernforge import cuda as kcuda
    from kernforge.cuda import cache
    src, rounds = sys.argv[1], int(sys.argv[2])
    shas = set()
    for r in range(rounds):
        kcuda.clear_memory_cache()
        # Force a write every round: a racing writer of the same key.
        k = kcuda.compile(src, "scale", arch="sm_90")
        cache.put(k.key, cache.Entry(cubin=k.cubin, log=k.log))
        raw = cache.path_for(k.key).read_bytes()
        assert cache.decode(k.key, raw) is not None, "saw a partial or corrupt entry"
        shas.add(hashlib.sha256(k.cubin).hexdigest())
    print(len(shas), cache.stats.corrupt, next(iter(shas)))
    """
)


def test_concurrent_processes(cache_dir):
    env = dict(os.environ, KERNFORGE_CACHE_DIR=str(cache_dir), PYTHONPATH=str(ROOT / "src"))
    src = SRC + "\n// processes\n"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, src, "25"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(4)
    ]
    results = [p.communicate(timeout=240) for p in procs]
    for p, (_out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    lines = [out.split() for out, _ in results]
    assert all(n == "1" and corrupt == "0" for n, corrupt, _ in lines)
    assert len({sha for _, _, sha in lines}) == 1  # every process got the same cubin
    (path,) = entries(cache_dir)
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"], "temp files left"
    k = kcuda.compile(src, "scale", arch="sm_90")
    assert k.origin == "disk"
    assert hashlib.sha256(k.cubin).hexdigest() == lines[0][2]


def test_unwritable_cache_warns_and_still_compiles(cache_dir):
    cache_dir.mkdir(parents=True)
    (cache_dir / "cuda").write_text("a file where the folder should be")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        k = kcuda.compile(SRC, "scale", arch="sm_90")
    assert k.cubin and kcuda.cache_stats()["write_errors"] == 1
    assert any("KERNFORGE_CACHE_DIR" in str(x.message) for x in w)
