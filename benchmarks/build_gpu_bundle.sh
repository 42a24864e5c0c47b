#!/usr/bin/env bash
# Builds benchmarks/gpu_bundle/ (git-ignored, < 64 MiB): what a GPU machine without FFCV needs to run the FFCV
# loader in benchmarks/gpu_check.sh, for its Python (3.12; torch, numba, numpy and opencv are already there):
#   site-packages/  ffcv (built here from PyPI's sdist), assertpy, terminaltables, and a two-line distutils.log
#                   stand-in (ffcv imports `distutils.log.warn`; Python 3.12 has no distutils)
#   lib/            the shared libraries ffcv's extension links (ldd), minus the C/C++ runtime
# gpu_check.sh puts them on PYTHONPATH / LD_LIBRARY_PATH when the directory exists. DALI is not bundled: its
# wheel alone is far over the 64 MiB a run may carry.
#
#   PY312=python3.12 bash benchmarks/build_gpu_bundle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${PY312:-python3.12}
OUT=benchmarks/gpu_bundle
rm -rf "$OUT" && mkdir -p "$OUT/site-packages/distutils" "$OUT/lib" "$OUT/wheels"
"$PY312" -m pip wheel --no-deps ffcv==1.0.2 -w "$OUT/wheels"
"$PY312" -m pip install --no-deps --target "$OUT/site-packages" "$OUT"/wheels/ffcv-*.whl assertpy terminaltables
printf '' > "$OUT/site-packages/distutils/__init__.py"
printf 'from logging import warning as warn  # noqa: F401\n' > "$OUT/site-packages/distutils/log.py"
ext=$(ls "$OUT"/site-packages/ffcv/_libffcv*.so)
ldd "$ext" | awk '/=> \//{print $3}' | grep -vE '/(libc|libm|libpthread|libdl|librt|libstdc\+\+|libgcc_s|ld-linux[^/]*)\.so' \
    | while read -r lib; do cp -L "$lib" "$OUT/lib/"; done
rm -rf "$OUT/wheels"
du -sh "$OUT"
if [ "$(du -sm "$OUT" | cut -f1)" -gt 60 ]; then echo "gpu_bundle is over 60 MiB: it will not travel" >&2; exit 1; fi
echo "built $OUT ($ext); carry it with the run: benchmarks/gpu_bundle"
