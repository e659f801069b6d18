"""A pretend GPU for the tuner's bookkeeping tests: the device checks, synchronize and
do_bench are replaced by fakes whose "time" of a config is a number the test chooses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import triton.testing

from kernforge import device
from kernforge.tune import tuner as tuner_mod


@dataclass(frozen=True)
class Cfg:
    block: int
    warps: int = 4


CONFIGS = [Cfg(32), Cfg(64), Cfg(128), Cfg(256, 8)]
COST = {Cfg(32): 3.0, Cfg(64): 1.5, Cfg(128): 2.0, Cfg(256, 8): 9.0}


def fake_gpu(monkeypatch, ident: list[str], cost: Callable[[Any], float]):
    """Pretend to be the GPU ``ident`` (the tuner's device ident); timing a config gives
    ``cost(config)``. Returns ``(run_factory, calls)``: ``run_factory(fail=())`` makes a launch
    callback that records each config it runs in ``calls`` and fails for those in ``fail``."""
    monkeypatch.setattr(device, "INTERPRET", False)
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    monkeypatch.setattr(tuner_mod, "_device_id", lambda: list(ident))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    calls: list = []
    current: list = []

    def run_factory(fail=()):
        def run(cfg):
            if cfg in fail:
                raise RuntimeError("out of shared memory")
            calls.append(cfg)
            current[:] = [cfg]

        return run

    def fake_bench(fn, warmup, rep, return_mode):
        fn()
        return cost(current[0])

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    return run_factory, calls
