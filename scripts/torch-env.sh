#!/usr/bin/env bash
# Creates the ignored venv .venv-torch for the PyTorch twins of the models
# (python_ref/models/): torch from PyPI (the only index reachable here; its
# Linux wheel is the CUDA build, ~4 GB with its NVIDIA libraries, used on the
# CPU), NumPy and pytest. Prints the venv's python. Reuses an existing venv.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="${MOEREC_TORCH_VENV:-$root/.venv-torch}"
if ! "$venv/bin/python" -c 'import torch, numpy, pytest' 2>/dev/null; then
    python3 -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'torch==2.15.0' 'numpy>=1.24' 'pytest>=7' >&2
fi
echo "$venv/bin/python"
