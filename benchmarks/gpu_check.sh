#!/usr/bin/env bash
# The first GPU run, prepared (benchmarks/gpu_check.py says what it measures). At most 10 minutes on one
# H100/H200; GPU_CHECK_CPU=1 runs every step at tiny sizes on the CPU in at most 3 minutes.
#
#   bash benchmarks/gpu_check.sh                   # results: benchmarks/results/gpu/gpu_check.json (+ .png)
#   GPU_CHECK_CPU=1 bash benchmarks/gpu_check.sh
#
# PYTHON: the interpreter (default: .venv/bin/python if present, else python3). Packages the GPU machine lacks
# (ffcv and the libraries it links, see benchmarks/build_gpu_bundle.sh) are taken from benchmarks/gpu_bundle/
# when that directory exists and ffcv is not installed.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
BUNDLE=benchmarks/gpu_bundle
# only where ffcv is missing, and only for the Python it was built for
if [ -d "$BUNDLE/site-packages" ] && ! "$PYTHON" -c "import ffcv" 2>/dev/null \
        && ls "$BUNDLE"/site-packages/ffcv/_libffcv.cpython-"$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"-*.so >/dev/null 2>&1; then
    export PYTHONPATH="$PWD/$BUNDLE/site-packages${PYTHONPATH:+:$PYTHONPATH}"
    export LD_LIBRARY_PATH="$PWD/$BUNDLE/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${GPU_CHECK_CPU:-0}" = "1" ]; then LIMIT=180; else LIMIT=580; fi
timeout --signal=INT --kill-after=10 "$LIMIT" "$PYTHON" benchmarks/gpu_check.py "$@"
