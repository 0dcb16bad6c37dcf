#!/usr/bin/env bash
# The TPU benchmark suite in one call (a TPU VM, one host; the same figures as gpu_suite.sh):
# attention kernels against the XLA reference, then paper-size train steps at 1 and 8
# windows per chip over every chip of the VM (the global batch is chips x k; figures also per
# chip; attention_impl=auto: splash for both cross-attention scales and the latents in the
# train step's forward; the cached sampler's chunked/XLA kernels) and cached sampling at
# batch 1 and 16 on one chip. Writes JSON files into $OUT or benchmarks/tpu_results/ and
# prints one table row per benchmark.
#
#   pip install -e '.[tpu,test]' && bash benchmarks/tpu_suite.sh
#
# Each step has its own time limit so one slow step cannot eat the others' time.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
# shellcheck source=benchmarks/suite_steps.sh
source benchmarks/suite_steps.sh
suite_start tpu

# float32 matmuls at full precision, so the XLA reference is exact enough for the tolerances.
step 240 kernels_vs_xla env JAX_DEFAULT_MATMUL_PRECISION=highest python -m pytest -q \
  tests/attention_test.py tests/splash_test.py -k "chunked or windowed or splash"
paper_benchmarks  # attention_impl=auto: splash in the train step's forward here
suite_end
