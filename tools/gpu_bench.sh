#!/usr/bin/env bash
# The speed measurements of the README (issue #4) and the clean-train step rate, for one GPU machine.
#   bash tools/gpu_bench.sh OUTDIR [CASE ...]
# CASE: cleandift pyramid us6 noisy profile train (the default set), eager, cudagraphs (compile mode max-autotune)
# Each case writes OUTDIR/CASE.txt (what it printed) and, for bench cases, OUTDIR/CASE.json. Wheels found in .whl/
# are installed into /tmp/site first, for machines whose image lacks diffusers (the device image has torch):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#     diffusers==0.42.1 timm==1.0.31 importlib_metadata==10.2.0 lazy-importer==0.1.0
# Env (defaults are the issue's H100 setting): DEVICE=cuda SIZE=768 BATCH=8 DTYPE=bf16 MODEL=cleandift_sd21
# COMPILE=max-autotune-no-cudagraphs (empty: eager) ITERS=10 WARMUP=3 ARCH=sd21 (train) PY=python3 WHEELS=.whl.
# A tiny CPU run:
#   DEVICE=cpu SIZE=128 BATCH=2 DTYPE=fp32 MODEL=test_cleandift ARCH=test COMPILE= ITERS=1 WARMUP=1 bash tools/gpu_bench.sh /tmp/b
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash tools/gpu_bench.sh OUTDIR [cleandift|pyramid|us6|noisy|profile|train|eager|cudagraphs ...]}
shift
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(cleandift pyramid us6 noisy profile train)
mkdir -p "$out"
PY=${PY:-python3}
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
common=(--model "${MODEL:-cleandift_sd21}" --size "${SIZE:-768}" --batch "${BATCH:-8}" --dtype "${DTYPE:-bf16}"
        --device "${DEVICE:-cuda}" --iters "${ITERS:-10}" --warmup "${WARMUP:-3}" --channels-last)
COMPILE=${COMPILE-max-autotune-no-cudagraphs}
compiled=(); [ -z "$COMPILE" ] || compiled=(--compile "$COMPILE")

bench() {  # bench CASE ARGS...: one benchmark run, printed and saved
  local name=$1; shift
  "$PY" -m diffbackbone.bench "${common[@]}" "$@" --json "$out/$name.json" 2>&1 | tee "$out/$name.txt"
}
for c in "${cases[@]}"; do
  echo "== $c $(date -u +%FT%TZ)"
  case $c in
    cleandift|pyramid|us6) bench "$c" --taps "$c" "${compiled[@]}" ;;
    noisy) bench noisy --taps cleandift --noisy-ensemble 8 "${compiled[@]}" ;;
    profile) bench profile --taps cleandift --profile --iters 3 "${compiled[@]}" ;;
    eager) bench eager --taps cleandift ;;
    cudagraphs) bench cudagraphs --taps cleandift --compile max-autotune ;;
    train) "$PY" -m diffbackbone.bench.train_step --arch "${ARCH:-sd21}" --size "${SIZE:-768}" --batch "${BATCH:-8}" \
             --precision "${DTYPE:-bf16}" --device "${DEVICE:-cuda}" 2>&1 | tee "$out/train.txt" ;;
    *) echo "unknown case '$c': choose from cleandift pyramid us6 noisy profile train eager cudagraphs" >&2; exit 2 ;;
  esac
done
