#!/usr/bin/env bash
# Build (once) and install full mmcv 2.1.0 with compiled ops for the current PyTorch.
#
# mmcv < 2.2.0 (required by MMSegmentation 1.2.2) has no prebuilt wheel for current PyTorch. Its PyPI sdist
# builds on CPU once its C++ standard is raised to C++20 (PyTorch >= 2.10 headers need it). The built wheel is
# kept in a cache folder keyed by the torch version, so later runs install it in seconds.
#
# Usage: bash tools/build_mmcv.sh [PYTHON]       (PYTHON defaults to `python`)
# Env:   DIFFBACKBONE_WHEEL_CACHE  wheel cache folder (default ~/.cache/diffbackbone/wheels)
#        MAX_JOBS                  parallel compile jobs (default: number of cores)
set -euo pipefail
PY=${1:-python}
MMCV_VERSION=2.1.0
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__.replace("+", "_"))')
PY_TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
CACHE=${DIFFBACKBONE_WHEEL_CACHE:-$HOME/.cache/diffbackbone/wheels}/mmcv-$MMCV_VERSION-torch$TORCH_VERSION-$PY_TAG
mkdir -p "$CACHE"

if ! ls "$CACHE"/mmcv-*.whl >/dev/null 2>&1; then
  work=$(mktemp -d)
  # On success or failure: drop the scratch folder, put back the setuptools found here.
  trap 'rm -rf "$work"; if [ -n "${SETUPTOOLS_BEFORE:-}" ]; then "$PY" -m pip install -q "setuptools==$SETUPTOOLS_BEFORE"; fi' EXIT
  echo "building mmcv $MMCV_VERSION for torch $TORCH_VERSION: about 14 min on 2 quiet cores, up to 36 min on 2 busy" \
       "ones (MAX_JOBS=${MAX_JOBS:-$(nproc)}); the wheel is then kept in $CACHE and later installs take seconds ..."
  # pkg_resources is gone from recent setuptools; mmcv's setup.py still imports it. The old setuptools is only
  # needed for the build: the one found here (torch wants a recent one) is put back afterwards.
  SETUPTOOLS_BEFORE=$("$PY" -c 'import setuptools; print(setuptools.__version__)' 2>/dev/null || true)
  "$PY" -m pip install -q "setuptools<70" wheel ninja "mmengine>=0.10,<0.11"
  "$PY" -m pip download -q --no-deps --no-binary :all: "mmcv==$MMCV_VERSION" -d "$work"
  tar -xzf "$work"/mmcv-$MMCV_VERSION.tar.gz -C "$work"
  sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$work/mmcv-$MMCV_VERSION/setup.py"
  grep -q 'c++20' "$work/mmcv-$MMCV_VERSION/setup.py" || { echo "mmcv setup.py layout changed: C++ flag not found" >&2; exit 1; }
  # Build into a scratch folder and move the finished wheel in, so the cache never holds half a wheel.
  MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "$PY" -m pip wheel --no-build-isolation --no-deps -w "$work/dist" "$work/mmcv-$MMCV_VERSION"
  whl=$(ls "$work"/dist/mmcv-*.whl)
  cp "$whl" "$CACHE/.partial" && mv "$CACHE/.partial" "$CACHE/$(basename "$whl")"
else
  echo "mmcv $MMCV_VERSION: installing the cached wheel from $CACHE (seconds)"
fi
"$PY" -m pip install -q --no-deps "$CACHE"/mmcv-*.whl
"$PY" -c 'import mmcv.ops, mmcv; print("mmcv", mmcv.__version__, "with ops")'
