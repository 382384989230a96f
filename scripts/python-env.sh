#!/usr/bin/env bash
# Creates the ignored venv .venv-py with what python_ref/ needs (NumPy, pytest).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv-py"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'numpy>=1.24' 'pytest>=7'
