#!/usr/bin/env bash
# Set up .venv with diffbackbone (editable) and the pinned versions in tools/constraints.txt.
#   bash tools/install.sh            timm backbones, CLI, trainer, tests
#   bash tools/install.sh --mmseg    also MMSegmentation 1.2.2 with full mmcv 2.1.0 (built once: 14 min on 2 quiet cores,
#                                    up to 36 min on 2 busy ones; then cached, seconds)
# Env: PYTHON (default python3), VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check -c tools/constraints.txt)
"${PIP[@]}" torch torchvision
if [ "${1:-}" = "--mmseg" ]; then
  echo "--mmseg: mmcv $(sed -n 's/^MMCV_VERSION=//p' tools/build_mmcv.sh) is compiled from source unless a wheel is cached:" \
       "about 14 min on 2 quiet cores, up to 36 min on 2 busy ones; a cached wheel installs in seconds."
  "${PIP[@]}" -e ".[test,mmseg]"
  bash tools/build_mmcv.sh "$VENV/bin/python"
else
  "${PIP[@]}" -e ".[test]"
fi
"$VENV/bin/python" -c "import diffbackbone, timm; print('diffbackbone', diffbackbone.__version__, 'timm', timm.__version__)"
