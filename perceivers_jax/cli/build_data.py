"""Builds the `maestro_performance` TFDS dataset (ArrayRecord; no TensorFlow, no Beam).

  perceivers-build-data --manual_dir=~/maestro-v3.0.0 --data_dir=~/tensorflow_datasets
  perceivers-build-data --manual_dir=~/my_midis --layout=folder
  perceivers-build-data --manual_dir=~/maestro-v3.0.0 --rebuild   # after the folder changed

A rerun with the same inputs (every file's sha256, the caps) reuses the build; with changed
inputs it stops and names the changes, and --rebuild replaces the build.

MAESTRO v3.0.0: https://magenta.tensorflow.org/datasets/maestro (maestro-v3.0.0-midi.zip).
"""

import os

from absl import app
from absl import flags

from data_prep import maestro_performance
from data_prep.maestro_performance import workers
from perceivers_jax.cli import logs

_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "MAESTRO v3.0.0 folder (holding maestro-v3.0.0.csv) or, with "
    "--layout=folder, any folder of MIDI files (searched recursively).", required=True)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data_dir to write to (default ~/tensorflow_datasets).")
_LAYOUT = flags.DEFINE_enum("layout", "maestro_v3", ["maestro_v3", "folder"],
                            "maestro_v3: splits from the CSV; folder: 80/10/10 by path hash.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", os.cpu_count() or 1,
                                    "Processes tokenising MIDI files in parallel.", lower_bound=1)
_MAX_NOTES = flags.DEFINE_integer(
    "max_notes", workers.DEFAULT_MAX_NOTES, "Skip (and report) a file with more notes "
    "(0: no cap); the default is far above any MAESTRO piece.", lower_bound=0)
_MAX_SECONDS = flags.DEFINE_float(
    "max_seconds", workers.DEFAULT_MAX_SECONDS, "Skip (and report) a file lasting longer "
    "(0: no cap); the default is far above any MAESTRO piece.", lower_bound=0)
_REBUILD = flags.DEFINE_bool(
    "rebuild", False, "Replace an existing build (needed when the inputs changed).")


def summary(report: dict, data_dir: str) -> str:
  """Human-readable lines of a build report."""
  lines = [f"built maestro_performance/{report['config']} in {data_dir}",
           f"pieces: {report['pieces_built']} of {report['pieces_found']} "
           f"({', '.join(f'{k} {v}' for k, v in report['pieces_per_split'].items())}), "
           f"{report['tokens']:,} tokens",
           f"skipped: {report['skipped']}"]
  lines += [f"  {bad['filename']}: {bad['reason']}" for bad in report["skipped_files"]]
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = "folder_full" if _LAYOUT.value == "folder" else "full"
  builder, report = maestro_performance.build(
      os.path.expanduser(_MANUAL_DIR.value),
      os.path.expanduser(_DATA_DIR.value or "~/tensorflow_datasets"), config,
      num_workers=_NUM_WORKERS.value, rebuild=_REBUILD.value,
      limits=workers.Limits(max_notes=_MAX_NOTES.value, max_seconds=_MAX_SECONDS.value))
  if report["reused"]:
    print(f"up to date (inputs unchanged): {builder.data_dir}")
  print(summary(report, str(builder.data_dir)))
  print(f"report: {os.path.join(builder.data_dir, 'build_report.json')}")


def run() -> None:
  logs.run(main, __name__)


if __name__ == "__main__":
  run()
