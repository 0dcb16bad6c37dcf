#!/usr/bin/env bash
# The GPU benchmark suite in one call (about 8 minutes on one H100/H200): cuDNN attention
# correctness, then paper-size train steps at 1 and 8 windows per GPU over every GPU of the
# host (the global batch is GPUs x k; figures also per GPU) and cached sampling on one GPU.
# Writes JSON files into $OUT (the device tool's output folder) or benchmarks/gpu_results/,
# and prints one table row per benchmark.
#
#   bash benchmarks/gpu_suite.sh                 # on a GPU machine with the package installed
#
# Needs jax with CUDA, flax, optax, orbax (the GPU image has them) plus this package's other
# requirements (note-seq, grain, tensorflow-datasets, ml-collections, tensorboardX): install
# with `pip install -e .` or carry wheels. Each step has its own time limit so one slow step
# cannot eat the others' time.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
# shellcheck source=benchmarks/suite_steps.sh
source benchmarks/suite_steps.sh
suite_start gpu

step 60 cudnn_vs_xla python -m pytest -q tests/attention_test.py -k cudnn
paper_benchmarks  # attention_impl=auto: cuDNN here (bf16)
suite_end
