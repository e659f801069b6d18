"""Benchmark one family with the harness from Python (what `kernforge bench rms_norm --quick`
does), and print the Markdown table.

    python examples/benchmark_one_op.py
"""

from __future__ import annotations

import torch

from kernforge.bench import cases_for, run_cases
from kernforge.bench.harness import table

on_gpu = torch.cuda.is_available()
results, copy_tbs = run_cases(cases_for(["rms_norm"], quick=True))
print(f"copy bandwidth: {copy_tbs:.3g} TB/s")
print(table(results, on_gpu))
