"""TFDS builder `maestro_performance`: MAESTRO (or any MIDI folder) as performance tokens.

Configs: `full` (MAESTRO v3 layout) and `folder_full` (any folder of MIDI files): one
example per piece (tokens, piece_id, composer, title, year, duration, filename,
num_tokens). Training and evaluation cut their windows on the fly from these
(data/input_pipeline.py), so no pre-cut window config exists: it would store every token
about L/N times over (32x at the paper's L=32,768, N=1,024).

Built without TensorFlow or Beam (`perceivers-build-data` or `build()` below):

  builder = Builder(config="full", data_dir=DATA_DIR)
  builder.download_and_prepare(file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=MAESTRO_DIR))

Pieces are tokenised in worker processes (workers.py); unreadable, empty, drum-only and
over-cap files, and files whose worker died, are skipped and listed in `build_report.json`
beside the dataset files. The report also records a sha256 of every input file and the
caps, so that `build()` notices a changed input folder.
"""

import csv
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from data_prep.maestro_performance import workers
from perceivers_jax import config_base
from perceivers_jax.data import built_dataset
from perceivers_jax.data import tokens as tokens_lib

MAESTRO_CSV = "maestro-v3.0.0.csv"
MAESTRO_COLUMNS = ("canonical_composer", "canonical_title", "split", "year",
                   "midi_filename", "audio_filename", "duration")
MAESTRO_URL = "https://magenta.tensorflow.org/datasets/maestro"
SPLITS = ("train", "validation", "test")
MIDI_SUFFIXES = (".mid", ".midi")
# Folder layout: a piece's split from a hash of its relative path (train/validation/test).
FOLDER_SPLIT_PERCENT = (80, 10, 10)
REPORT_NAME = "build_report.json"


class LayoutError(config_base.InputError, FileNotFoundError):
  """The manual folder is missing or not laid out as the builder config expects."""


class InputsChangedError(config_base.InputError):
  """The manual folder differs from the one an existing build was made from."""


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
  """layout: maestro_v3 | folder."""

  layout: str = "maestro_v3"


def make_config(name: str) -> MaestroPerformanceConfig:
  """Config from its name: full or folder_full."""
  if name not in built_dataset.CONFIG_NAMES:
    raise ValueError(f"unknown config {name!r}: expected one of {built_dataset.CONFIG_NAMES} "
                     "(windows are cut on the fly from full, so there are no windows_* configs)")
  layout = "folder" if name.startswith("folder_") else "maestro_v3"
  return MaestroPerformanceConfig(name=name, layout=layout,
                                  description=f"One example per piece ({layout} layout).")


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


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def input_fingerprint(manual_dir: os.PathLike | str, layout: str,
                      limits: workers.Limits) -> dict[str, Any]:
  """What a build depends on: the sha256 of every input file (and of the CSV) and the caps."""
  manual_dir = pathlib.Path(manual_dir)
  files = {p.filename: _sha256(pathlib.Path(p.path)) for p in list_pieces(manual_dir, layout)}
  if layout == "maestro_v3":
    files[MAESTRO_CSV] = _sha256(manual_dir / MAESTRO_CSV)
  return {"files": files, "limits": dataclasses.asdict(limits)}


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
  """"2 added (e.g. a.mid), 1 modified (e.g. b.mid)" between two fingerprints ("" if none)."""
  old_files, new_files = old.get("files", {}), new["files"]
  groups = {
      "added": sorted(set(new_files) - set(old_files)),
      "removed": sorted(set(old_files) - set(new_files)),
      "modified": sorted(f for f in set(old_files) & set(new_files)
                         if old_files[f] != new_files[f])}
  parts = [f"{len(names)} {what} (e.g. {names[0]})" for what, names in groups.items() if names]
  if old.get("limits") != new["limits"]:
    parts.append(f"caps {old.get('limits')} -> {new['limits']}")
  return ", ".join(parts)


def tokenise_pieces(pieces: list[Piece], num_workers: int,
                    limits: workers.Limits = workers.Limits()
                    ) -> tuple[dict[int, np.ndarray], list[dict[str, str]]]:
  """Tokens by piece_id for the good pieces, and [{filename, reason}] for the bad ones."""
  results = workers.tokenise_files([p.path for p in pieces], limits, num_workers)
  good, bad = {}, []
  for piece, (ids, reason) in zip(pieces, results):
    if ids is None:
      bad.append({"filename": piece.filename, "reason": reason})
    else:
      good[piece.piece_id] = ids
  return good, bad


class Builder(tfds.core.GeneratorBasedBuilder):
  """MAESTRO performances as token ids (README "Tokens"), one example per piece."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Performance tokens (vocabulary 391), one example per piece."}
  BUILDER_CONFIGS = [make_config(name) for name in built_dataset.CONFIG_NAMES]
  DEFAULT_CONFIG_NAME = "full"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Download maestro-v3.0.0-midi.zip from {MAESTRO_URL}, unzip it and pass the folder "
      f"holding {MAESTRO_CSV} as the manual dir (perceivers-build-data --manual_dir=...). "
      "folder_full takes any folder of MIDI files instead.")

  def __init__(self, *, num_workers: int | None = None,
               limits: workers.Limits = workers.Limits(), **kwargs):
    self._num_workers = num_workers or os.cpu_count() or 1
    self._limits = limits
    self.report: dict[str, Any] | None = None
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
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
    inputs = input_fingerprint(dl_manager.manual_dir, config.layout, self._limits)
    ids_by_piece, bad = tokenise_pieces(pieces, self._num_workers, self._limits)
    counts = {split: sum(p.split == split and p.piece_id in ids_by_piece for p in pieces)
              for split in SPLITS}
    self.report = {
        "config": config.name, "manual_dir": str(dl_manager.manual_dir),
        "pieces_found": len(pieces), "pieces_built": len(ids_by_piece),
        "pieces_per_split": counts,
        "tokens": int(sum(len(ids) for ids in ids_by_piece.values())),
        "skipped": len(bad), "skipped_files": bad, "inputs": inputs,
    }
    # self.data_dir is the temporary build folder here; TFDS moves it into place.
    (pathlib.Path(self.data_dir) / REPORT_NAME).write_text(json.dumps(self.report, indent=2))
    return {split: self._generate_examples([p for p in pieces if p.split == split],
                                           ids_by_piece)
            for split in SPLITS if counts[split]}

  def _generate_examples(self, pieces: list[Piece], ids_by_piece: dict[int, np.ndarray]
                         ) -> Iterator[tuple[str, dict[str, Any]]]:
    for piece in pieces:
      ids = ids_by_piece.get(piece.piece_id)
      if ids is None:
        continue
      yield piece.filename, {
          "tokens": ids, "num_tokens": len(ids), "piece_id": piece.piece_id,
          "composer": piece.composer, "title": piece.title, "year": piece.year,
          "duration": piece.duration or tokens_lib.tokens_duration_seconds(ids),
          "filename": piece.filename}


def build(manual_dir: os.PathLike | str, data_dir: os.PathLike | str, config: str = "full",
          *, num_workers: int | None = None, limits: workers.Limits = workers.Limits(),
          rebuild: bool = False) -> tuple[Builder, dict[str, Any]]:
  """Builds `maestro_performance/<config>` as ArrayRecord; returns (builder, report).

  An existing build of the same config and version is reused (its report re-read, with
  "reused": True) if its input files and caps are unchanged; if they changed,
  InputsChangedError says how, unless `rebuild`, which replaces the build. Writes
  built_dataset.LENGTHS_FILE beside the records if missing.
  """
  make_config(config)  # names the allowed configs

  def make_builder() -> Builder:
    return Builder(config=config, data_dir=os.fspath(data_dir), num_workers=num_workers,
                   limits=limits)

  builder = make_builder()
  # Fails early with the layout the config expects (TFDS's own message is generic).
  list_pieces(manual_dir, builder.builder_config.layout)
  report_path = pathlib.Path(builder.data_dir) / REPORT_NAME
  reused = builder.is_prepared() and not rebuild
  if reused:
    old = json.loads(report_path.read_text()) if report_path.exists() else {}
    changes = "it records no inputs" if "inputs" not in old else describe_changes(
        old["inputs"], input_fingerprint(manual_dir, builder.builder_config.layout, limits))
    if changes:
      raise InputsChangedError(
          f"{builder.data_dir} was built from other inputs than {manual_dir} now holds "
          f"({changes}): rerun with --rebuild to replace it")
  elif builder.is_prepared():  # rebuild: a builder holding the old DatasetInfo cannot
    shutil.rmtree(builder.data_dir)
    builder = make_builder()
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
  report = json.loads(report_path.read_text()) if report_path.exists() else {}
  _write_lengths(builder, report)
  return builder, {**report, "reused": reused}


def _write_lengths(builder: Builder, report: dict[str, Any]) -> None:
  """Writes built_dataset.LENGTHS_FILE (once): each split's num_tokens in record order, so
  evaluation start-up reads no records. TFDS orders records by a hash of their keys, hence
  one pass over the finished build."""
  path = pathlib.Path(builder.data_dir) / built_dataset.LENGTHS_FILE
  if path.exists():
    return
  lengths = {}
  for split, count in report.get("pieces_per_split", {}).items():
    if count:
      source = builder.as_data_source(split=split)
      lengths[split] = [int(source[i]["num_tokens"]) for i in range(len(source))]
  path.write_text(json.dumps(lengths))
