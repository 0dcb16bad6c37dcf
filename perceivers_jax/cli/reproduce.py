r"""perceivers-reproduce: the paper's comparison as an experiment (BUILD.md section 9): the
paper's three models and two size-matched controls trained side by side on folds of the 10
pieces, then NLL by position, early-minus-late gaps, Table I on whole samples and on openings,
and paired 95% intervals between models.

  make reproduce                                            # the CPU default
  perceivers-reproduce --config=perceivers_jax/configs/tiny.py --workdir=/tmp/reproduce
  perceivers-reproduce --workdir=/tmp/r --models=perceiver_ar,perceivers --seeds=0 --steps=30
  perceivers-reproduce --config=perceivers_jax/configs/reproduce_gpu_hour.py --dry_run
                                                            # sizes and FLOPs

Rerunning skips every finished model x seed whose config is unchanged; an interrupted one
resumes from its checkpoint; one whose config changed runs again.
"""

import json
import shlex
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from perceivers_jax.cli import logs
from perceivers_jax.configs import tiny

_CONFIG = config_flags.DEFINE_config_file(
    "config", tiny.__file__, "PerceiverS config with scales [full, W] "
    "(perceivers_jax/configs/*.py[:variant]); every model is derived from it "
    "(config_base.paper_model). Default perceivers_jax/configs/tiny.py.")
_WORKDIR = flags.DEFINE_string("workdir", "reproduce_output", "Where everything is written.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "An existing TFDS data_dir with maestro_performance/full, used by every "
    "seed (default: the 10 fetched pieces, one fold of 8 train / 2 held out per seed).")
_MODELS = flags.DEFINE_list(
    "models", "perceiver_ar,effective_segmentation,perceivers,effective_two_full",
    "Models to compare (config_base.PAPER_MODELS; also perceivers_sum); the first is the "
    "baseline of the OA-change column.")
_SEEDS = flags.DEFINE_list("seeds", "0,1,2", "Training and sampling seeds; on the 10 pieces "
                           "seed s also picks fold s mod 5 (its held-out pieces).")
_STEPS = flags.DEFINE_integer("steps", 500, "Training steps of every model.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 4, "Unconditional samples per model and seed.")
_SAMPLE_TOKENS = flags.DEFINE_integer("sample_tokens", 1024, "Tokens per sample.")
_OPENING_SECONDS = flags.DEFINE_float(
    "opening_seconds", 10.0, "Table I on openings: the first seconds of samples and pieces.")
_EVAL_TARGETS = flags.DEFINE_integer(
    "eval_targets_per_piece", 4096, "Evaluate each held-out piece's first targets only "
    "(config.eval.max_targets_per_piece; 0 = whole pieces).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Print each model's parameters and FLOPs and the run's training FLOPs "
    "(one JSON object), without data or training.")


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
      opening_seconds=_OPENING_SECONDS.value, eval_targets_per_piece=_EVAL_TARGETS.value,
      temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
      command=shlex.join(["perceivers-reproduce"] + sys.argv[1:]))
  if _DRY_RUN.value:
    print(json.dumps(reproduce.plan(options), indent=1))
  else:
    reproduce.run_reproduce(options)  # checks the options before any work


def run() -> None:
  """Console-script entry point (`perceivers-reproduce`)."""
  logs.run(main, __name__)


if __name__ == "__main__":
  run()
