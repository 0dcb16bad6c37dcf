"""Fetches the 10 real MAESTRO performances used by the tests and the demo.

They ship inside the source archive of the PyPI package miditok==3.1.0
(tests/MIDIs_one_track/Maestro_{1..10}.mid), so a machine that reaches only the
package registries can get them. MAESTRO is CC BY-NC-SA 4.0: they go to an ignored
cache folder and are never committed.

  python -m data_prep.fetch_maestro_samples [--dest .cache/maestro_samples]
"""

import argparse
import pathlib
import subprocess
import sys
import tarfile
import tempfile

MIDITOK_VERSION = "3.1.0"
NUM_PIECES = 10
# Relative to the working directory (the checkout for `make`, the tests and the benchmarks), so
# an installed package never writes beside its own modules.
DEFAULT_DEST = pathlib.Path(".cache", "maestro_samples")


def sample_paths(dest: pathlib.Path = DEFAULT_DEST) -> list[pathlib.Path]:
  return [dest / f"Maestro_{i}.mid" for i in range(1, NUM_PIECES + 1)]


def fetch(dest: pathlib.Path = DEFAULT_DEST) -> list[pathlib.Path]:
  """Downloads and extracts the pieces unless all of them are already in `dest`."""
  paths = sample_paths(dest)
  if all(p.exists() for p in paths):
    return paths
  dest.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
         "miditok", f"miditok=={MIDITOK_VERSION}", "-d", tmp],
        check=True)
    archive = next(pathlib.Path(tmp).glob("miditok-*.tar.gz"))
    with tarfile.open(archive) as tar:
      for member in tar.getmembers():
        name = pathlib.PurePosixPath(member.name)
        if name.parent.name == "MIDIs_one_track" and name.name.startswith("Maestro_"):
          member.name = name.name
          tar.extract(member, dest, filter="data")
  missing = [str(p) for p in paths if not p.exists()]
  if missing:
    raise RuntimeError(f"miditok=={MIDITOK_VERSION} sdist lacked {missing}")
  return paths


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dest", type=pathlib.Path, default=DEFAULT_DEST)
  args = parser.parse_args()
  paths = fetch(args.dest)
  print(f"{len(paths)} MAESTRO pieces in {args.dest}")


if __name__ == "__main__":
  main()
