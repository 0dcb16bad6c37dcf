r"""perceivers-sample: generate MIDI pieces from a trained PerceiverS.

  perceivers-sample --workdir=/tmp/tiny --output_dir=/tmp/samples --num_samples=8 \
      --batch_size=4 --num_tokens=2048 --top_p=0.95
  perceivers-sample --workdir=/tmp/tiny --output_dir=/tmp/cont --primer=piece.mid \
      --primer_seconds=10 --num_tokens=1024
  perceivers-sample --checkpoint=/tmp/tiny/checkpoints/400 --output_dir=/tmp/again \
      --num_samples=8 --batch_size=4 --num_tokens=2048 --top_p=0.95 --sample_index=5

The model config comes from the workdir's config.json. Each sample i writes sample_{i:04d}.mid,
.npy (tokens) and .json (its seed, settings, checkpoint and the command regenerating it alone:
the same flags plus --sample_index=i give the same tokens).
"""

from absl import app
from absl import flags
from absl import logging

from perceivers_jax.cli import logs

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json, checkpoints/).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Instead of --workdir: a workdir's checkpoints/STEP folder or a "
    "perceivers-export directory (manifest.json).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the samples go.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Number of samples K.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 1, "Samples generated together.")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 1024,
                                   "Tokens to generate after the prompt (may exceed L).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1] (1 = off).")
_MIN_P = flags.DEFINE_float("min_p", 0.0, "Keep tokens with p >= min_p * p_max (0 = off).")
_MAX_SECONDS = flags.DEFINE_float(
    "max_seconds", 0.0, "Stop each piece by this much music (primer included; 0 = off).")
_END_SECONDS = flags.DEFINE_float(
    "end_seconds", 0.0, "After this much music, raise the EOS probability smoothly so the "
    "piece finishes (0 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Run seed; sample i uses fold_in(key(seed), i).")
_PRIMER = flags.DEFINE_string("primer", None, "MIDI file to continue (default: unconditional).")
_PRIMER_SECONDS = flags.DEFINE_float("primer_seconds", None,
                                     "Keep the primer's first seconds (default: all of it).")
_SAMPLE_INDEX = flags.DEFINE_multi_integer(
    "sample_index", [], "Generate only these samples (repeatable); same other flags as the "
    "original run reproduce them exactly.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if (_WORKDIR.value is None) == (_CHECKPOINT.value is None):
    raise app.UsageError("Pass exactly one of --workdir=DIR and --checkpoint=DIR.")
  if not _OUTPUT_DIR.value:
    raise app.UsageError("--output_dir is required.")
  # Imported here so that flag errors come before jax starts.
  from perceivers_jax.sampling import sampling  # pylint: disable=g-import-not-at-top

  path = _WORKDIR.value or _CHECKPOINT.value
  settings = sampling.SampleSettings(
      num_samples=_NUM_SAMPLES.value, batch_size=_BATCH_SIZE.value, num_tokens=_NUM_TOKENS.value,
      temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value, min_p=_MIN_P.value,
      max_seconds=_MAX_SECONDS.value, end_seconds=_END_SECONDS.value, seed=_SEED.value,
      primer=_PRIMER.value, primer_seconds=_PRIMER_SECONDS.value)
  indices = _SAMPLE_INDEX.value or None
  try:
    workdir, step = sampling.resolve_path(path, _STEP.value)
    config = sampling.read_config(workdir)
    # Every request error surfaces here, before anything is restored or compiled.
    sampling.check_settings(settings, config.model, indices)
    model, config, step = sampling.load_model(workdir, step)
  except (FileNotFoundError, sampling.SamplingError) as e:
    raise app.UsageError(str(e)) from e
  sidecars = sampling.sample_to_dir(model, config, settings, _OUTPUT_DIR.value,
                                    checkpoint_step=step, checkpoint_path=workdir,
                                    sample_indices=indices)
  for sidecar in sidecars:
    logging.info("sample %d: %d tokens, %.1f s, EOS %s", sidecar["sample_index"],
                 sidecar["num_tokens"], sidecar["duration_seconds"], sidecar["eos_reached"])
  print(f"Wrote {len(sidecars)} samples to {_OUTPUT_DIR.value}", flush=True)


def run() -> None:
  """Console-script entry point (`perceivers-sample`)."""
  logs.run(main, __name__)


if __name__ == "__main__":
  run()
