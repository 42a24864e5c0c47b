#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine (root, Python 3.11, no GPU needed):
# system libraries for FFCV, the real Fashion-MNIST files, and a project-local virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

apt_pkgs=(pkg-config libopencv-dev libturbojpeg0-dev dataset-fashion-mnist)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "[setup] apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# torch first and pinned: an unpinned torch requirement would pull a multi-GB CUDA build.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==${TORCH_VERSION:-2.13.0}"
"${PIP[@]}" -e ".[all,test]"
echo "[setup] ok: $("$VENV/bin/python" -c 'import torch, ffcv, nvidia.dali, accelerate; print("torch", torch.__version__, "| dali", nvidia.dali.__version__, "| accelerate", accelerate.__version__)')"
