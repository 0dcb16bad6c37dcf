"""TFDS builder `maestro_performance`: MAESTRO (or any MIDI folder) as performance tokens.

Configs (the `folder_` ones read any folder of MIDI files instead of MAESTRO v3):
  full / folder_full: one example per piece (tokens, piece_id, composer, title, year,
    duration, filename, num_tokens).
  windows_L<L>_N<N> / folder_windows_L<L>_N<N>: the effective sequential windows of every
    piece (SPEC 2), fixed length L, left-padded, plus piece_id and end offset.

Built without TensorFlow or Beam (`perceivers-build-data` or `build()` below):

  builder = Builder(config="full", data_dir=DATA_DIR)
  builder.download_and_prepare(file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=MAESTRO_DIR))

Pieces are tokenised in parallel processes; unreadable, empty and drum-only files are
skipped and listed in `build_report.json` beside the dataset files.
"""

from collections.abc import Iterator
import concurrent.futures
import csv
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib
import re
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from perceivers_jax.data import tokens as tokens_lib
from perceivers_jax.data import windows

MAESTRO_CSV = "maestro-v3.0.0.csv"
MAESTRO_COLUMNS = ("canonical_composer", "canonical_title", "split", "year",
                   "midi_filename", "audio_filename", "duration")
MAESTRO_URL = "https://magenta.tensorflow.org/datasets/maestro"
SPLITS = ("train", "validation", "test")
MIDI_SUFFIXES = (".mid", ".midi")
# Folder layout: a piece's split from a hash of its relative path (train/validation/test).
FOLDER_SPLIT_PERCENT = (80, 10, 10)
REPORT_NAME = "build_report.json"

_WINDOWS_NAME = re.compile(r"^(folder_)?windows_L(\d+)_N(\d+)$")


class LayoutError(FileNotFoundError):
  """The manual folder is missing or not laid out as the builder config expects."""


@dataclasses.dataclass(frozen=True)
class Piece:
  """One MIDI file to tokenise and where it goes."""

  piece_id: int
  path: str
  filename: str  # relative to the manual dir, POSIX separators
  split: str
  composer: str = ""
  title: str = ""
  year: int = 0
  duration: float = 0.0  # seconds; 0 = take it from the tokens


@dataclasses.dataclass
class MaestroPerformanceConfig(tfds.core.BuilderConfig):
  """layout: maestro_v3 | folder; max_length/num_latents > 0 for a windows config."""

  layout: str = "maestro_v3"
  max_length: int = 0
  num_latents: int = 0

  @property
  def is_windows(self) -> bool:
    return self.max_length > 0


def make_config(name: str) -> MaestroPerformanceConfig:
  """Config from its name: full, folder_full, [folder_]windows_L<L>_N<N>."""
  if name in ("full", "folder_full"):
    layout = "folder" if name.startswith("folder_") else "maestro_v3"
    return MaestroPerformanceConfig(name=name, layout=layout,
                                    description=f"One example per piece ({layout} layout).")
  match = _WINDOWS_NAME.match(name)
  if not match:
    raise ValueError(f"unknown config {name!r}: expected full, folder_full or "
                     "[folder_]windows_L<L>_N<N> (e.g. windows_L32768_N1024)")
  max_length, num_latents = int(match.group(2)), int(match.group(3))
  if not 0 < num_latents <= max_length:
    raise ValueError(f"config {name!r}: need 0 < N <= L")
  layout = "folder" if match.group(1) else "maestro_v3"
  return MaestroPerformanceConfig(
      name=name, layout=layout, max_length=max_length, num_latents=num_latents,
      description=f"Effective sequential windows, L={max_length}, N={num_latents} "
                  f"({layout} layout).")


def _maestro_pieces(manual_dir: pathlib.Path) -> list[Piece]:
  csv_path = manual_dir / MAESTRO_CSV
  if not csv_path.is_file():
    raise LayoutError(
        f"{manual_dir}: expected the MAESTRO v3.0.0 layout ({MAESTRO_CSV} beside the year "
        f"folders of .midi files), but {csv_path.name} is missing. Download "
        f"maestro-v3.0.0-midi.zip from {MAESTRO_URL} and unzip it so that {MAESTRO_CSV} "
        "is directly in the manual dir, or use the folder layout (--layout=folder) for any "
        "folder of MIDI files.")
  with csv_path.open(newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    missing = [c for c in MAESTRO_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
      raise LayoutError(f"{csv_path}: missing columns {missing}; MAESTRO v3.0.0 has "
                        f"{list(MAESTRO_COLUMNS)} ({MAESTRO_URL})")
    rows = list(reader)
  pieces = []
  for i, row in enumerate(rows):
    if row["split"] not in SPLITS:
      raise LayoutError(f"{csv_path}, row {i + 2}: split {row['split']!r} not in {SPLITS}")
    pieces.append(Piece(
        piece_id=i, path=str(manual_dir / row["midi_filename"]),
        filename=row["midi_filename"], split=row["split"],
        composer=row["canonical_composer"], title=row["canonical_title"],
        year=int(row["year"] or 0), duration=float(row["duration"] or 0.0)))
  return pieces


def folder_split(filename: str) -> str:
  """Deterministic split of a relative path: sha256 bucket in FOLDER_SPLIT_PERCENT."""
  bucket = int(hashlib.sha256(filename.encode("utf-8")).hexdigest(), 16) % 100
  train, validation, _ = FOLDER_SPLIT_PERCENT
  if bucket < train:
    return "train"
  return "validation" if bucket < train + validation else "test"


def _folder_pieces(manual_dir: pathlib.Path) -> list[Piece]:
  paths = sorted(p for p in manual_dir.rglob("*")
                 if p.is_file() and p.suffix.lower() in MIDI_SUFFIXES)
  if not paths:
    raise LayoutError(f"{manual_dir}: no MIDI files ({'/'.join(MIDI_SUFFIXES)}) found "
                      "(searched recursively) for the folder layout")
  pieces = []
  for i, path in enumerate(paths):
    filename = path.relative_to(manual_dir).as_posix()
    pieces.append(Piece(piece_id=i, path=str(path), filename=filename,
                        split=folder_split(filename), title=path.stem))
  return pieces


def list_pieces(manual_dir: os.PathLike | str, layout: str) -> list[Piece]:
  """The pieces of a manual dir in `layout` (maestro_v3 | folder), in a stable order."""
  manual_dir = pathlib.Path(manual_dir)
  if not manual_dir.is_dir():
    raise LayoutError(
        f"manual dir {manual_dir} does not exist. Expected MAESTRO v3.0.0 (download "
        f"maestro-v3.0.0-midi.zip from {MAESTRO_URL} and unzip it there) or, with the "
        "folder layout, any folder of MIDI files.")
  if layout == "maestro_v3":
    return _maestro_pieces(manual_dir)
  if layout == "folder":
    return _folder_pieces(manual_dir)
  raise ValueError(f"layout must be maestro_v3 or folder, got {layout!r}")


def _tokenise(path: str) -> tuple[np.ndarray | None, str]:
  """Worker: (tokens, "") or (None, reason)."""
  if not os.path.isfile(path):
    return None, "file listed but missing"
  try:
    return tokens_lib.midi_file_to_tokens(path), ""
  except tokens_lib.MidiError as e:
    return None, str(e)
  except Exception as e:  # pylint: disable=broad-except
    # One odd file must never abort a build of thousands.
    return None, f"{path}: {type(e).__name__}: {e}"


def tokenise_pieces(pieces: list[Piece], num_workers: int
                    ) -> tuple[dict[int, np.ndarray], list[dict[str, str]]]:
  """Tokens by piece_id for the good pieces, and [{filename, reason}] for the bad ones.

  num_workers > 1 uses that many spawned processes (the MIDI parse dominates).
  """
  paths = [p.path for p in pieces]
  progress = dict(total=len(pieces), desc="tokenising", unit="piece")
  if num_workers > 1:
    # spawn, not fork: the caller may have started threads (JAX, Grain).
    with concurrent.futures.ProcessPoolExecutor(
        num_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
      results = list(tqdm.tqdm(pool.map(_tokenise, paths, chunksize=4), **progress))
  else:
    results = [_tokenise(path) for path in tqdm.tqdm(paths, **progress)]
  good, bad = {}, []
  for piece, (ids, reason) in zip(pieces, results):
    if ids is None:
      bad.append({"filename": piece.filename, "reason": reason})
    else:
      good[piece.piece_id] = ids
  return good, bad


class Builder(tfds.core.GeneratorBasedBuilder):
  """MAESTRO performances as SPEC 1 token ids: whole pieces or sequential windows."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Performance tokens (vocabulary 391), full and windows configs."}
  BUILDER_CONFIGS = [make_config(name) for name in (
      "full", "windows_L32768_N1024", "windows_L64_N16",
      "folder_full", "folder_windows_L32768_N1024", "folder_windows_L64_N16")]
  DEFAULT_CONFIG_NAME = "full"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Download maestro-v3.0.0-midi.zip from {MAESTRO_URL}, unzip it and pass the folder "
      f"holding {MAESTRO_CSV} as the manual dir (perceivers-build-data --manual_dir=...). "
      "folder_* configs take any folder of MIDI files instead.")

  def __init__(self, *, num_workers: int | None = None, **kwargs):
    # A config name outside BUILDER_CONFIGS (another L or N) is built from its name.
    config = kwargs.get("config")
    if isinstance(config, str) and config not in self.builder_configs:
      kwargs["config"] = make_config(config)
    self._num_workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    self.report: dict[str, Any] | None = None
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    if config.is_windows:
      window = tfds.features.Tensor(shape=(config.max_length,), dtype=np.int32)
      features = {"inputs": window, "positions": window, "targets": window,
                  "piece_id": tfds.features.Scalar(np.int32),
                  "end": tfds.features.Scalar(np.int32)}
    else:
      features = {"tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                  "num_tokens": tfds.features.Scalar(np.int32),
                  "piece_id": tfds.features.Scalar(np.int32),
                  "composer": tfds.features.Text(),
                  "title": tfds.features.Text(),
                  "year": tfds.features.Scalar(np.int32),
                  "duration": tfds.features.Scalar(np.float32),
                  "filename": tfds.features.Text()}
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(features),
        homepage=MAESTRO_URL,
        description=__doc__)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config
    pieces = list_pieces(dl_manager.manual_dir, config.layout)
    ids_by_piece, bad = tokenise_pieces(pieces, self._num_workers)
    counts = {split: sum(p.split == split and p.piece_id in ids_by_piece for p in pieces)
              for split in SPLITS}
    self.report = {
        "config": config.name, "manual_dir": str(dl_manager.manual_dir),
        "pieces_found": len(pieces), "pieces_built": len(ids_by_piece),
        "pieces_per_split": counts,
        "tokens": int(sum(len(ids) for ids in ids_by_piece.values())),
        "skipped": len(bad), "skipped_files": bad,
    }
    # self.data_dir is the temporary build folder here; TFDS moves it into place.
    (pathlib.Path(self.data_dir) / REPORT_NAME).write_text(json.dumps(self.report, indent=2))
    return {split: self._generate_examples([p for p in pieces if p.split == split],
                                           ids_by_piece)
            for split in SPLITS if counts[split]}

  def _generate_examples(self, pieces: list[Piece], ids_by_piece: dict[int, np.ndarray]
                         ) -> Iterator[tuple[str, dict[str, Any]]]:
    config = self.builder_config
    for piece in pieces:
      ids = ids_by_piece.get(piece.piece_id)
      if ids is None:
        continue
      if not config.is_windows:
        yield piece.filename, {
            "tokens": ids, "num_tokens": len(ids), "piece_id": piece.piece_id,
            "composer": piece.composer, "title": piece.title, "year": piece.year,
            "duration": piece.duration or tokens_lib.tokens_duration_seconds(ids),
            "filename": piece.filename}
        continue
      # Windows are cut lazily, one at a time; TFDS's writer spills to disk as it goes.
      for end, first_target in windows.sequential_ends(len(ids), config.num_latents):
        window = windows.make_window(ids, end, max_length=config.max_length,
                                     num_latents=config.num_latents,
                                     first_target=first_target)
        yield f"{piece.filename}:{end}", {**window, "piece_id": piece.piece_id, "end": end}


def build(manual_dir: os.PathLike | str, data_dir: os.PathLike | str, config: str = "full",
          *, num_workers: int | None = None) -> tuple[Builder, dict[str, Any]]:
  """Builds `maestro_performance/<config>` as ArrayRecord; returns (builder, report).

  An existing build of the same config and version is reused (its report re-read).
  """
  builder = Builder(config=config, data_dir=os.fspath(data_dir), num_workers=num_workers)
  # Fails early with the layout the config expects (TFDS's own message is generic).
  list_pieces(manual_dir, builder.builder_config.layout)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
  report_path = pathlib.Path(builder.data_dir) / REPORT_NAME
  report = json.loads(report_path.read_text()) if report_path.exists() else {}
  return builder, report
