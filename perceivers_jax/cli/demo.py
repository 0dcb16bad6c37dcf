r"""perceivers-demo: the end-to-end demo on 10 real MAESTRO performances (README command 1).

  make demo                                   # creates .venv, then runs this
  perceivers-demo --output_dir=demo_output    # the same, in an existing environment
  perceivers-demo --steps=50 --sample_tokens=256   # a quick smoke run
  perceivers-demo --config=perceivers_jax/configs/perceivers.py \
      --data_dir=$HOME/tfds                   # full MAESTRO build

Rerunning reuses the built data and the trained model; an interrupted run resumes.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from perceivers_jax.cli import logs
from perceivers_jax.configs import tiny

_CONFIG = config_flags.DEFINE_config_file(
    "config", tiny.__file__, "Experiment config (perceivers_jax/configs/*.py[:variant]); default "
    "perceivers_jax/configs/tiny.py.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "demo_output", "Where everything is written.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "An existing TFDS data_dir with maestro_performance/full (default: build "
    "one from the 10 fetched pieces under --output_dir).")
_STEPS = flags.DEFINE_integer("steps", 0, "Training steps (0: the config's train.num_steps).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 8, "Unconditional samples per model.")
_SAMPLE_TOKENS = flags.DEFINE_integer("sample_tokens", 1024, "Tokens per sample.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _STEPS.value < 0 or _NUM_SAMPLES.value < 2 or _SAMPLE_TOKENS.value < 16:
    raise app.UsageError("--steps must be >= 0, --num_samples >= 2 (a set needs two pieces "
                         "for intra-set distances) and --sample_tokens >= 16.")
  from perceivers_jax.experiments import demo  # pylint: disable=g-import-not-at-top
  demo.run_demo(demo.DemoOptions(
      output_dir=_OUTPUT_DIR.value, config=_CONFIG.value, data_dir=_DATA_DIR.value,
      steps=_STEPS.value, num_samples=_NUM_SAMPLES.value, sample_tokens=_SAMPLE_TOKENS.value,
      seed=_SEED.value))


def run() -> None:
  """Console-script entry point (`perceivers-demo`)."""
  logs.run(main, __name__)


if __name__ == "__main__":
  run()
