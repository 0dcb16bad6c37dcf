r"""perceivers-train: train, evaluate or size a model from a Python config.

  perceivers-train --config=perceivers_jax/configs/tiny.py --workdir=/tmp/tiny
  perceivers-train --config=perceivers_jax/configs/perceivers.py:final_block --workdir=DIR \
      --config.train.batch_size=16 --config.mesh.fsdp=-1 --config.mesh.data=1
  perceivers-train --config=perceivers_jax/configs/tiny.py --workdir=/tmp/tiny --mode=eval
  perceivers-train --config=perceivers_jax/configs/perceivers.py --dry_run   # sizes, no training
  perceivers-train --config=perceivers_jax/configs/perceivers.py --dry_run \
      --compile_topology=v5p-32 \
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

from perceivers_jax.cli import compile_target
from perceivers_jax.cli import distributed
from perceivers_jax.cli import logs
from perceivers_jax.parallel import compiled

flags.adopt_module_key_flags(distributed)  # --help lists the multi-host flags,
flags.adopt_module_key_flags(compile_target)  # and the compile-target ones.

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (perceivers_jax/configs/*.py[:variant]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and config.json go here.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train (resuming from --workdir) or a one-off evaluation.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False,
                             "Print one JSON line of sizes and compiled memory, then exit.")
_DRY_RUN_COMPILE = flags.DEFINE_bool(
    "dry_run_compile", True, "With --dry_run: compile the step for its memory analysis "
    "(off: lowering only, much faster for paper size on CPU).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=perceivers_jax/configs/tiny.py")
  if _WORKDIR.value and os.path.exists(_WORKDIR.value) and not os.path.isdir(_WORKDIR.value):
    raise app.UsageError(f"--workdir={_WORKDIR.value} is a file; pass a folder (new, or "
                         "holding the run to resume)")
  if compile_target.COMPILE_TOPOLOGY.value and not _DRY_RUN.value:
    raise app.UsageError("--compile_topology needs --dry_run (it compiles, never runs).")
  if not compile_target.requested():  # Before anything touches a jax backend.
    distributed.initialize()
  from perceivers_jax.training import dry_run  # pylint: disable=g-import-not-at-top
  from perceivers_jax.training import validation  # pylint: disable=g-import-not-at-top
  from perceivers_jax.training import train  # pylint: disable=g-import-not-at-top
  from perceivers_jax.watch import music  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  if _DRY_RUN.value:
    compiled.print_report(dry_run.dry_run(
        config, compile_step=_DRY_RUN_COMPILE.value,
        compile_topology=compile_target.COMPILE_TOPOLOGY.value,
        num_slices=compile_target.NUM_SLICES.value))
    return
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required for training and evaluation.")
  if _MODE.value == "eval":
    metrics = validation.evaluate(config, _WORKDIR.value)
    logging.info("Evaluation: %s", metrics)
  else:
    with distributed.exit_when_a_process_fails():
      train.train_and_evaluate(config, _WORKDIR.value,
                               evaluators=music.evaluators(config, _WORKDIR.value))


def run() -> None:
  """Console-script entry point (`perceivers-train`)."""
  logs.run(main, __name__)


if __name__ == "__main__":
  run()
