"""Compares generated sets with a reference set (the paper's Table I, SPEC 5).

  perceivers-evaluate --reference=REF_DIR --generated=perceivers:GEN_DIR,baseline:GEN2_DIR \
      --output_dir=eval_out [--kld=shared_grid|mgeval]

  perceivers-evaluate --reference=tfds:maestro_performance/full:validation \
      --data_dir=~/tensorflow_datasets --generated=perceivers:GEN_DIR --output_dir=eval_out

Folders are searched recursively for .mid/.midi (sustain folded in, as the tokeniser
reads MIDI) and .npy token arrays. Writes metrics.json, report.md and PNG plots.
"""

from absl import app
from absl import flags

from perceivers_jax.cli import logs

from perceivers_jax.evaluation import distances
from perceivers_jax.evaluation import features
from perceivers_jax.evaluation import report

_REFERENCE = flags.DEFINE_string(
    "reference", None, "Reference set: a folder of MIDI/.npy files or tfds:NAME:SPLIT.",
    required=True)
_GENERATED = flags.DEFINE_list(
    "generated", None, "Generated sets, NAME:FOLDER[,NAME:FOLDER...]; the first is the "
    "baseline of the report's OA-change column.", required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the report goes.", required=True)
_KLD = flags.DEFINE_enum("kld", "shared_grid", distances.KLD_MODES,
                         "KLD mode: densities on one shared grid, or mgeval's own-range one.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory for tfds: sets.")
_MAX_PIECES = flags.DEFINE_integer("max_pieces", 0,
                                   "Read at most this many pieces per set (0: all).")
_NUM_SEGMENTS = flags.DEFINE_integer("num_segments", features.NUM_SEGMENTS,
                                     "Equal-duration segments per piece for /seg features.")


def parse_generated(specs: list[str]) -> dict[str, str]:
  """["NAME:FOLDER", ...] -> {NAME: FOLDER} (split at the first colon)."""
  generated = {}
  for spec in specs:
    name, sep, folder = spec.partition(":")
    if not sep or not name or not folder:
      raise app.UsageError(f"--generated entry {spec!r}: expected NAME:FOLDER")
    if name in generated:
      raise app.UsageError(f"--generated names set {name!r} twice")
    generated[name] = folder
  return generated


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  report.evaluate_sets(
      _REFERENCE.value, parse_generated(_GENERATED.value), _OUTPUT_DIR.value,
      kld=_KLD.value, data_dir=_DATA_DIR.value, max_pieces=_MAX_PIECES.value or None,
      num_segments=_NUM_SEGMENTS.value)
  print(f"Wrote {_OUTPUT_DIR.value}/report.md and metrics.json")


def run() -> None:
  logs.run(main, __name__)


if __name__ == "__main__":
  run()
