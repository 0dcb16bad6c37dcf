# shellcheck shell=bash
# Sourced by gpu_suite.sh and tpu_suite.sh, from the repository root.
#   suite_start NAME         results into $OUT (the device tool's output folder) or
#                            benchmarks/NAME_results/; prints jax's version and devices
#   step SECONDS NAME CMD... runs one benchmark under its own time limit (so one slow step
#                            cannot eat the others' time), its output teed to $out/NAME.log
#   suite_end                exits 1 if any step failed or timed out
status=0
suite_start() {
  out="${OUT:-benchmarks/$1_results}"
  mkdir -p "$out"
  export PYTHONUNBUFFERED=1
  python -c 'import jax; print(jax.__version__, jax.devices())'
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
suite_end() {
  exit "$status"
}
