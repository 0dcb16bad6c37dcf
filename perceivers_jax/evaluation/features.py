"""Per-piece features of the paper's Table I (BUILD section 7; after Yang & Lerch 2018 / mgeval).

Every feature is computed from a piece's decoded notes, in onset order (ties broken by
pitch, so a chord reads bottom-up). Definitions, with the choices that mgeval leaves open
for unquantised performances:

| name    | value                                                                    |
|---------|--------------------------------------------------------------------------|
| PC      | distinct MIDI pitches used (mgeval `total_used_pitch`)                   |
| NC      | number of notes (mgeval `total_used_note`)                               |
| PCH     | 12-bin pitch-class histogram of note counts, sums to 1                   |
| PCTM    | 12x12 pitch-class transitions between consecutive notes, sums to 1       |
| PR      | highest minus lowest pitch, semitones                                    |
| PI      | mean absolute interval between consecutive notes, semitones              |
| IOI     | mean interval between consecutive note onsets, seconds (every note's     |
|         | onset, as pretty_midi's `get_onsets`: chords add zero intervals, so the  |
|         | value is insensitive to the tokens' 10 ms quantisation)                  |
| NLH     | histogram of note-length classes (NOTE_LENGTH_EDGES_S), sums to 1        |
| NLTM    | 12x12 note-length-class transitions between consecutive notes, sums to 1 |
| PC/seg  | [S] PC of the notes starting in each of S equal-duration segments        |
| NC/seg  | [S] notes starting in each segment                                       |
| PCH/seg | [S, 12] PCH per segment (an empty segment gives a zero row)              |
| IOI/seg | [S] IOI per segment; a segment with fewer than two onsets gives 0        |

PC and NC follow mgeval: the paper's text calls PC "distinct pitch classes" and
NC "distinct notes (pitch and octave combinations)", which would make PC at most 12 and
NC what mgeval calls the pitch count. PCTM and NLTM count consecutive notes in onset
order, as PI does (pretty_midi's matrix, which mgeval uses, pairs notes whose end lies
within 50 ms of another's start, which with the pedal folded into durations rarely
happens in a performance). Histograms count notes, not sounding time: mgeval weights PCH
by piano-roll duration, which once the pedal is folded in lets a few held bass notes
dominate. Segments split [0, end of the last note) into S = 64 equal parts; a note
belongs to the segment holding its onset. Lengths are sounding lengths after the sustain
pedal is folded in (`perceivers_jax.data.tokens.load_note_sequence`, exactly as the tokeniser
reads MIDI); a length equal to a class edge falls in the upper class. An empty piece
gives all-zero features.
"""

from collections.abc import Mapping
import dataclasses
import os
import pathlib
import warnings

import numpy as np

with warnings.catch_warnings():
  # note_seq imports pydub for audio, which warns about ffmpeg; we never touch audio.
  warnings.simplefilter("ignore", RuntimeWarning)
  import note_seq

from perceivers_jax.data import tokens as tokens_lib

NUM_SEGMENTS = 64
NUM_PITCH_CLASSES = 12
# Note-length classes for unquantised performances, in seconds: 11 log-spaced edges
# from 1/32 s to 8 s (each class 2**0.8 = 1.74x wider than the previous), giving 12
# classes: class 0 is shorter than 31 ms, class 11 is 8 s or longer.
NOTE_LENGTH_EDGES_S = 2.0 ** np.linspace(-5.0, 3.0, 11)
NUM_LENGTH_CLASSES = NOTE_LENGTH_EDGES_S.size + 1

# Table I's row order.
FEATURE_NAMES = ("PC", "PC/seg", "NC", "NC/seg", "PCH", "PCH/seg", "PCTM", "PR", "PI",
                 "IOI", "IOI/seg", "NLH", "NLTM")
SCALAR_FEATURES = ("PC", "NC", "PR", "PI", "IOI")
MIDI_SUFFIXES = (".mid", ".midi")
TOKEN_SUFFIXES = (".npy",)


@dataclasses.dataclass(frozen=True)
class Notes:
  """A piece's notes in onset order (ties by pitch): float64 seconds, int64 pitches."""
  starts: np.ndarray
  ends: np.ndarray
  pitches: np.ndarray

  def __len__(self) -> int:
    return self.pitches.size

  @property
  def duration(self) -> float:
    """End of the last note, seconds (the piece starts at time 0)."""
    return float(self.ends.max()) if len(self) else 0.0


def notes_from_arrays(starts, ends, pitches) -> Notes:
  """Sorts notes into onset order (ties by pitch) and validates them."""
  starts = np.asarray(starts, np.float64).reshape(-1)
  ends = np.asarray(ends, np.float64).reshape(-1)
  pitches = np.asarray(pitches, np.int64).reshape(-1)
  if not starts.size == ends.size == pitches.size:
    raise ValueError(f"starts, ends and pitches differ in length: "
                     f"{starts.size}, {ends.size}, {pitches.size}")
  order = np.lexsort((pitches, starts))
  return Notes(starts[order], ends[order], pitches[order])


def notes_from_sequence(ns: note_seq.NoteSequence) -> Notes:
  """The non-drum notes of a NoteSequence (its times as they are: sustain already folded)."""
  rows = [(n.start_time, n.end_time, n.pitch) for n in ns.notes if not n.is_drum]
  starts, ends, pitches = (np.array(col) for col in zip(*rows)) if rows else ([], [], [])
  return notes_from_arrays(starts, ends, pitches)


def notes_from_tokens(token_ids: np.ndarray, name: str) -> tuple[Notes, np.ndarray]:
  """(Notes, tokens) of a 1-D integer token array; errors name the piece `name`."""
  if token_ids.ndim != 1 or not np.issubdtype(token_ids.dtype, np.integer):
    raise ValueError(f"{name}: expected a 1-D integer token array, got "
                    f"{token_ids.dtype} {token_ids.shape}")
  try:
    ns = tokens_lib.tokens_to_note_sequence(token_ids)
  except ValueError as e:
    raise ValueError(f"{name}: {e}") from e
  return notes_from_sequence(ns), token_ids


def load_piece(path: str | os.PathLike) -> tuple[Notes, np.ndarray]:
  """Reads a .mid/.midi file (sustain folded in, as the tokeniser does) or a .npy token array.

  Returns:
    The piece's notes and its token ids (MIDI is tokenised with the project tokeniser,
    for the token autocorrelation).
  """
  path = pathlib.Path(path)
  suffix = path.suffix.lower()
  if suffix in MIDI_SUFFIXES:
    ns = tokens_lib.load_note_sequence(path)
    return notes_from_sequence(ns), tokens_lib.note_sequence_to_tokens(ns)
  if suffix in TOKEN_SUFFIXES:
    return notes_from_tokens(np.load(path), str(path))
  raise ValueError(f"{path}: unsupported file type {suffix!r}; expected one of "
                   f"{MIDI_SUFFIXES + TOKEN_SUFFIXES}")


def note_length_classes(lengths_s: np.ndarray) -> np.ndarray:
  """Class 0..11 of each note length (seconds), see NOTE_LENGTH_EDGES_S."""
  return np.searchsorted(NOTE_LENGTH_EDGES_S, lengths_s, side="right")


def _histogram(classes: np.ndarray, num_classes: int) -> np.ndarray:
  counts = np.bincount(classes, minlength=num_classes).astype(np.float64)
  return counts / max(counts.sum(), 1.0)


def _transition_matrix(classes: np.ndarray, num_classes: int) -> np.ndarray:
  pairs = classes[:-1] * num_classes + classes[1:]
  return _histogram(pairs, num_classes * num_classes).reshape(num_classes, num_classes)


def segment_index(notes: Notes, num_segments: int = NUM_SEGMENTS) -> np.ndarray:
  """Segment of each note's onset: [0, duration) split into num_segments equal parts."""
  if not len(notes):
    return np.zeros(0, np.int64)
  scaled = notes.starts / max(notes.duration, 1e-9) * num_segments
  return np.clip(np.floor(scaled).astype(np.int64), 0, num_segments - 1)


def segment_features(notes: Notes, num_segments: int = NUM_SEGMENTS) -> dict[str, np.ndarray]:
  """PC/seg [S], NC/seg [S], PCH/seg [S, 12] and IOI/seg [S] (see the module table)."""
  seg = segment_index(notes, num_segments)
  distinct = np.unique(seg * 128 + notes.pitches)
  pc_seg = np.bincount(distinct // 128, minlength=num_segments).astype(np.float64)
  nc_seg = np.bincount(seg, minlength=num_segments).astype(np.float64)
  pch_counts = np.bincount(seg * NUM_PITCH_CLASSES + notes.pitches % NUM_PITCH_CLASSES,
                           minlength=num_segments * NUM_PITCH_CLASSES)
  pch_seg = pch_counts.reshape(num_segments, NUM_PITCH_CLASSES).astype(np.float64)
  pch_seg /= np.maximum(pch_seg.sum(axis=1, keepdims=True), 1.0)
  # Onsets are sorted, so the mean of consecutive intervals in a segment telescopes to
  # (last onset - first onset) / (onsets - 1).
  first = np.full(num_segments, np.inf)
  last = np.full(num_segments, -np.inf)
  np.minimum.at(first, seg, notes.starts)
  np.maximum.at(last, seg, notes.starts)
  ioi_seg = np.where(nc_seg >= 2, (last - first) / np.maximum(nc_seg - 1, 1), 0.0)
  return {"PC/seg": pc_seg, "NC/seg": nc_seg, "PCH/seg": pch_seg, "IOI/seg": ioi_seg}


def extract_features(notes: Notes, num_segments: int = NUM_SEGMENTS) -> dict[str, np.ndarray]:
  """All FEATURE_NAMES of one piece, as float64 arrays (scalars have shape [])."""
  n = len(notes)
  pitch_classes = notes.pitches % NUM_PITCH_CLASSES
  length_classes = note_length_classes(notes.ends - notes.starts)
  features = {
      "PC": np.unique(notes.pitches).size,
      "NC": n,
      "PCH": _histogram(pitch_classes, NUM_PITCH_CLASSES),
      "PCTM": _transition_matrix(pitch_classes, NUM_PITCH_CLASSES),
      "PR": np.ptp(notes.pitches) if n else 0,
      "PI": np.abs(np.diff(notes.pitches)).mean() if n >= 2 else 0.0,
      "IOI": np.diff(notes.starts).mean() if n >= 2 else 0.0,
      "NLH": _histogram(length_classes, NUM_LENGTH_CLASSES),
      "NLTM": _transition_matrix(length_classes, NUM_LENGTH_CLASSES),
  }
  features.update(segment_features(notes, num_segments))
  return {name: np.asarray(features[name], np.float64) for name in FEATURE_NAMES}


def stack_features(per_piece: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """[{name: value}] of n pieces -> {name: array [n, ...]}."""
  if not per_piece:
    raise ValueError("no pieces to stack")
  return {name: np.stack([f[name] for f in per_piece]) for name in FEATURE_NAMES}
