"""Builds the `maestro_performance` TFDS dataset (ArrayRecord; no TensorFlow, no Beam).

  perceivers-build-data --manual_dir=~/maestro-v3.0.0 --data_dir=~/tensorflow_datasets
  perceivers-build-data --manual_dir=~/my_midis --layout=folder --config=windows_L32768_N1024

MAESTRO v3.0.0: https://magenta.tensorflow.org/datasets/maestro (maestro-v3.0.0-midi.zip).
"""

import json
import os
import sys

from absl import app
from absl import flags

from data_prep import maestro_performance
from perceivers_jax.cli import logs

_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "MAESTRO v3.0.0 folder (holding maestro-v3.0.0.csv) or, with "
    "--layout=folder, any folder of MIDI files (searched recursively).", required=True)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data_dir to write to (default ~/tensorflow_datasets).")
_LAYOUT = flags.DEFINE_enum("layout", "maestro_v3", ["maestro_v3", "folder"],
                            "maestro_v3: splits from the CSV; folder: 80/10/10 by path hash.")
_CONFIG = flags.DEFINE_string(
    "config", "full", "full (one example per piece) or windows_L<L>_N<N> (sequential "
    "effective windows, e.g. windows_L32768_N1024); a folder_ prefix implies --layout=folder.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", os.cpu_count() or 1,
                                    "Processes tokenising MIDI files in parallel.")


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
  config = _CONFIG.value
  if _LAYOUT.value == "folder" and not config.startswith("folder_"):
    config = f"folder_{config}"
  try:
    builder, report = maestro_performance.build(
        os.path.expanduser(_MANUAL_DIR.value),
        os.path.expanduser(_DATA_DIR.value or "~/tensorflow_datasets"),
        config, num_workers=_NUM_WORKERS.value)
  except (maestro_performance.LayoutError, ValueError) as e:
    sys.exit(f"error: {e}")
  if report:
    print(summary(report, str(builder.data_dir)))
    print(f"report: {os.path.join(builder.data_dir, 'build_report.json')}")
  else:
    print(json.dumps({"data_dir": str(builder.data_dir), "note": "already built"}))


def run() -> None:
  logs.show_flags_in_help(__name__)
  app.run(main)


if __name__ == "__main__":
  run()
