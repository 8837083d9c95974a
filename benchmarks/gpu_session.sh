#!/usr/bin/env bash
# One call on the GPU machine (repo root is the cwd, $OUT the folder that comes back):
#   bash benchmarks/gpu_session.sh          gpu tests, quick benchmark, then the full grid in the time left
#   bash benchmarks/gpu_session.sh full     only the full grid (all of the time budget)
#   bash benchmarks/gpu_session.sh tune     only the split-count, warp and stage sweeps
#   bash benchmarks/gpu_session.sh imports  only check that everything imports (the test suite runs this)
# The machine has no pip install of this package: the checkout's root goes on PYTHONPATH (the link
# vllm_int4kv/kernels -> ../kernels makes the kernels a subpackage there too). Everything fits
# the device tool's limits: one call under 10 minutes (SESSION_BUDGET_S), at most 8 files in $OUT, flat.
# vLLM's own kernels (the same-run baseline) come from artifacts/vllm_kernels: stage them here with
# `python benchmarks/vllm_kernels.py --stage` (setup_env.sh does) and pass carry=["artifacts/vllm_kernels"].
set -uo pipefail
export PYTHONUNBUFFERED=1
REPO=$(pwd)
OUT=${OUT:-$REPO/gpu_out}
BUDGET=${SESSION_BUDGET_S:-560}
PHASE=${1:-all}
PY=${PYTHON:-$(command -v python3 || command -v python)}  # the GPU machine's torch is under python3
PY_FLAGS=""
QUICK_ARGS="--quick"; FULL_ARGS=""
if [ "${DRY_RUN:-0}" = 1 ]; then  # rehearse this script on a CPU machine: tiny interpreter runs
  QUICK_ARGS="--smoke --shapes smollm2-135m --policies k4v4,k16v16"; FULL_ARGS=$QUICK_ARGS
  # as on the GPU machine, no install of this package: -S skips the .pth of an editable install
  PY_FLAGS="-S"
  export PYTHONPATH=$("$PY" -c "import site; print(':'.join(site.getsitepackages()))")
fi
mkdir -p "$OUT"
WORK=$(mktemp -d)
LOG="$OUT/session.log"

trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
py() { "$PY" $PY_FLAGS "$@"; }

left() { echo $((BUDGET - SECONDS)); }
{
  echo "== session $(date -u) phase=$PHASE budget=${BUDGET}s"
  echo "staged vLLM kernels: $(cat "${VLLM_INT4KV_VLLM_KERNELS:-$REPO/artifacts/vllm_kernels}/staged.json" 2>/dev/null | head -c 200 || echo none)"
  nvidia-smi || true
  "$PY" $PY_FLAGS - <<'VERSIONS' || true
import importlib.metadata as metadata, sys
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"
print("python", sys.version.split()[0], *(f"{name} {version(name)}" for name in ("numpy", "transformers")))
VERSIONS
} >>"$LOG" 2>&1
# fail fast, and say why, if the checkout does not import (nothing else could run)
if ! py -c "import torch, triton, vllm_int4kv.kernels.attention as a, benchmarks.run; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None); print('kernels from', a.__file__)" >>"$LOG" 2>&1; then
  echo "IMPORT FAILED with $PY $PY_FLAGS (PYTHONPATH=$PYTHONPATH):"; tail -n 20 "$LOG"; exit 3
fi
if [ "$PHASE" = imports ]; then tail -n 2 "$LOG"; exit 0; fi

bench() {  # bench NAME SECONDS ARGS...
  local name=$1 secs=$2; shift 2
  echo "== benchmark $name (budget ${secs}s): $*" >>"$LOG"
  timeout $((secs + 60)) "$PY" $PY_FLAGS benchmarks/run.py --out "$WORK/$name" --budget-s "$secs" "$@" >>"$LOG" 2>&1
  echo "== benchmark $name exit $?" >>"$LOG"
  if [ -f "$WORK/$name/results.json" ] && [ ! -f "$WORK/$name/summary.md" ]; then  # killed: render anyway
    py benchmarks/summary.py "$WORK/$name/results.json" >"$WORK/$name/summary.md" 2>>"$LOG"
  fi
  cp "$WORK/$name/results.json" "$OUT/$name.json" 2>/dev/null
  cp "$WORK/$name/summary.md" "$OUT/${name}_summary.md" 2>/dev/null
}

case "$PHASE" in
  all)
    echo "== pytest -m gpu" >>"$LOG"
    PYTEST_EXTRA=""; [ "${DRY_RUN:-0}" = 1 ] && PYTEST_EXTRA="--collect-only"
    # collection errors in one module (a package missing here) must not hide the other modules' results
    timeout 200 "$PY" $PY_FLAGS -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors $PYTEST_EXTRA \
      >>"$LOG" 2>&1
    echo "== pytest exit $?" >>"$LOG"
    bench quick 150 $QUICK_ARGS
    if [ "$(left)" -gt 150 ]; then bench full $(( $(left) - 75 )) $FULL_ARGS; fi
    ;;
  full) bench full $((BUDGET - 90)) $FULL_ARGS ;;
  tune) bench tune $((BUDGET - 90)) --tune $FULL_ARGS ;;
  *) echo "unknown phase $PHASE" >>"$LOG"; exit 2 ;;
esac

# plots of the most complete run (3 PNGs): with session.log and 2 x (json, summary) that is 8 files
for name in full tune quick; do
  if ls "$WORK/$name"/*.png >/dev/null 2>&1; then cp "$WORK/$name"/*.png "$OUT/"; break; fi
done
echo "== done after ${SECONDS}s; files: $(ls "$OUT" | tr '\n' ' ')" >>"$LOG"
# what the caller sees first: test outcome, failures, and the goals table of the most complete run
grep -E "passed|failed|error|FAILED|CHECK" "$LOG" | tail -n 15
for name in full tune quick; do
  if [ -f "$OUT/${name}_summary.md" ]; then sed -n '1,/^## Decode/p' "$OUT/${name}_summary.md"; break; fi
done
tail -n 2 "$LOG"
