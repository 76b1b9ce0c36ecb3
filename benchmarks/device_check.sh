#!/usr/bin/env bash
# One command for a lent accelerator: matmul peaks, `pytest -m gpu`, the readiness tests, the
# quick suite, an IMP round of ResNet-18 w32 and DP's inner loop -> one JSON and a markdown
# table (benchmarks/device_check.py has the details).
#
#   bash benchmarks/device_check.sh                  # on the device, <= 8 minutes, into $OUT
#   bash benchmarks/device_check.sh --out DIR        # elsewhere
#   bash benchmarks/device_check.sh --dry-run --out DIR   # tiny sizes on the CPU, ~1-2 minutes
#
# Other options go to device_check.py (--budget-s S, --suite-parts P1,P2, --skip STEPS).
# Needs no network: dp_jax runs from this checkout (PYTHONPATH), nothing is installed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
out="${OUT:-}"
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    --dry-run) args+=(--dry-run); export JAX_PLATFORMS=cpu; shift ;;
    -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) args+=("$1"); shift ;;
  esac
done
out="${out:-$repo/device_check_out}"
mkdir -p "$out"
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || PYTHON=python
exec "$PYTHON" "$here/device_check.py" --out "$out" ${args[@]+"${args[@]}"}
