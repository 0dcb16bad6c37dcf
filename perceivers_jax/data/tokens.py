"""MIDI <-> token ids (README "Tokens"), built on note-seq's Performance encoding.

MIDI -> NoteSequence -> sustain folded into durations -> drums dropped, instruments
merged -> absolute quantisation at 100 steps/s -> `note_seq.Performance` (32 velocity
bins, shifts up to 100 steps) -> `PerformanceOneHotEncoding` ids + 3 reserved ids.

| ids      | meaning                      |
|----------|------------------------------|
| 0        | PAD (never a target)         |
| 1        | EOS                          |
| 2        | SOS                          |
| 3..130   | NOTE_ON pitch 0..127         |
| 131..258 | NOTE_OFF pitch 0..127        |
| 259..358 | TIME_SHIFT 1..100 steps      |
| 359..390 | VELOCITY bin 1..32           |
"""

import collections
import os
import warnings

import numpy as np

with warnings.catch_warnings():
  # note_seq imports pydub for audio, which warns about ffmpeg and audioop; we never
  # touch audio.
  warnings.simplefilter("ignore", RuntimeWarning)
  warnings.simplefilter("ignore", DeprecationWarning)
  import note_seq
  from note_seq import performance_encoder_decoder
  from note_seq import performance_lib

from perceivers_jax import config_base

PAD_ID = 0
EOS_ID = 1
SOS_ID = 2
NUM_RESERVED_IDS = 3
STEPS_PER_SECOND = 100
NUM_VELOCITY_BINS = 32
MAX_SHIFT_STEPS = 100
NUM_PITCHES = 128

NOTE_ON_START = NUM_RESERVED_IDS
NOTE_OFF_START = NOTE_ON_START + NUM_PITCHES
TIME_SHIFT_START = NOTE_OFF_START + NUM_PITCHES  # id of a 1-step shift
VELOCITY_START = TIME_SHIFT_START + MAX_SHIFT_STEPS  # id of velocity bin 1
VOCAB_SIZE = VELOCITY_START + NUM_VELOCITY_BINS  # 391

PathLike = str | os.PathLike

# A NOTE_ON whose NOTE_OFF never comes (common in samples) would otherwise sound until the
# piece ends. Capped at 10 s: in the 10 real MAESTRO pieces (sustain folded in, 101,901
# notes) 99.9% of notes are shorter (99th percentile 3.7 s, 99.9th 9.4 s, longest 38 s), so a
# hanging note never outlasts all but the longest 0.1% of real notes. Notes that do end
# (every note of an encoded MIDI file) are never shortened.
DEFAULT_MAX_NOTE_SECONDS = 10.0

_ENCODING = performance_encoder_decoder.PerformanceOneHotEncoding(
    num_velocity_bins=NUM_VELOCITY_BINS, max_shift_steps=MAX_SHIFT_STEPS)
assert _ENCODING.num_classes + NUM_RESERVED_IDS == VOCAB_SIZE


class MidiError(config_base.InputError, ValueError):
  """A MIDI file that cannot be tokenised (unreadable, empty or drum-only)."""


def load_note_sequence(path: PathLike) -> note_seq.NoteSequence:
  """Reads a MIDI file into one unquantised piano NoteSequence.

  Sustain pedal is folded into note durations, drum notes are dropped and all other
  instruments are merged into instrument 0, program 0 (acoustic grand piano).

  Raises:
    MidiError: naming the file, if it cannot be parsed or holds no non-drum notes.
  """
  path = os.fspath(path)
  try:
    ns = note_seq.midi_file_to_note_sequence(path)
  except Exception as e:  # pretty_midi/mido raise many types on corrupt files.
    raise MidiError(f"{path}: not a readable MIDI file ({type(e).__name__}: {e})") from e
  ns = note_seq.apply_sustain_control_changes(ns)
  num_drum_notes = sum(note.is_drum for note in ns.notes)
  piano = note_seq.NoteSequence(ticks_per_quarter=ns.ticks_per_quarter)
  for note in ns.notes:
    if note.is_drum:
      continue
    piano.notes.add(
        pitch=note.pitch, velocity=min(max(note.velocity, 1), 127),
        start_time=note.start_time, end_time=note.end_time, instrument=0, program=0)
    piano.total_time = max(piano.total_time, note.end_time)
  if not piano.notes:
    reason = (f"only drum notes ({num_drum_notes}); drum tracks are dropped"
              if num_drum_notes else "no notes")
    raise MidiError(f"{path}: {reason}; nothing to tokenise")
  return piano


def quantize(ns: note_seq.NoteSequence) -> note_seq.NoteSequence:
  """Absolute quantisation at 100 steps/s, made encodable as one piano stream.

  A key cannot sound twice: a note of the same pitch that starts while an earlier one
  sounds ends the earlier one (merged instruments can overlap); of two same-pitch notes
  starting on the same step only the longer is kept. Without this the Performance
  decoder would pair NOTE_OFFs with the wrong NOTE_ONs.
  """
  quantized = note_seq.quantize_note_sequence_absolute(ns, STEPS_PER_SECOND)
  notes = sorted(quantized.notes,
                 key=lambda n: (n.pitch, n.quantized_start_step, n.quantized_end_step))
  kept = []
  for note in notes:
    prev = kept[-1] if kept and kept[-1].pitch == note.pitch else None
    if prev is not None and prev.quantized_start_step == note.quantized_start_step:
      kept[-1] = note
    else:
      if prev is not None and prev.quantized_end_step > note.quantized_start_step:
        prev.quantized_end_step = note.quantized_start_step
        prev.end_time = note.quantized_start_step / STEPS_PER_SECOND
      kept.append(note)
  kept.sort(key=lambda n: (n.quantized_start_step, n.pitch))
  del quantized.notes[:]
  quantized.notes.extend(kept)
  return quantized


def quantized_notes(ns: note_seq.NoteSequence) -> np.ndarray:
  """The notes as tokens encode them: int32 [num_notes, 4] rows sorted lexicographically.

  Columns: onset step, offset step (10 ms steps), pitch, velocity bin (1..32).
  """
  rows = [(n.quantized_start_step, n.quantized_end_step, n.pitch,
           performance_lib.velocity_to_bin(n.velocity, NUM_VELOCITY_BINS))
          for n in quantize(ns).notes]
  rows_K4 = np.array(sorted(rows), dtype=np.int32).reshape(-1, 4)
  return rows_K4


def note_sequence_to_tokens(ns: note_seq.NoteSequence) -> np.ndarray:
  """Unquantised NoteSequence -> int32 ids [SOS, events..., EOS]."""
  performance = note_seq.Performance(
      quantize(ns), num_velocity_bins=NUM_VELOCITY_BINS, max_shift_steps=MAX_SHIFT_STEPS)
  ids = [SOS_ID]
  ids.extend(_ENCODING.encode_event(event) + NUM_RESERVED_IDS for event in performance)
  ids.append(EOS_ID)
  return np.asarray(ids, dtype=np.int32)


def midi_file_to_tokens(path: PathLike) -> np.ndarray:
  """MIDI file -> int32 ids [SOS, events..., EOS]; raises MidiError on a bad file."""
  ns = load_note_sequence(path)
  try:
    return note_sequence_to_tokens(ns)
  except Exception as e:
    raise MidiError(f"{os.fspath(path)}: cannot be quantised ({type(e).__name__}: {e})") from e


def _event_ids(tokens: np.ndarray) -> np.ndarray:
  """Event ids of a token sequence: PAD and SOS skipped, cut at the first EOS."""
  tokens = np.asarray(tokens).reshape(-1)
  eos = np.flatnonzero(tokens == EOS_ID)
  if eos.size:
    tokens = tokens[:eos[0]]
  events = tokens[(tokens != PAD_ID) & (tokens != SOS_ID)]
  bad = events[(events < NUM_RESERVED_IDS) | (events >= VOCAB_SIZE)]
  if bad.size:
    raise ValueError(f"token ids must lie in [0, {VOCAB_SIZE}); got {bad[:5].tolist()}")
  return events


def _hanging_notes(events: np.ndarray) -> collections.Counter:
  """(pitch, onset step) of each NOTE_ON left without a NOTE_OFF, as note-seq pairs them.

  `Performance.to_sequence` ends a pitch's sounding notes first in, first out and ends
  the leftovers at the last step.
  """
  open_onsets = collections.defaultdict(collections.deque)
  step = 0
  for event in events.tolist():
    if NOTE_ON_START <= event < NOTE_OFF_START:
      open_onsets[event - NOTE_ON_START].append(step)
    elif NOTE_OFF_START <= event < TIME_SHIFT_START:
      if open_onsets[event - NOTE_OFF_START]:
        open_onsets[event - NOTE_OFF_START].popleft()
    elif TIME_SHIFT_START <= event < VELOCITY_START:
      step += event - TIME_SHIFT_START + 1
  return collections.Counter((pitch, onset) for pitch, onsets in open_onsets.items()
                             for onset in onsets)


def tokens_to_note_sequence(
    tokens: np.ndarray,
    max_note_seconds: float = DEFAULT_MAX_NOTE_SECONDS) -> note_seq.NoteSequence:
  """Token ids -> NoteSequence (PAD/SOS skipped, stops at EOS); notes unquantised.

  A note without a NOTE_OFF lasts at most `max_note_seconds` (0: until the last event, as
  note-seq leaves it). note-seq's own `max_note_duration` would also cut notes that do end.
  """
  if max_note_seconds < 0:
    raise ValueError(f"max_note_seconds must be >= 0 (0 = no cap), got {max_note_seconds}")
  events = _event_ids(tokens)
  performance = note_seq.Performance(
      steps_per_second=STEPS_PER_SECOND, num_velocity_bins=NUM_VELOCITY_BINS,
      max_shift_steps=MAX_SHIFT_STEPS)
  for token in events:
    performance.append(_ENCODING.decode_event(int(token) - NUM_RESERVED_IDS))
  ns = performance.to_sequence(instrument=0, program=0)
  hanging = _hanging_notes(events) if max_note_seconds else collections.Counter()
  end_time = performance.num_steps / STEPS_PER_SECOND
  for note in ns.notes:
    key = (note.pitch, round(note.start_time * STEPS_PER_SECOND))
    # A hanging note ends at the last step (of two identical notes there, one ended by its
    # NOTE_OFF, either may be cut).
    if hanging[key] and abs(note.end_time - end_time) < 0.5 / STEPS_PER_SECOND:
      hanging[key] -= 1
      note.end_time = min(note.end_time, note.start_time + max_note_seconds)
  ns.total_time = max((note.end_time for note in ns.notes), default=0.0)
  return ns


def tokens_to_midi_file(tokens: np.ndarray, path: PathLike,
                        max_note_seconds: float = DEFAULT_MAX_NOTE_SECONDS
                        ) -> note_seq.NoteSequence:
  """Writes token ids as a one-track piano MIDI file; returns the decoded sequence."""
  ns = tokens_to_note_sequence(tokens, max_note_seconds)
  note_seq.sequence_proto_to_midi_file(ns, os.fspath(path))
  return ns


def tokens_duration_seconds(tokens: np.ndarray) -> float:
  """Music time covered by a token sequence: the sum of its time shifts, in seconds."""
  events = _event_ids(tokens)
  shifts = events[(events >= TIME_SHIFT_START) & (events < VELOCITY_START)]
  return float(np.sum(shifts - TIME_SHIFT_START + 1)) / STEPS_PER_SECOND


def opening(tokens: np.ndarray, seconds: float) -> np.ndarray:
  """The tokens of a piece's first `seconds` of music: everything before the time shift that
  would pass `seconds` (cut at EOS; notes still sounding there end at the cut)."""
  tokens = np.asarray(tokens).reshape(-1)
  eos = np.flatnonzero(tokens == EOS_ID)
  if eos.size:
    tokens = tokens[:eos[0]]
  is_shift = (tokens >= TIME_SHIFT_START) & (tokens < VELOCITY_START)
  elapsed = np.cumsum(np.where(is_shift, tokens - TIME_SHIFT_START + 1, 0))
  return tokens[elapsed <= round(seconds * STEPS_PER_SECOND)]
