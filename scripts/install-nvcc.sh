#!/usr/bin/env bash
# Installs the CUDA 13.0 compiler from PyPI into an ignored venv (.venv-cuda/),
# pinned so the PTX it emits loads on driver 580 (CUDA 13.0). No GPU needed.
# Prints the NVCC path to export; build.rs also finds it there on its own.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="${MOEREC_CUDA_VENV:-$root/.venv-cuda}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  'nvidia-cuda-nvcc==13.0.*' 'nvidia-nvvm==13.0.*' 'nvidia-cuda-crt==13.0.*' \
  'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-cccl==13.0.*'
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cuda_home="$site/nvidia/cu13"
nvcc="$cuda_home/bin/nvcc"
if [ ! -x "$nvcc" ]; then
  echo "install-nvcc: nvcc not found at $nvcc after install" >&2
  exit 1
fi
"$nvcc" --version | tail -n 2 >&2
echo "export NVCC=$nvcc"
