r"""perceivers-score: the model's surprisal on whole pieces of any length.

  perceivers-score --checkpoint=$HOME/runs/perceivers --output_dir=surprisal piece.mid
  perceivers-score --checkpoint=RUN/checkpoints/20000 --compare=RUN/checkpoints/100000 \
      --output_dir=surprisal piece.mid sample_0003.npy

--checkpoint and --compare take a training workdir (its latest checkpoint, or --step), one of
its checkpoints/STEP folders or a perceivers-export directory. Each token after SOS is scored
once with the most context that fits (the validation pass's sequential windows, so a piece's
total equals the validation NLL of the same tokens). Per piece NAME: NAME.json (per-token and
per-note surprisal in bits, bits per token and per second of music) and NAME.png (the piano
roll coloured by surprisal); with --compare also NAME_difference.png and, in the JSON, the
second checkpoint's per-note surprisal and the difference.
"""

from absl import app
from absl import flags

from perceivers_jax.cli import distributed
from perceivers_jax.cli import logs

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Training workdir, its checkpoints/STEP folder or an export.",
    required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_COMPARE = flags.DEFINE_string("compare", None, "A second checkpoint (same forms) to compare "
                               "per note with the first.")
_COMPARE_STEP = flags.DEFINE_integer("compare_step", None, "Step of --compare (default: "
                                     "the latest).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where NAME.json and NAME.png go.",
                                  required=True)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Windows scored together (default: the "
                                   "checkpoint config's eval.batch_size).")


def main(argv: list[str]) -> None:
  if _BATCH_SIZE.value is not None and _BATCH_SIZE.value < 1:
    raise app.UsageError(f"--batch_size={_BATCH_SIZE.value}: must be >= 1.")
  distributed.initialize()  # Before anything touches a jax backend.
  from perceivers_jax.watch import score  # pylint: disable=g-import-not-at-top
  results = score.score_files(argv[1:], _OUTPUT_DIR.value, _CHECKPOINT.value, step=_STEP.value,
                              compare=_COMPARE.value, compare_step=_COMPARE_STEP.value,
                              batch_size=_BATCH_SIZE.value)
  for result in results:
    line = (f"{result['piece']}: {result['num_tokens']} tokens, {result['seconds']:.1f} s, "
            f"{result['bits_per_token']:.3f} bits/token")
    if result["bits_per_second"] is not None:
      line += f", {result['bits_per_second']:.1f} bits/s"
    if "compare" in result:
      line += f"; step {result['compare']['step']}: {result['compare']['bits_per_token']:.3f}"
    print(line, flush=True)
  print(f"Wrote {len(results)} piece(s) to {_OUTPUT_DIR.value}", flush=True)


def run() -> None:
  """Console-script entry point (`perceivers-score`)."""
  logs.run(main, __name__)


if __name__ == "__main__":
  run()
