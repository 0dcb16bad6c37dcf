#!/usr/bin/env bash
# Train on one GPU node (all its GPUs, one process; no jax.distributed needed).
#
# Usage (an 8-GPU H100 / H200 node; the config's batches of 8, 1 window per GPU):
#   launch/gpu_single_node.sh --config=configs/perceivers.py \
#       --config.data.data_dir=$HOME/tfds --workdir=$HOME/runs/perceivers [more perceivers-train flags]
# The batches (config.train.batch_size, config.eval.batch_size) are global and must split over
# the GPUs (data x fsdp); perceivers-train checks this before it builds anything.
#
# Environment (optional):
#   PERCEIVERS_VENV       virtualenv to use (default: <repo>/.venv, created with '.[gpu]' if missing).
#   CUDA_VISIBLE_DEVICES  which GPUs to use (default: all).
# The log goes to <workdir>/train.log as well as the terminal. Signals: Ctrl-C (SIGINT) or
# SIGTERM (`kill PID`) lets the current step finish, saves a checkpoint and exits with status
# 0; a second Ctrl-C exits at once without saving. SIGKILL (`kill -9`, out of memory) loses
# the steps since the last interval checkpoint. Rerunning the same command resumes from the
# latest checkpoint (and deletes a half-written one).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PERCEIVERS_VENV:-$repo_root/.venv}"
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet -e "${repo_root}[gpu]"
fi

workdir=""
for arg in "$@"; do
  case "$arg" in --workdir=*) workdir="${arg#*=}" ;; esac
done
if [[ -z "$workdir" ]]; then
  echo "gpu_single_node.sh: --workdir=DIR is required (checkpoints and logs go there)" >&2
  exit 2
fi
mkdir -p "$workdir"

# Let XLA overlap collectives with compute and take most of the GPU memory up front.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"

cd "$repo_root"
# tee ignores Ctrl-C, so it keeps logging while training saves; it ends when training does.
exec > >(trap '' INT TERM; exec tee -a "$workdir/train.log") 2>&1
exec "$venv/bin/python" -m perceivers_jax.cli.train "$@"
