#!/usr/bin/env bash
# Cloud TPU VM runs: create a TPU VM (one host or a pod slice), install dp_jax on every worker,
# run one experiment on all workers at once, delete the VM.
#
#   launch/tpu_vm.sh [--dry-run] create|setup|run|status|delete|all
#   DRY_RUN=1 launch/tpu_vm.sh all        # print the gcloud commands, run nothing
#
# Settings (environment; defaults in brackets):
#   TPU_NAME [dp-jax]  ZONE [us-central2-b]  ACCELERATOR_TYPE [v4-8]
#   RUNTIME_VERSION [tpu-ubuntu2204-base]  PROJECT [gcloud's default]  SPOT [0]
#   REPO_URL (required for setup; e.g. https://github.com/<you>/dp_jax)  BRANCH [main]
#   CONFIG [configs/cifar10_resnet18.py]  WORKDIR [runs/tpu]  EXTRA_FLAGS (more --config.* flags)
#   MULTIHOST [auto: 1 when ACCELERATOR_TYPE has more than 8 cores/chips, i.e. several hosts]
#
# `run` starts the same command on every worker (--worker=all). With MULTIHOST=1 each worker
# calls jax.distributed.initialize(), which finds the other workers through the TPU metadata
# (nothing to configure), and the batch is sharded over the devices of all hosts. WORKDIR must
# then be a directory every worker sees (a gcsfuse or Filestore mount): orbax checkpoints are
# written jointly by all hosts. The command runs under nohup; follow it with `status`.
set -euo pipefail

TPU_NAME="${TPU_NAME:-dp-jax}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
BRANCH="${BRANCH:-main}"
CONFIG="${CONFIG:-configs/cifar10_resnet18.py}"
WORKDIR="${WORKDIR:-runs/tpu}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"
DRY_RUN="${DRY_RUN:-0}"

if [[ -z "${MULTIHOST:-}" ]]; then
  # v2-8, v3-8, v4-8, v5litepod-8 ... are one host; larger slices span several.
  [[ "${ACCELERATOR_TYPE##*-}" -gt 8 ]] && MULTIHOST=1 || MULTIHOST=0
fi
[[ "$MULTIHOST" == "1" ]] && MH=True || MH=False

GCLOUD=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && LOC+=(--project="$PROJECT")

quote() {
  # Shell-quote one word the readable way: bare if safe, else in single quotes.
  if [[ "$1" =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

run() {
  # Print the command (quoted so it can be pasted); execute it unless dry-running.
  printf '+'; for word in "$@"; do printf ' '; quote "$word"; done; echo
  if [[ "$DRY_RUN" != "1" ]]; then "$@"; fi
}

on_all_workers() {
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${LOC[@]}" --worker=all --command="$1"
}

create() {
  local extra=()
  [[ "${SPOT:-0}" == "1" ]] && extra+=(--spot)
  run "${GCLOUD[@]}" create "$TPU_NAME" "${LOC[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
      --version="$RUNTIME_VERSION" "${extra[@]}"
}

setup() {
  if [[ -z "${REPO_URL:-}" ]]; then
    echo "REPO_URL is not set: the git URL of your dp_jax repository" >&2
    [[ "$DRY_RUN" == "1" ]] || exit 2
  fi
  # jax[tpu] brings libtpu; the package's own dependencies follow from pyproject.toml.
  on_all_workers "set -e; (test -d dp_jax || git clone --branch ${BRANCH} ${REPO_URL:-REPO_URL} dp_jax); \
cd dp_jax && git fetch -q origin ${BRANCH} && git checkout -q ${BRANCH} && git pull -q; \
python3 -m pip install -q -U pip 'jax[tpu]' && python3 -m pip install -q -e . && \
python3 -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
}

run_experiment() {
  local cmd="cd dp_jax && nohup python3 -m dp_jax.main --config=${CONFIG} --workdir=${WORKDIR} \
--config.parallel.data_parallel=True --config.parallel.multihost=${MH} ${EXTRA_FLAGS} \
> dp_jax_run.log 2>&1 &"
  on_all_workers "$cmd"
}

status() {
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${LOC[@]}" --worker=0 --command="tail -n 20 dp_jax/dp_jax_run.log"
}

delete() {
  run "${GCLOUD[@]}" delete "$TPU_NAME" "${LOC[@]}" --quiet
}

ACTIONS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run|--dry_run) DRY_RUN=1 ;;
    create|setup|run|status|delete|all) ACTIONS+=("$arg") ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown argument $arg; allowed: --dry-run create setup run status delete all" >&2; exit 2 ;;
  esac
done
[[ ${#ACTIONS[@]} -gt 0 ]] || { sed -n '2,22p' "$0"; exit 2; }

for action in "${ACTIONS[@]}"; do
  case "$action" in
    create) create ;;
    setup) setup ;;
    run) run_experiment ;;
    status) status ;;
    delete) delete ;;
    all) create; setup; run_experiment ;;
  esac
done
