"""A small progress bar for long work (benchmarks, tuning), written to stderr.

On a terminal it redraws one line; elsewhere (CI logs, pipes) it prints one line per step.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``with Progress(total, "bench") as bar: ... bar.step("rms_norm fwd")``."""

    def __init__(self, total: int, desc: str = "", stream: TextIO | None = None, width: int = 24):
        self.total, self.desc, self.width = max(total, 1), desc, width
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def step(self, label: str = "") -> None:
        """Mark one unit done; ``label`` names what was just finished."""
        self.done = min(self.done + 1, self.total)
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        line = f"{self.desc} [{bar}] {self.done}/{self.total} {elapsed:5.1f}s {label}"
        if self.tty:
            self.stream.write("\r" + line[:120].ljust(120))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
