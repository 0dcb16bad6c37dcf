"""Loading a set of pieces to evaluate: a folder, a built TFDS split, or pieces in memory.

`load_set` gives each readable piece's notes (the Table I features' input) and tokens, and
skips (and lists) unreadable files as the dataset builder does.
"""

from collections.abc import Sequence
import dataclasses
import os
import pathlib
from typing import Any
import warnings

from absl import logging
import numpy as np
import tqdm

with warnings.catch_warnings():
  # note_seq imports pydub for audio, which warns about ffmpeg; we never touch audio.
  warnings.simplefilter("ignore", RuntimeWarning)
  import note_seq

from perceivers_jax import config_base
from perceivers_jax.data import tokens as tokens_lib
from perceivers_jax.evaluation import features as features_lib

TFDS_PREFIX = "tfds:"
# A set: a folder (searched recursively for .mid/.midi/.npy), "tfds:NAME:SPLIT", or a
# sequence of paths, token arrays or NoteSequences.
SetSource = str | os.PathLike | Sequence

class EvaluationError(config_base.InputError, ValueError):
  """A set that cannot be evaluated (missing, empty, not built); the message names it."""


@dataclasses.dataclass
class PieceSet:
  """A loaded set: one entry per piece, and [{filename, reason}] of the unreadable files."""
  name: str
  source: str
  piece_names: list[str]
  notes: list[features_lib.Notes]
  tokens: list[np.ndarray]
  skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)


def _tfds_items(source: str, data_dir: str | None, max_pieces: int | None):
  spec = source[len(TFDS_PREFIX):]
  name, sep, split = spec.rpartition(":")
  if not sep or not name or not split:
    raise EvaluationError(f"{source!r}: expected tfds:NAME:SPLIT, "
                     "e.g. tfds:maestro_performance/full:validation")
  # Imported here: only tfds sources need TFDS and the builder (importing it registers it).
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from data_prep import maestro_performance  # pylint: disable=g-import-not-at-top,unused-import
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():  # evaluation reads a built dataset, it never builds one
    raise EvaluationError(
        f"{source!r}: not built under {builder.data_dir}; build it with `perceivers-build-data "
        "--manual_dir=MAESTRO_DIR --data_dir=DATA_DIR` and pass --data_dir=DATA_DIR")
  try:
    data_source = builder.as_data_source(split=split)
  except (KeyError, ValueError) as e:
    raise EvaluationError(f"{source!r}: cannot open split {split!r} ({e})") from e
  count = len(data_source) if max_pieces is None else min(max_pieces, len(data_source))
  return [(f"{split}[{i}]", np.asarray(data_source[i]["tokens"])) for i in range(count)]


def _folder_items(folder: pathlib.Path, max_pieces: int | None):
  """One item per piece: `x.npy` (the exact tokens) stands for an `x.mid` beside it, as
  `perceivers-sample` writes both."""
  suffixes = features_lib.MIDI_SUFFIXES + features_lib.TOKEN_SUFFIXES
  by_piece = {}
  for p in sorted(folder.rglob("*")):
    if p.is_file() and p.suffix.lower() in suffixes:
      if p.suffix.lower() in features_lib.TOKEN_SUFFIXES or p.with_suffix("") not in by_piece:
        by_piece[p.with_suffix("")] = p
  paths = sorted(by_piece.values())
  if not paths:
    raise EvaluationError(f"{folder}: no {'/'.join(suffixes)} files in this folder; point the "
                     "set at a folder of MIDI files or token arrays")
  return [(str(p.relative_to(folder)), p) for p in paths[:max_pieces]]


def _load_item(piece_name: str, item) -> tuple[features_lib.Notes, np.ndarray]:
  if isinstance(item, (str, os.PathLike)):
    return features_lib.load_piece(item)  # its errors name the file
  if isinstance(item, note_seq.NoteSequence):
    return features_lib.notes_from_sequence(item), tokens_lib.note_sequence_to_tokens(item)
  # Otherwise numpy or jax arrays, or lists of ids.
  return features_lib.notes_from_tokens(np.asarray(item), piece_name)


def find_pieces(name: str, source: SetSource, *, data_dir: str | None = None,
                max_pieces: int | None = None) -> tuple[list[tuple[str, Any]], str]:
  """([(piece name, item to load)], the source's label) of a set, reading no piece: a
  missing, unbuilt or empty source fails here (`load_set`'s arguments)."""
  if isinstance(source, str) and source.startswith(TFDS_PREFIX):
    items, label = _tfds_items(source, data_dir, max_pieces), source
  elif isinstance(source, (str, os.PathLike)):
    folder = pathlib.Path(source)
    if not folder.is_dir():
      raise EvaluationError(f"{folder} ({name} set): not a folder")
    items, label = _folder_items(folder, max_pieces), str(folder)
  else:
    items = [(str(item) if isinstance(item, (str, os.PathLike)) else f"{name}[{i}]", item)
             for i, item in enumerate(list(source)[:max_pieces])]
    label = f"{len(items)} pieces given in memory"
  if not items:
    raise EvaluationError(f"the {name} set ({label}) is empty")
  return items, label


def load_set(name: str, source: SetSource, *, data_dir: str | None = None,
             max_pieces: int | None = None) -> PieceSet:
  """Loads a set's pieces (notes and tokens), with a progress bar.

  Args:
    name: the set's name, for messages and the report.
    source: a folder, "tfds:NAME:SPLIT" (a built TFDS dataset's random-access source;
      records with a `tokens` field), or a sequence of paths, token arrays or
      NoteSequences (taken as they are: sustain already folded, as
      `tokens.load_note_sequence` gives).
    data_dir: TFDS data directory for a tfds source.
    max_pieces: keep only the first pieces (sorted paths, record order).
  """
  items, label = find_pieces(name, source, data_dir=data_dir, max_pieces=max_pieces)
  piece_set = PieceSet(name, label, [], [], [])
  for piece_name, item in tqdm.tqdm(items, desc=f"{name}: loading", unit="piece"):
    try:
      notes, token_ids = _load_item(piece_name, item)
    except (ValueError, OSError, EOFError) as e:
      if not isinstance(item, (str, os.PathLike)):
        raise  # pieces given in memory are the caller's to fix
      # One unreadable file is skipped and reported, as the dataset builder does.
      logging.warning("%s set: skipping %s: %s", name, piece_name, e)
      piece_set.skipped.append({"filename": piece_name, "reason": " ".join(str(e).split())})
      continue
    if not len(notes):
      logging.warning("%s set: %s has no notes; its features are all zero", name, piece_name)
    piece_set.piece_names.append(piece_name)
    piece_set.notes.append(notes)
    piece_set.tokens.append(token_ids)
  if not piece_set.notes:
    raise EvaluationError(f"the {name} set ({label}): none of its {len(items)} files is "
                          f"readable, e.g. {piece_set.skipped[0]['reason']}")
  return piece_set
