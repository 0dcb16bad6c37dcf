# shellcheck shell=bash
# Sourced by gpu_suite.sh and tpu_suite.sh, from the repository root.
#   suite_start NAME         results into $OUT (the device tool's output folder) or
#                            benchmarks/NAME_results/; prints jax's version and devices and
#                            sets num_devices (the chips of this host)
#   step SECONDS NAME CMD... runs one benchmark under its own time limit (so one slow step
#                            cannot eat the others' time), its output teed to $out/NAME.log
#   paper_benchmarks         the paper-size figures both suites report (SPEC 6): train
#                            steps at 1 and 8 windows per chip, sampling on one chip
#   suite_end                exits 1 if any step failed or timed out
status=0
suite_start() {
  out="${OUT:-benchmarks/$1_results}"
  mkdir -p "$out"
  export PYTHONUNBUFFERED=1
  local found
  found="$(python -c 'import jax; print(jax.device_count(), jax.__version__, jax.devices())')"
  num_devices="${found%% *}"
  if [[ ! "$num_devices" =~ ^[0-9]+$ ]]; then
    echo "!! jax did not start: no devices to benchmark"
    exit 1
  fi
  echo "${found#* }"
}
step() {
  local limit="$1" name="$2"
  shift 2
  echo "== $name"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  if [ "${PIPESTATUS[0]}" -ne 0 ]; then
    echo "!! $name failed or timed out"
    status=1
  fi
}
paper_benchmarks() {
  local paper=(--config=configs/perceivers.py --config.model.attention_impl=auto
               --config.model.dtype=bfloat16)
  # Batches per chip, data parallel over every chip of the host (the global batch must split
  # over them), so each chip's step is the one-chip step: train_step.py reports per chip too.
  local b1=$((1 * num_devices)) b8=$((8 * num_devices))
  step 110 train_b1 python benchmarks/train_step.py "${paper[@]}" --config.train.batch_size=$b1 \
    --config.eval.batch_size=$b1 --steps=10 --output="$out/train_b1.json"
  step 150 train_b8 python benchmarks/train_step.py "${paper[@]}" --config.train.batch_size=$b8 \
    --config.eval.batch_size=$b1 --steps=10 --output="$out/train_b8.json"
  # 1,280 tokens from SOS: past the first latent reset (N = 1,024), as the CPU decode table;
  # sampling.py runs on one chip.
  step 160 sampling python benchmarks/sampling.py --config=configs/perceivers.py \
    --batch_sizes=1,16 --num_tokens=1280 --output="$out/sampling.json"
}
suite_end() {
  exit "$status"
}
