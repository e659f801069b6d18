"""One benchmark harness for every kernforge benchmark.

:mod:`.harness` times callables (median of event-timed runs on the GPU), measures this GPU's
copy bandwidth in the same run, and writes JSON, Markdown and a PNG plot; :mod:`.suites` holds
the cases of each catalog family. ``kernforge bench`` drives both.
"""

from .harness import Case, Result, copy_bandwidth, run_cases, time_fn, write_results
from .suites import FAMILIES, cases_for

__all__ = [
    "FAMILIES", "Case", "Result", "cases_for", "copy_bandwidth", "run_cases", "time_fn",
    "write_results",
]  # fmt: skip
