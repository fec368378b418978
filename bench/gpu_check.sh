#!/usr/bin/env bash
# The GPU check: one script that, on one GPU machine with this repository, prints (and writes to a file)
# samples/s and MFU of a ~100 M-parameter BlockUNet1D in bf16, peak memory per DeepSpeed ZeRO stage 0-3 on
# one GPU, one-step and 50-step DDIM time for a weight set of 854 x 256, and zoo members/hour with 1, 2, 4, 8
# members packed per GPU — within a hard time limit, each row in its own process so one failing or hanging
# row costs only itself; the table is written after every row.
#
#   bash bench/gpu_check.sh                       # on a GPU machine (installs with scripts/install.sh if needed)
#   bash bench/gpu_check.sh --wheels DIR          # offline machine that has torch: add missing packages from DIR
#   bash bench/gpu_check.sh --dry-run             # CPU, tiny sizes: the code paths only (CI runs this)
#   options: --out FILE (default runs/gpu_check.md)   --budget SECONDS (default 480, all rows together)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=""; OUT_FILE=runs/gpu_check.md; BUDGET=480; WHEELS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=--dry-run ;;
    --out) OUT_FILE=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    --wheels) WHEELS=$2; shift ;;
    *) echo "error: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
start=$SECONDS
mkdir -p "$(dirname "$OUT_FILE")"
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 1. what the rows import; install what is missing
if ! "$PY" -c "import torch, diffusers, deepspeed, rayweights.generators" 2>/dev/null; then
  if [ -n "$WHEELS" ]; then
    site=$(mktemp -d)/site
    echo "[gpu_check] adding the wheels of $WHEELS (no index, no dependency resolution)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:$site"
  else
    echo "[gpu_check] installing with scripts/install.sh"
    bash scripts/install.sh || exit 1
    PY=.venv/bin/python
  fi
fi

# 2. the rows, each under its own share of the budget
{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ)${DRY:+ (dry run: CPU, tiny sizes, numbers meaningless)}"
  echo
  "$PY" - <<'PY' 2>/dev/null || echo "device: unknown (torch did not import)"
import torch
d = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"device: {d}; torch {torch.__version__}")
PY
  echo
  echo "| row | what | value | goal |"
  echo "|---|---|---|---|"
} > "$OUT_FILE"
# seconds each row may take at most (each also gets at most what is left of the budget)
declare -A SHARE=([sample]=90 [mfu]=150 [zero]=150 [packing]=150)
status=0
for r in sample mfu zero packing; do
  left=$((BUDGET - (SECONDS - start) - 5))
  limit=$(( SHARE[$r] < left ? SHARE[$r] : left ))
  if [ "$limit" -lt 10 ]; then
    echo "| $r | not run: the time budget ($BUDGET s) is spent | - | - |" >> "$OUT_FILE"; status=1; continue
  fi
  echo "[gpu_check] $r (at most $limit s)"
  err=$(mktemp); rowout=$(mktemp)
  timeout --kill-after=10 "$limit" "$PY" bench/gpu_check.py "$r" $DRY > "$rowout" 2> "$err"
  rc=$?
  grep '^| ' "$rowout" >> "$OUT_FILE"          # table lines only (libraries print to stdout too)
  if [ $rc -ne 0 ]; then
    status=1
    why=$( [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "timed out after $limit s" \
           || echo "failed (exit $rc): $(grep -v '^\s*$' "$err" | tail -n 1 | tr '|' '/' | cut -c1-200)")
    echo "| $r | $why | - | - |" >> "$OUT_FILE"
  fi
  rm -f "$err" "$rowout"
done
echo "[gpu_check] $((SECONDS - start)) s; table in $OUT_FILE"
cat "$OUT_FILE"
exit $status
