r"""perceivers-train: train, evaluate or size a model from a Python config.

  perceivers-train --config=configs/tiny.py --workdir=/tmp/tiny
  perceivers-train --config=configs/perceivers.py:final_block --workdir=DIR \
      --config.train.batch_size=16 --config.mesh.fsdp=-1 --config.mesh.data=1
  perceivers-train --config=configs/tiny.py --workdir=/tmp/tiny --mode=eval
  perceivers-train --config=configs/perceivers.py --dry_run     # sizes only, no training
  perceivers-train --config=configs/perceivers.py --dry_run --compile_topology=v5p-32 \
      --config.train.batch_size=32      # the step compiled for a TPU slice, from any host

Rerunning the same command resumes from the latest checkpoint in --workdir. Multi-host: run the
same command on every host (TPU pods, SLURM and Open MPI are detected; otherwise pass
--coordinator_address, --num_processes and --process_id, or the JAX_* environment variables).
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from perceivers_jax.cli import distributed
from perceivers_jax.cli import logs
from perceivers_jax.parallel import compiled
from perceivers_jax.parallel import topology

flags.adopt_module_key_flags(distributed)  # --help lists the multi-host flags.

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and config.json go here.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train (resuming from --workdir) or a one-off evaluation.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False,
                             "Print one JSON line of sizes and compiled memory, then exit.")
_DRY_RUN_COMPILE = flags.DEFINE_bool(
    "dry_run_compile", True, "With --dry_run: compile the step for its memory analysis "
    "(off: lowering only, much faster for paper size on CPU).")
_COMPILE_TOPOLOGY = flags.DEFINE_string(
    "compile_topology", None, "With --dry_run: compile for this TPU slice instead of this "
    "host's devices (v4-8, v5e-16, v5p-32, v6e-8, ...; needs libtpu: pip install -e '.[tpu]'); "
    "BUILD.md section 'Compiling for TPU topologies'.")
_COMPILE_TOPOLOGY_NUM_SLICES = flags.DEFINE_integer(
    "compile_topology_num_slices", 1, "With --compile_topology: that many slices (the mesh's "
    "config.mesh.dcn_* level spans them).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/tiny.py")
  if _WORKDIR.value and os.path.exists(_WORKDIR.value) and not os.path.isdir(_WORKDIR.value):
    raise app.UsageError(f"--workdir={_WORKDIR.value} is a file; pass a folder (new, or "
                         "holding the run to resume)")
  if _COMPILE_TOPOLOGY.value and not _DRY_RUN.value:
    raise app.UsageError("--compile_topology needs --dry_run (it compiles, never runs).")
  if _COMPILE_TOPOLOGY.value:
    topology.quiet_libtpu()  # Before anything touches a jax backend.
  else:
    distributed.initialize()  # Before anything touches a jax backend.
  from perceivers_jax.training import dry_run  # pylint: disable=g-import-not-at-top
  from perceivers_jax.training import evaluation  # pylint: disable=g-import-not-at-top
  from perceivers_jax.training import train  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  if _DRY_RUN.value:
    compiled.print_report(dry_run.dry_run(
        config, compile_step=_DRY_RUN_COMPILE.value, compile_topology=_COMPILE_TOPOLOGY.value,
        num_slices=_COMPILE_TOPOLOGY_NUM_SLICES.value))
    return
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required for training and evaluation.")
  if _MODE.value == "eval":
    metrics = evaluation.evaluate(config, _WORKDIR.value)
    logging.info("Evaluation: %s", metrics)
  else:
    train.train_and_evaluate(config, _WORKDIR.value)


def run() -> None:
  """Console-script entry point (`perceivers-train`)."""
  logs.run(main, __name__)


if __name__ == "__main__":
  run()
