"""Compares generated sets with a reference set (the paper's Table I, BUILD section 7).

  perceivers-evaluate --reference=REF_DIR --generated=perceivers:GEN_DIR,baseline:GEN2_DIR \
      --output_dir=eval_out [--kld=shared_grid|mgeval]

  perceivers-evaluate --reference=tfds:maestro_performance/full:validation \
      --data_dir=~/tensorflow_datasets --generated=perceivers:GEN_DIR --output_dir=eval_out

  perceivers-evaluate ... --train=tfds:maestro_performance/full:train   # + memorisation check

Folders are searched recursively for .mid/.midi (sustain folded in, as the tokeniser
reads MIDI) and .npy token arrays. Writes metrics.json, report.md and PNG plots; with
--train also memorisation.json/.md: per piece of every generated set and of the reference
(the baseline), the longest run of notes shared with a training piece and the share of its
notes in shared runs of 16 or more.
"""

import os

from absl import app
from absl import flags

from perceivers_jax.cli import logs

from perceivers_jax.evaluation import distances
from perceivers_jax.evaluation import features
from perceivers_jax.evaluation import memorisation
from perceivers_jax.evaluation import piece_sets
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
_TRAIN = flags.DEFINE_string(
    "train", None, "Training set for the memorisation check: a folder of MIDI/.npy files or "
    "tfds:NAME:train (default: no check).")
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
  train = _TRAIN.value
  if train and not train.startswith(piece_sets.TFDS_PREFIX) and not os.path.isdir(train):
    raise app.UsageError(f"--train={train}: not a folder; pass a folder of MIDI/.npy files "
                         "or tfds:NAME:train")
  generated = parse_generated(_GENERATED.value)
  if train and "reference" in generated:
    raise app.UsageError("--generated: with --train, name no set 'reference' (the memorisation "
                         "report uses that name for the --reference set)")
  report.evaluate_sets(
      _REFERENCE.value, generated, _OUTPUT_DIR.value,
      kld=_KLD.value, data_dir=_DATA_DIR.value, max_pieces=_MAX_PIECES.value or None,
      num_segments=_NUM_SEGMENTS.value)
  written = "report.md and metrics.json"
  if _TRAIN.value:
    memorisation.evaluate_memorisation(
        train, {"reference": _REFERENCE.value, **generated},
        _OUTPUT_DIR.value, data_dir=_DATA_DIR.value, max_pieces=_MAX_PIECES.value or None)
    written += ", memorisation.md and memorisation.json"
  print(f"Wrote {_OUTPUT_DIR.value}/{written}")


def run() -> None:
  logs.run(main, __name__)


if __name__ == "__main__":
  run()
