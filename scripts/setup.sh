#!/usr/bin/env bash
# Sourced by scripts/test and scripts/bench: creates .venv (once) and installs kernforge into it
# with its dev tools. With no CUDA GPU it installs the CPU build of torch first, so pip never
# pulls the multi-GB CUDA wheels. Re-runs only when pyproject.toml or this file changed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${KERNFORGE_VENV:-$root/.venv}
py=$venv/bin/python
stamp=$venv/.kernforge-setup
if [ ! -x "$py" ]; then
  echo "kernforge setup: creating $venv" >&2
  python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || [ "${BASH_SOURCE[0]}" -nt "$stamp" ]; then
  pip=("$py" -m pip install -q --disable-pip-version-check)
  if ! (command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1); then
    echo "kernforge setup: no CUDA GPU: installing the CPU build of torch" >&2
    # A local +cpu wheel where the machine has one, else PyTorch's CPU index: never CUDA wheels.
    "$py" -c 'import torch, sys; sys.exit(0 if torch.__version__.endswith("+cpu") else 1)' 2>/dev/null \
      || "${pip[@]}" "torch==2.13.0+cpu" 2>/dev/null \
      || "${pip[@]}" "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
    # Triton 3.6 matches the GPU machine; its interpreter breaks on NumPy >= 2.4.
    "${pip[@]}" "triton==3.6.0" "numpy>=1.26,<2.4"
  fi
  echo "kernforge setup: installing kernforge (editable) and dev tools" >&2
  "${pip[@]}" -e "$root[dev]"
  touch "$stamp"
fi
export PATH=$venv/bin:$PATH
