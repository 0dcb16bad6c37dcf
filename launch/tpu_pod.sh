#!/usr/bin/env bash
# Train or sample on a Cloud TPU VM slice: one identical `perceivers-train` (or, with
# --job=sample, `perceivers-sample`) command on every worker.
#
# Usage:
#   launch/tpu_pod.sh --name=NAME --zone=ZONE [--job=train|sample] [--accelerator=v5p-64]
#       [--version=RUNTIME] [--project=PROJECT] [--create] [--spot] [--log_dir=DIR] -- FLAGS...
#
# Example (the paper's model on a v5p-64: 32 chips on 8 hosts; data built beforehand into a
# GCS bucket):
#   launch/tpu_pod.sh --name=perceivers --zone=us-east5-a --accelerator=v5p-64 --create -- \
#     --config=configs/perceivers.py --config.data.data_dir=gs://BUCKET/tfds \
#     --config.mesh.fsdp=-1 --config.mesh.data=1 --config.train.batch_size=32 \
#     --config.eval.batch_size=32 --workdir=gs://BUCKET/runs/perceivers
# The batches are global: each must split over the chips that share it (data x fsdp, here
# all 32; 1 window per chip to start, more while memory allows). perceivers-train checks
# this on the workers before it builds anything and names the field to change.
# Sampling 1,024 pieces from it (--batch_size is the global batch; --workdir and --output_dir
# must be paths every worker sees, e.g. a gcsfuse mount of the bucket):
#   launch/tpu_pod.sh --name=perceivers --zone=us-east5-a --job=sample -- \
#     --workdir=/mnt/BUCKET/runs/perceivers --output_dir=/mnt/BUCKET/samples/perceivers \
#     --num_samples=1024 --batch_size=256 --num_tokens=8192 --seed=0
#
# Steps: (1) create the slice if --create and it does not exist (reuses it otherwise);
# (2) copy the tracked files of this checkout to ~/perceivers-jax on every worker;
# (3) `pip install -e '.[tpu]'` there; (4) run the same command on all workers
# (`--worker=all`); jax.distributed.initialize() auto-detects the TPU topology, so no
# coordinator flags are needed. Each worker writes its log to ~/perceivers-logs/<host>-<job>.log,
# copied back afterwards into --log_dir (default ./tpu_logs/NAME).
#
# Environment: gcloud authenticated with TPU rights; PROJECT taken from gcloud config unless
# --project is given. Signals: a preempted worker gets SIGTERM; every worker lets the current
# step finish, all save the same step (the jax coordination service agrees on it) and exit
# with status 0; SIGINT (Ctrl-C in the ssh session) is treated as SIGTERM. SIGKILL loses the
# steps since the last interval checkpoint. Rerunning this script with the same flags resumes
# from --workdir; a rerun sampling job writes only the samples missing from --output_dir.
set -euo pipefail

name="" zone="" accelerator="v5p-64" version="v2-alpha-tpuv5" project="" create=0 spot=0
log_dir="" job="train"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --log_dir=*) log_dir="${1#*=}" ;;
    --job=*) job="${1#*=}" ;;
    --create) create=1 ;;
    --spot) spot=1 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown flag $1 (flags before --, perceivers-$job flags after)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z "$name" || -z "$zone" ]]; then
  echo "tpu_pod.sh: --name and --zone are required (see the header of this script)" >&2
  exit 2
fi
if [[ "$job" != "train" && "$job" != "sample" ]]; then
  echo "tpu_pod.sh: --job=$job: must be train or sample" >&2
  exit 2
fi
if [[ $# -eq 0 ]]; then
  echo "tpu_pod.sh: give the perceivers-$job flags after --, e.g. -- --config=configs/perceivers.py --workdir=gs://..." >&2
  exit 2
fi
log_dir="${log_dir:-tpu_logs/$name}"
gcloud_tpu=(gcloud compute tpus tpu-vm)
common=(--zone="$zone")
[[ -n "$project" ]] && common+=(--project="$project")

if ! "${gcloud_tpu[@]}" describe "$name" "${common[@]}" >/dev/null 2>&1; then
  if [[ "$create" -ne 1 ]]; then
    echo "tpu_pod.sh: TPU $name not found in $zone; pass --create to create it" >&2
    exit 1
  fi
  create_flags=(--accelerator-type="$accelerator" --version="$version")
  [[ "$spot" -eq 1 ]] && create_flags+=(--spot)
  "${gcloud_tpu[@]}" create "$name" "${common[@]}" "${create_flags[@]}"
fi

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
archive="$(mktemp -t perceivers-jax-XXXX.tar.gz)"
trap 'rm -f "$archive"' EXIT
git -C "$repo_root" ls-files -z | tar -C "$repo_root" --null -T - -czf "$archive"

run_all() { "${gcloud_tpu[@]}" ssh "$name" "${common[@]}" --worker=all --command="$1"; }

"${gcloud_tpu[@]}" scp "$archive" "$name:~/perceivers-jax.tar.gz" "${common[@]}" --worker=all
run_all "mkdir -p ~/perceivers-jax ~/perceivers-logs && tar -xzf ~/perceivers-jax.tar.gz -C ~/perceivers-jax \
  && cd ~/perceivers-jax && python3 -m pip install --quiet -e '.[tpu]'"

job_flags="$(printf ' %q' "$@")"
status=0
run_all "cd ~/perceivers-jax && python3 -m perceivers_jax.cli.$job$job_flags \
  2>&1 | tee ~/perceivers-logs/\$(hostname)-$job.log; exit \${PIPESTATUS[0]}" || status=$?

mkdir -p "$log_dir"
"${gcloud_tpu[@]}" scp "$name:~/perceivers-logs/*" "$log_dir/" "${common[@]}" --worker=all || true
echo "tpu_pod.sh: perceivers-$job exited with status $status; worker logs in $log_dir"
exit "$status"
