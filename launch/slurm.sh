#!/usr/bin/env bash
# SLURM array job over a sweep: one array task per pending (config, method, seed) of launch/sweep.py.
#
#   launch/slurm.sh [--dry-run] -- SWEEP_ARGS...
#   launch/slurm.sh -- --configs configs/cifar10_resnet18.py --seeds 0-4 --root runs/r18
#   DRY_RUN=1 launch/slurm.sh -- ...            # same as --dry-run: print, submit nothing
#
# Submitting writes the pending jobs to ROOT/slurm/jobs-<time>.jsonl (sweep.py --emit; finished
# workdirs are left out) and runs `sbatch --array=0-(N-1)%MAX_PARALLEL` on this script with
# JOB_FILE exported. Each array task then runs line SLURM_ARRAY_TASK_ID of that file
# (sweep.py --job_file), so indices stay stable while jobs finish; a task whose workdir has
# finished meanwhile exits at once, and a requeued or resubmitted one resumes its workdir.
#
# Settings (environment): PARTITION, ACCOUNT, GPUS_PER_TASK (1), CPUS_PER_TASK (8), MEM (64G),
# TIME (24:00:00), MAX_PARALLEL (16), PYTHON (python3), SBATCH_EXTRA (more sbatch options).
# One task = one process = the GPUs it was given (data parallel over its local devices). For
# multi-node jobs see launch/README.md (srun + --config.parallel.multihost=True).
#SBATCH --job-name=dp_jax
set -euo pipefail

PYTHON="${PYTHON:-python3}"

if [[ -n "${SLURM_ARRAY_TASK_ID:-}" && -n "${JOB_FILE:-}" ]]; then
  # Inside an array task: SLURM runs a copy of this script, so find the repo from the export.
  cd "${DP_JAX_REPO:-${SLURM_SUBMIT_DIR:-.}}"
  echo "[slurm] task ${SLURM_ARRAY_TASK_ID} on $(hostname): $(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$JOB_FILE")"
  TASK=("$PYTHON" launch/sweep.py --job_file "$JOB_FILE" --job_index "$SLURM_ARRAY_TASK_ID")
  [[ "${DRY_RUN:-0}" == "1" ]] && TASK+=(--dry_run)
  exec "${TASK[@]}"
fi

DRY_RUN="${DRY_RUN:-0}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run|--dry_run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
SWEEP_ARGS=("$@")

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="runs/sweep"
for ((i = 0; i < ${#SWEEP_ARGS[@]}; i++)); do
  if [[ "${SWEEP_ARGS[$i]}" == "--root" ]]; then ROOT="${SWEEP_ARGS[$((i + 1))]}"; fi
  if [[ "${SWEEP_ARGS[$i]}" == --root=* ]]; then ROOT="${SWEEP_ARGS[$i]#--root=}"; fi
done

# Relative paths (configs, --root) are taken from the repository root, where the tasks run.
[[ "$ROOT" == /* ]] && ROOT_ABS="$ROOT" || ROOT_ABS="$REPO/$ROOT"
if [[ "$DRY_RUN" == "1" ]]; then
  JOB_FILE="$(mktemp -t dp_jax_jobs.XXXXXX)"
  trap 'rm -f "$JOB_FILE"' EXIT
else
  mkdir -p "$ROOT_ABS/slurm"
  JOB_FILE="$ROOT_ABS/slurm/jobs-$(date +%Y%m%d-%H%M%S).jsonl"
fi
N="$(cd "$REPO" && "$PYTHON" launch/sweep.py "${SWEEP_ARGS[@]}" --emit "$JOB_FILE")"
if [[ "$N" -eq 0 ]]; then
  echo "[slurm] nothing to run: every job of the sweep has finished"
  exit 0
fi

CMD=(sbatch --array="0-$((N - 1))%${MAX_PARALLEL:-16}"
     --gpus-per-task="${GPUS_PER_TASK:-1}" --cpus-per-task="${CPUS_PER_TASK:-8}"
     --mem="${MEM:-64G}" --time="${TIME:-24:00:00}"
     --output="$ROOT_ABS/slurm/%A_%a.out"
     --export="ALL,JOB_FILE=$JOB_FILE,DP_JAX_REPO=$REPO,PYTHON=$PYTHON")
[[ -n "${PARTITION:-}" ]] && CMD+=(--partition="$PARTITION")
[[ -n "${ACCOUNT:-}" ]] && CMD+=(--account="$ACCOUNT")
# shellcheck disable=SC2206  # SBATCH_EXTRA is a list of options by design
[[ -n "${SBATCH_EXTRA:-}" ]] && CMD+=($SBATCH_EXTRA)
CMD+=("$REPO/launch/slurm.sh")

if [[ "$DRY_RUN" == "1" ]]; then
  echo "# dry run: $N array tasks; would submit:"
  echo "${CMD[*]}"
  echo "# task commands (index: command):"
  "$PYTHON" -c 'import json, shlex, sys
for i, line in enumerate(open(sys.argv[1])):
    print(f"{i}: " + shlex.join(json.loads(line)["cmd"]))' "$JOB_FILE"
  exit 0
fi
"${CMD[@]}"
echo "[slurm] submitted $N tasks; job list: $JOB_FILE"
