"""Autotuning with a persistent on-disk cache, shared by every tuned kernel.

A kernel module declares its candidate launch configs once::

    TUNER = tune.Tuner("matmul", configs=[MatmulConfig(...), ...], version="1")

and asks for the best one at each call::

    cfg = TUNER.pick((tune.bucket(m), n, k, "bfloat16"), run=lambda c: launch(c), default=DEFAULT)

The first time a key is seen on a GPU (``KERNFORGE_TUNE=auto``), every candidate is timed with
``run`` and the fastest is remembered in memory and under ``KERNFORGE_CACHE_DIR/tune/``, so a
later process picks it without measuring. ``kernforge tune <kernel> --shapes ...`` tunes ahead
of time with a progress bar (see :func:`register_cli`).
"""

# model, space, store: the measurement store, the wide candidate spaces and the learned
# performance model (docs/tuning.md).
from . import model, space, store
from .tuner import Tuner, bucket, entries, forcing, register_cli, stats, tunable

__all__ = ["Tuner", "bucket", "entries", "forcing", "register_cli", "stats", "tunable"]
__all__ += ["model", "space", "store"]
