"""Data augmentation on token arrays: transposition, time stretch, velocity.

Pure numpy, vectorised, applied to a whole piece `[SOS, events..., EOS]` *before* it is
cut into windows: stretching changes the number of TIME_SHIFT tokens, so a piece must be
re-timed as a whole for windows and positions to stay consistent. PAD, SOS and EOS are
never changed, moved across one another or dropped.

- `transpose(tokens, semitones)`: NOTE_ON/NOTE_OFF ids shifted; a shift that would push a
  note outside pitches 0..127 is reduced to the largest one that fits (same direction).
- `stretch(tokens, factor)`: event times scaled by `factor` (> 1: slower) and rounded to
  10 ms steps exactly as note-seq quantises a stretched NoteSequence, then TIME_SHIFTs
  re-emitted as the Performance encoder does (100-step shifts, then the remainder).
- `shift_velocity(tokens, bins)`: VELOCITY bins shifted and clipped to 1..32.
- `augment(tokens, rng, config.data.augmentation)`: draws the three amounts from `rng`
  (one generator per record seed keeps the pipeline deterministic) and applies them.

Config fields (`config.data.augmentation`), all off by default as in the paper:
  transpose_range: int, semitones drawn uniformly from [-r, r] (0: off).
  stretch_range: (low, high), factor drawn uniformly from [low, high] ((1, 1): off).
  velocity_shift_range: int, bins drawn uniformly from [-r, r] (0: off).
"""

from collections.abc import Sequence
import dataclasses
import math
from typing import Any

import numpy as np

from perceivers_jax.data import tokens as tokens_lib

_NOTE_ON = tokens_lib.NOTE_ON_START
_NOTE_OFF = tokens_lib.NOTE_OFF_START
_SHIFT = tokens_lib.TIME_SHIFT_START
_VELOCITY = tokens_lib.VELOCITY_START
_NUM_PITCHES = tokens_lib.NUM_PITCHES
_MAX_SHIFT = tokens_lib.MAX_SHIFT_STEPS
_NUM_BINS = tokens_lib.NUM_VELOCITY_BINS
_SECONDS_PER_STEP = 1.0 / tokens_lib.STEPS_PER_SECOND
_CONFIG_FIELD = "config.data.augmentation"


def _check_tokens(tokens: np.ndarray) -> np.ndarray:
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"tokens must be a 1-D integer array, got shape {tokens.shape} "
                     f"dtype {tokens.dtype}")
  if tokens.size and (tokens.min() < 0 or tokens.max() >= tokens_lib.VOCAB_SIZE):
    raise ValueError(f"token ids must lie in [0, {tokens_lib.VOCAB_SIZE}); got "
                     f"min {tokens.min()}, max {tokens.max()}")
  return tokens.astype(np.int32, copy=False)


def _is_note(tokens: np.ndarray) -> np.ndarray:
  return (tokens >= _NOTE_ON) & (tokens < _SHIFT)


def _is_special(tokens: np.ndarray) -> np.ndarray:
  return tokens < _NOTE_ON  # PAD, EOS, SOS


def transpose_bounds(tokens: np.ndarray) -> tuple[int, int]:
  """(lowest, highest) semitone shift that keeps every note of `tokens` in 0..127."""
  tokens = _check_tokens(tokens)
  pitches = (tokens[_is_note(tokens)] - _NOTE_ON) % _NUM_PITCHES
  if not pitches.size:
    return 0, 0
  return -int(pitches.min()), _NUM_PITCHES - 1 - int(pitches.max())


def transpose(tokens: np.ndarray, semitones: int) -> np.ndarray:
  """Shifts every NOTE_ON/NOTE_OFF by `semitones`, clipped to `transpose_bounds`."""
  tokens = _check_tokens(tokens)
  low, high = transpose_bounds(tokens)
  shift = min(max(int(semitones), low), high)
  return np.where(_is_note(tokens), tokens + shift, tokens).astype(np.int32)


def shift_velocity(tokens: np.ndarray, bins: int) -> np.ndarray:
  """Shifts every VELOCITY bin by `bins`, clipped to 1..32.

  A velocity token that clipping makes equal to the velocity already in force is
  dropped, as the Performance encoder never emits one; the decoded notes are the same.
  """
  tokens = _check_tokens(tokens)
  if bins == 0:
    return tokens.copy()
  is_velocity = tokens >= _VELOCITY
  shifted = np.where(
      is_velocity,
      np.clip(tokens + int(bins), _VELOCITY, _VELOCITY + _NUM_BINS - 1), tokens)
  velocity_pos = np.flatnonzero(is_velocity)
  merged = ((shifted[velocity_pos[1:]] == shifted[velocity_pos[:-1]])
            & (tokens[velocity_pos[1:]] != tokens[velocity_pos[:-1]]))
  keep = np.ones(tokens.shape, bool)
  keep[velocity_pos[1:][merged]] = False
  return shifted[keep].astype(np.int32)


def stretch(tokens: np.ndarray, factor: float) -> np.ndarray:
  """Re-times `tokens` so they decode to the performance stretched by `factor`.

  Matches `note_seq.sequences_lib.stretch_note_sequence` on the decoded notes followed
  by absolute quantisation (`tokens.quantize`), onset and offset steps exactly: event
  times are rounded with the same float arithmetic, a note compressed to zero length
  ends one step later (as quantisation extends it), and a compressed note that would
  then overlap the next note of its pitch starting on the same step is dropped (as
  `tokens.quantize` keeps only the longer). Within a step, NOTE_OFFs come first, as the
  encoder emits them. Assumes each pitch's NOTE_ON/NOTE_OFF alternate, as encoded
  pieces do; otherwise a compressed zero-length note may just decode to nothing.
  """
  tokens = _check_tokens(tokens)
  if not (math.isfinite(factor) and factor > 0):
    raise ValueError(f"stretch factor must be a positive finite number, got {factor}")
  if factor == 1.0:
    return tokens.copy()

  is_shift = (tokens >= _SHIFT) & (tokens < _VELOCITY)
  elapsed = np.cumsum(np.where(is_shift, tokens.astype(np.int64) - _SHIFT + 1, 0))
  event_pos = np.flatnonzero(~is_shift)
  # A trailing PAD-like sentinel carries the time after the last event (trailing shifts).
  events = np.append(tokens[event_pos], tokens_lib.PAD_ID)
  steps = np.append(elapsed[event_pos], elapsed[-1] if tokens.size else 0)
  # Same float operations as decoding (step * seconds_per_step), stretch_note_sequence
  # (* factor) and quantize_to_step (int(seconds * steps_per_second + 0.5)), so rounding
  # ties break the same way.
  seconds = steps * _SECONDS_PER_STEP * factor
  new_steps = np.floor(seconds * tokens_lib.STEPS_PER_SECOND + 0.5).astype(np.int64)

  if factor < 1.0:
    events, new_steps = _fix_compressed_events(events, new_steps)

  # Stable order by (segment, step, NOTE_OFF first): events never cross PAD/SOS/EOS (each
  # closes its segment), and compression may merge steps whose offsets came later.
  special = _is_special(events)
  segment = np.cumsum(special) - special
  not_off = ~((events >= _NOTE_OFF) & (events < _SHIFT))
  key = ((segment * 2 + special) * (new_steps.max() + 1) + new_steps) * 2 + not_off
  order = np.argsort(key, kind="stable")
  events = events[order]
  new_steps = np.maximum.accumulate(new_steps[order])

  delta = np.diff(new_steps, prepend=0)
  num_shifts = -(-delta // _MAX_SHIFT)
  out_pos = np.cumsum(num_shifts + 1) - 1
  out = np.full(out_pos[-1] + 1, _SHIFT + _MAX_SHIFT - 1, np.int32)  # 100-step shifts
  remainder = delta % _MAX_SHIFT
  partial = remainder > 0
  out[out_pos[partial] - 1] = _SHIFT + remainder[partial] - 1
  out[out_pos] = events
  return out[:-1]  # drop the sentinel


def _fix_compressed_events(events: np.ndarray,
                           new_steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Zero-length notes after compression: offset one step later, or dropped on overlap."""
  note_pos = np.flatnonzero(_is_note(events))
  pitch = (events[note_pos] - _NOTE_ON) % _NUM_PITCHES
  # Each pitch's note events in time order, pitches one after another.
  order = np.argsort(pitch, kind="stable")
  by_pitch, pitch = note_pos[order], pitch[order]
  is_on = events[by_pitch] < _NOTE_OFF
  step = new_steps[by_pitch]
  same_pitch = pitch[1:] == pitch[:-1]
  collapsed = same_pitch & is_on[:-1] & ~is_on[1:] & (step[1:] == step[:-1])
  (k,) = np.nonzero(collapsed)  # by_pitch[k]: the NOTE_ON, by_pitch[k + 1]: its NOTE_OFF
  nxt = np.minimum(k + 2, by_pitch.size - 1)
  overlaps = (k + 2 < by_pitch.size) & same_pitch[nxt - 1] & is_on[nxt] & (step[nxt] == step[k])
  new_steps = new_steps.copy()
  new_steps[by_pitch[k + 1]] += 1
  keep = np.ones(events.shape, bool)
  keep[by_pitch[k[overlaps]]] = False
  keep[by_pitch[k[overlaps] + 1]] = False
  return events[keep], new_steps[keep]


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """One draw of the augmentation amounts."""

  semitones: int = 0
  stretch: float = 1.0
  velocity_shift: int = 0


def _field(config: Any, name: str) -> Any:
  try:
    return config[name]  # ConfigDict or dict
  except KeyError:
    raise ValueError(f"{_CONFIG_FIELD}.{name} is missing (fields: transpose_range, "
                     "stretch_range, velocity_shift_range)") from None


def _int_range(config: Any, name: str, limit: int) -> int:
  value = _field(config, name)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= limit:
    raise ValueError(f"{_CONFIG_FIELD}.{name}={value!r}: must be an integer in [0, {limit}] "
                     "(0 turns it off)")
  return int(value)


def check_config(config: Any) -> tuple[int, tuple[float, float], int]:
  """(transpose_range, stretch_range, velocity_shift_range), or ValueError naming the field."""
  transpose_range = _int_range(config, "transpose_range", _NUM_PITCHES - 1)
  velocity_range = _int_range(config, "velocity_shift_range", _NUM_BINS - 1)
  stretch_range = _field(config, "stretch_range")
  if (not isinstance(stretch_range, Sequence) or len(stretch_range) != 2
      or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in stretch_range)
      or not 0 < stretch_range[0] <= stretch_range[1]):
    raise ValueError(f"{_CONFIG_FIELD}.stretch_range={stretch_range!r}: must be (low, high) "
                     "with 0 < low <= high, e.g. (0.95, 1.05); (1.0, 1.0) turns it off")
  return transpose_range, (float(stretch_range[0]), float(stretch_range[1])), velocity_range


def sample_params(rng: np.random.Generator, config: Any) -> AugmentParams:
  """Draws the amounts; only enabled augmentations consume `rng`."""
  transpose_range, (low, high), velocity_range = check_config(config)
  semitones = int(rng.integers(-transpose_range, transpose_range + 1)) if transpose_range else 0
  factor = float(rng.uniform(low, high)) if low < high else low
  velocity_shift = int(rng.integers(-velocity_range, velocity_range + 1)) if velocity_range else 0
  return AugmentParams(semitones=semitones, stretch=factor, velocity_shift=velocity_shift)


def apply(tokens: np.ndarray, params: AugmentParams) -> np.ndarray:
  """Applies transposition, velocity shift and stretch (they commute); none: `tokens` as is."""
  if params == AugmentParams():
    return tokens
  tokens = _check_tokens(tokens)
  if params.semitones:
    tokens = transpose(tokens, params.semitones)
  if params.velocity_shift:
    tokens = shift_velocity(tokens, params.velocity_shift)
  if params.stretch != 1.0:
    tokens = stretch(tokens, params.stretch)
  return tokens


def augment(tokens: np.ndarray, rng: np.random.Generator, config: Any) -> np.ndarray:
  """A piece's tokens randomly augmented, the amounts drawn from `rng` per `config`.

  `config` is `config.data.augmentation` (fields in the module docstring). With every
  augmentation off, `tokens` come back as they are (not copied) and `rng` is not advanced.
  """
  return apply(tokens, sample_params(rng, config))
