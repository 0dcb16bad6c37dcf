r"""perceivers-reproduce: the paper's comparison (Perceiver AR, Effective Segmentation,
PerceiverS) trained side by side, then NLL by position, Table I, repetition and rho(k).

  make reproduce                                            # the CPU default (~25 min)
  perceivers-reproduce --config=perceivers_jax/configs/tiny.py --workdir=/tmp/reproduce
  perceivers-reproduce --workdir=/tmp/r --models=perceiver_ar,perceivers --seeds=0 --steps=30

Rerunning skips every finished model x seed; an interrupted one resumes from its checkpoint.
"""

import shlex
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from perceivers_jax.cli import logs
from perceivers_jax.configs import tiny

_CONFIG = config_flags.DEFINE_config_file(
    "config", tiny.__file__, "PerceiverS config with scales [full, W] "
    "(perceivers_jax/configs/*.py[:variant]); the other two models are derived from it. Default "
    "perceivers_jax/configs/tiny.py.")
_WORKDIR = flags.DEFINE_string("workdir", "reproduce_output", "Where everything is written.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "An existing TFDS data_dir with maestro_performance/full (default: build "
    "one from the 10 fetched pieces under --workdir).")
_MODELS = flags.DEFINE_list(
    "models", "perceiver_ar,effective_segmentation,perceivers",
    "Models to compare; the first is the baseline of the OA-change column.")
_SEEDS = flags.DEFINE_list("seeds", "0,1,2", "Training (and sampling) seeds.")
_STEPS = flags.DEFINE_integer("steps", 600, "Training steps of every model.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 4, "Unconditional samples per model and seed.")
_SAMPLE_TOKENS = flags.DEFINE_integer("sample_tokens", 1024, "Tokens per sample.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    seeds = tuple(int(s) for s in _SEEDS.value)
  except ValueError as e:
    raise app.UsageError(f"--seeds={','.join(_SEEDS.value)}: integers, e.g. --seeds=0,1") from e
  from perceivers_jax.experiments import reproduce  # pylint: disable=g-import-not-at-top
  options = reproduce.ReproduceOptions(
      workdir=_WORKDIR.value, config=_CONFIG.value, data_dir=_DATA_DIR.value,
      models=tuple(_MODELS.value), seeds=seeds, steps=_STEPS.value,
      num_samples=_NUM_SAMPLES.value, sample_tokens=_SAMPLE_TOKENS.value,
      command=shlex.join(["perceivers-reproduce"] + sys.argv[1:]))
  reproduce.run_reproduce(options)  # checks the options before any work


def run() -> None:
  """Console-script entry point (`perceivers-reproduce`)."""
  logs.run(main, __name__)


if __name__ == "__main__":
  run()
