"""Augmentation against note-seq's transpose/stretch on real MAESTRO pieces."""

import hypothesis
from hypothesis import strategies as st
import ml_collections
import note_seq
from note_seq import sequences_lib
import numpy as np
import pytest

from perceivers_jax.data import augmentation
from perceivers_jax.data import tokens

ON, OFF = tokens.NOTE_ON_START, tokens.NOTE_OFF_START
SHIFT, VEL = tokens.TIME_SHIFT_START, tokens.VELOCITY_START


@pytest.fixture(scope="module")
def pieces(maestro_paths):
  """The first 3,000 events of 3 real pieces, as [SOS, ..., EOS]."""
  return [np.append(tokens.midi_file_to_tokens(path)[:3000], tokens.EOS_ID).astype(np.int32)
          for path in maestro_paths[:3]]


def _notes(ids):
  """[onset step, offset step, pitch, velocity bin] rows of what `ids` decode to."""
  return tokens.quantized_notes(tokens.tokens_to_note_sequence(ids))


def _pitches(ids):
  return (ids[(ids >= ON) & (ids < SHIFT)] - ON) % 128


def _specials(ids):
  return ids[ids < ON]


def _check_ids(ids):
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert ids.min() >= 0 and ids.max() < tokens.VOCAB_SIZE


def _piece(*events):
  """[SOS, events..., EOS]; an int event is a raw id, ("t", n) a shift of n steps."""
  ids = [tokens.SOS_ID]
  for e in events:
    if isinstance(e, tuple):
      ids.extend([SHIFT + 99] * (e[1] // 100) + ([SHIFT + e[1] % 100 - 1] if e[1] % 100 else []))
    else:
      ids.append(e)
  return np.array(ids + [tokens.EOS_ID], np.int32)


@pytest.mark.parametrize("semitones", [-5, 4, 12])
def test_transpose_matches_note_seq(pieces, semitones):
  for ids in pieces:
    low, high = augmentation.transpose_bounds(ids)
    assert low <= semitones <= high  # real piano pieces leave room for these shifts
    out = augmentation.transpose(ids, semitones)
    _check_ids(out)
    np.testing.assert_array_equal(out[ids >= SHIFT], ids[ids >= SHIFT])
    expected, deleted = sequences_lib.transpose_note_sequence(
        tokens.tokens_to_note_sequence(ids), semitones)
    assert deleted == 0
    np.testing.assert_array_equal(_notes(out), tokens.quantized_notes(expected))


@pytest.mark.parametrize("semitones", [127, -127, 60, -60])
def test_transpose_out_of_range_shifts_less(pieces, semitones):
  for ids in pieces:
    low, high = augmentation.transpose_bounds(ids)
    applied = high if semitones > 0 else low
    assert abs(applied) < abs(semitones)
    out = augmentation.transpose(ids, semitones)
    _check_ids(out)
    assert _pitches(out).max() == 127 if semitones > 0 else _pitches(out).min() == 0
    expected, deleted = sequences_lib.transpose_note_sequence(
        tokens.tokens_to_note_sequence(ids), applied)
    assert deleted == 0
    np.testing.assert_array_equal(_notes(out), tokens.quantized_notes(expected))


def test_transpose_clips_a_built_sequence():
  ids = _piece(VEL + 9, ON + 120, ON + 100, ("t", 10), OFF + 120, OFF + 100)
  assert augmentation.transpose_bounds(ids) == (-100, 7)
  out = augmentation.transpose(ids, 20)
  np.testing.assert_array_equal(_pitches(out), [127, 107, 127, 107])
  np.testing.assert_array_equal(augmentation.transpose(ids, -101),
                                augmentation.transpose(ids, -100))


@pytest.mark.parametrize("factor", [0.9, 0.95, 1.05, 1.25])
def test_stretch_matches_note_seq_exactly(pieces, factor):
  # Tolerance: none. Onset, offset, pitch and velocity bin of every note equal those of
  # stretch_note_sequence + absolute quantisation of the decoded original.
  for ids in pieces:
    out = augmentation.stretch(ids, factor)
    _check_ids(out)
    expected = sequences_lib.stretch_note_sequence(tokens.tokens_to_note_sequence(ids), factor)
    np.testing.assert_array_equal(_notes(out), tokens.quantized_notes(expected))
    np.testing.assert_array_equal(_specials(out), _specials(ids))
    seconds = tokens.tokens_duration_seconds(ids) * factor
    assert abs(tokens.tokens_duration_seconds(out) - seconds) <= 0.005 + 1e-9


def test_stretch_emits_canonical_time_shifts():
  ids = _piece(VEL + 9, ON + 60, ("t", 150), OFF + 60, ("t", 40), ON + 62, ("t", 60), OFF + 62)
  out = augmentation.stretch(ids, 2.0)
  expected = _piece(VEL + 9, ON + 60, ("t", 300), OFF + 60, ("t", 80), ON + 62, ("t", 120),
                    OFF + 62)
  np.testing.assert_array_equal(out, expected)


def test_stretch_merged_step_puts_note_offs_first():
  # 0.5x merges steps 11 and 12; the encoder emits a step's NOTE_OFFs before its NOTE_ONs.
  ids = _piece(VEL + 9, ON + 62, ("t", 11), ON + 60, ("t", 1), OFF + 62, ("t", 8), OFF + 60)
  expected = _piece(VEL + 9, ON + 62, ("t", 6), OFF + 62, ON + 60, ("t", 4), OFF + 60)
  np.testing.assert_array_equal(augmentation.stretch(ids, 0.5), expected)


def test_stretch_compressed_zero_length_notes():
  # 0.5x: [11, 12) collapses onto step 6; quantisation would make it [6, 7).
  lone = _piece(VEL + 9, ("t", 11), ON + 60, ("t", 1), OFF + 60, ("t", 10), ON + 62, ("t", 4),
                OFF + 62)
  # Same, but the next C4 starts on step 12 -> 6 too: only the longer note survives.
  overlap = _piece(VEL + 9, ("t", 11), ON + 60, ("t", 1), OFF + 60, ON + 60, ("t", 8), OFF + 60)
  for ids, num_notes in ((lone, 2), (overlap, 1)):
    out = augmentation.stretch(ids, 0.5)
    expected = tokens.quantized_notes(
        sequences_lib.stretch_note_sequence(tokens.tokens_to_note_sequence(ids), 0.5))
    assert len(expected) == num_notes
    np.testing.assert_array_equal(_notes(out), expected)
    assert np.count_nonzero((out >= ON) & (out < OFF)) == num_notes  # no dead note tokens
  np.testing.assert_array_equal(_notes(augmentation.stretch(lone, 0.5))[0], [6, 7, 60, 10])


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    notes=st.lists(st.tuples(st.integers(0, 300), st.integers(1, 4), st.integers(60, 62),
                             st.integers(1, 127)), min_size=1, max_size=30),
    factor=st.floats(0.3, 3.0))
def test_stretch_matches_note_seq_on_dense_built_pieces(notes, factor):
  # Short notes on three pitches: compression collapses and merges steps often.
  ns = note_seq.NoteSequence()
  for start, duration, pitch, velocity in notes:
    ns.notes.add(pitch=pitch, velocity=velocity, start_time=start / 100,
                 end_time=(start + duration) / 100)
  ids = tokens.note_sequence_to_tokens(ns)
  out = augmentation.stretch(ids, factor)
  _check_ids(out)
  expected = sequences_lib.stretch_note_sequence(tokens.tokens_to_note_sequence(ids), factor)
  np.testing.assert_array_equal(_notes(out), tokens.quantized_notes(expected))


@pytest.mark.parametrize("bins", [3, -3, 40, -40])
def test_shift_velocity_clips(pieces, bins):
  for ids in pieces:
    out = augmentation.shift_velocity(ids, bins)
    _check_ids(out)
    expected = _notes(ids)
    expected[:, 3] = np.clip(expected[:, 3] + bins, 1, 32)
    np.testing.assert_array_equal(_notes(out), expected)
    velocities = out[out >= VEL]
    assert np.all(velocities[1:] != velocities[:-1])  # no token that changes nothing
  loudest = augmentation.shift_velocity(pieces[0], 40)
  np.testing.assert_array_equal(loudest[loudest >= VEL], [VEL + 31])


def test_shift_velocity_drops_tokens_made_redundant():
  ids = _piece(VEL + 30, ON + 60, ("t", 5), VEL + 31, ON + 61, ("t", 5), OFF + 60, OFF + 61)
  out = augmentation.shift_velocity(ids, 3)
  np.testing.assert_array_equal(out[out >= VEL], [VEL + 31])
  np.testing.assert_array_equal(_notes(out)[:, 3], [32, 32])


def test_specials_untouched():
  body = _piece(VEL + 9, ON + 60, ("t", 30), OFF + 60, ("t", 5))
  ids = np.concatenate([[tokens.PAD_ID] * 2, body, [tokens.PAD_ID] * 3]).astype(np.int32)
  for out in (augmentation.transpose(ids, 5), augmentation.shift_velocity(ids, -4)):
    np.testing.assert_array_equal(out < ON, ids < ON)
    np.testing.assert_array_equal(out[ids < ON], ids[ids < ON])
  out = augmentation.stretch(ids, 1.5)
  np.testing.assert_array_equal(out[:3], ids[:3])
  np.testing.assert_array_equal(out[-4:], ids[-4:])  # trailing shift stays before EOS
  assert tokens.tokens_duration_seconds(out) == pytest.approx(0.53)


def _config(**kwargs):
  fields = dict(transpose_range=3, stretch_range=(0.95, 1.05), velocity_shift_range=2)
  fields.update(kwargs)
  return ml_collections.ConfigDict(fields)


def test_augment_same_seed_same_result_different_seeds_differ(pieces):
  ids, config = pieces[0], _config()
  outs = [augmentation.augment(ids, np.random.default_rng([7, 0, seed]), config)
          for seed in range(6)]
  np.testing.assert_array_equal(
      augmentation.augment(ids, np.random.default_rng([7, 0, 0]), config), outs[0])
  assert len({o.tobytes() for o in outs}) == len(outs)
  params = augmentation.sample_params(np.random.default_rng([7, 0, 0]), config)
  np.testing.assert_array_equal(augmentation.apply(ids, params), outs[0])
  assert -3 <= params.semitones <= 3 and 0.95 <= params.stretch <= 1.05
  assert -2 <= params.velocity_shift <= 2
  for out in outs:
    _check_ids(out)
    np.testing.assert_array_equal(_specials(out), _specials(ids))


def test_augment_off_is_identity_and_draws_nothing(pieces):
  rng = np.random.default_rng(3)
  state = rng.bit_generator.state
  config = _config(transpose_range=0, stretch_range=(1.0, 1.0), velocity_shift_range=0)
  np.testing.assert_array_equal(augmentation.augment(pieces[0], rng, config), pieces[0])
  assert rng.bit_generator.state == state


@pytest.mark.parametrize("field, value", [
    ("transpose_range", -1), ("transpose_range", 1.5), ("velocity_shift_range", 40),
    ("stretch_range", (1.05, 0.95)), ("stretch_range", (0.0, 1.0)), ("stretch_range", 1.0)])
def test_bad_config_names_the_field(field, value):
  with pytest.raises(ValueError, match=f"config.data.augmentation.{field}"):
    augmentation.augment(_piece(), np.random.default_rng(0), _config(**{field: value}))


def test_missing_config_field():
  with pytest.raises(ValueError, match="stretch_range is missing"):
    augmentation.check_config({"transpose_range": 0, "velocity_shift_range": 0})


@pytest.mark.parametrize("bad", [np.zeros((2, 3), np.int32), np.array([2, 391, 1]),
                                 np.array([2.0, 5.0])])
def test_bad_tokens_raise(bad):
  with pytest.raises(ValueError, match="tokens|token ids"):
    augmentation.stretch(bad, 1.1)
