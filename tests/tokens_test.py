"""Tokenisation (README "Tokens") on the real MAESTRO pieces and on MIDI built in code."""

import math

import note_seq
import numpy as np
import pretty_midi
import pytest

from perceivers_jax.cli import tokens as tokens_cli
from perceivers_jax.data import tokens


@pytest.fixture(scope="module")
def encoded(maestro_paths):
  """(path, NoteSequence, tokens) of every real piece, encoded once for the module."""
  out = []
  for path in maestro_paths:
    ns = tokens.load_note_sequence(path)
    out.append((path, ns, tokens.note_sequence_to_tokens(ns)))
  return out


def _expected_note_count(path) -> int:
  """Notes a piece keeps, from note-seq directly and README "Tokens"' rules, not from tokens.py:
  sustain folded in, drums dropped, onsets rounded to 10 ms steps, and one key sounds one
  note at a time, so same-pitch notes with the same onset step are one note."""
  ns = note_seq.apply_sustain_control_changes(note_seq.midi_file_to_note_sequence(str(path)))
  return len({(n.pitch, math.floor(n.start_time * 100 + 0.5)) for n in ns.notes
              if not n.is_drum})


def test_decoded_note_counts_follow_note_seq_and_the_one_key_rule(encoded):
  for path, _, ids in encoded:
    assert len(tokens.tokens_to_note_sequence(ids).notes) == _expected_note_count(path), path


def _write_midi(path, instruments):
  """instruments: list of (program, is_drum, [(pitch, velocity, start_s, end_s)], [cc])."""
  pm = pretty_midi.PrettyMIDI()
  for program, is_drum, notes, ccs in instruments:
    inst = pretty_midi.Instrument(program=program, is_drum=is_drum)
    inst.notes = [pretty_midi.Note(velocity=v, pitch=p, start=s, end=e) for p, v, s, e in notes]
    inst.control_changes = [pretty_midi.ControlChange(number=n, value=v, time=t)
                            for n, v, t in ccs]
    pm.instruments.append(inst)
  pm.write(str(path))
  return path


def test_vocabulary_layout():
  assert (tokens.PAD_ID, tokens.EOS_ID, tokens.SOS_ID) == (0, 1, 2)
  assert (tokens.NOTE_ON_START, tokens.NOTE_OFF_START) == (3, 131)
  assert (tokens.TIME_SHIFT_START, tokens.VELOCITY_START, tokens.VOCAB_SIZE) == (259, 359, 391)
  assert tokens.STEPS_PER_SECOND == 100


def test_real_pieces_round_trip_quantised_notes_exactly(encoded):
  for path, ns, ids in encoded:
    decoded = tokens.tokens_to_note_sequence(ids)
    expected_K4 = tokens.quantized_notes(ns)
    assert len(expected_K4) > 1000, path
    np.testing.assert_array_equal(tokens.quantized_notes(decoded), expected_K4, err_msg=str(path))


def test_real_pieces_token_format(encoded):
  for path, _, ids in encoded:
    assert ids.dtype == np.int32
    assert ids[0] == tokens.SOS_ID and ids[-1] == tokens.EOS_ID, path
    body = ids[1:-1]
    assert body.min() >= tokens.NOTE_ON_START and body.max() < tokens.VOCAB_SIZE, path


def test_real_piece_tokens_per_second(encoded):
  # A 347 s MAESTRO performance (Maestro_1) gives 9,543 event tokens, ~27.5/s.
  _, ns, ids = encoded[0]
  seconds = tokens.tokens_duration_seconds(ids)
  assert seconds == pytest.approx(ns.total_time, abs=0.01)
  assert len(ids) == 9543 + 2
  assert len(ids) / seconds == pytest.approx(27.4, abs=0.2)
  for path, _, ids in encoded:
    # Denser pieces give more; all stay within the range piano performances span.
    assert 20 < len(ids) / tokens.tokens_duration_seconds(ids) < 80, path


def test_second_round_trip_is_fixed_point(encoded):
  for path, _, ids in encoded[:3]:
    once = tokens.note_sequence_to_tokens(tokens.tokens_to_note_sequence(ids))
    twice = tokens.note_sequence_to_tokens(tokens.tokens_to_note_sequence(once))
    np.testing.assert_array_equal(once, twice, err_msg=str(path))
    assert abs(len(once) - len(ids)) < 0.01 * len(ids)  # reordering may merge VELOCITY events


def test_midi_file_round_trip(encoded, tmp_path):
  path, ns, ids = encoded[0]
  out = tmp_path / "decoded.mid"
  tokens.tokens_to_midi_file(ids, out)
  np.testing.assert_array_equal(
      tokens.quantized_notes(tokens.load_note_sequence(out)), tokens.quantized_notes(ns))


def test_decoding_skips_pad_and_sos_and_stops_at_eos():
  on, off, shift = tokens.NOTE_ON_START + 60, tokens.NOTE_OFF_START + 60, tokens.TIME_SHIFT_START
  ids = np.array([0, 0, tokens.SOS_ID, on, shift + 49, off, tokens.EOS_ID, on, shift + 99, off])
  ns = tokens.tokens_to_note_sequence(ids)
  assert [(n.pitch, n.start_time, n.end_time) for n in ns.notes] == [(60, 0.0, 0.5)]
  assert tokens.tokens_duration_seconds(ids) == pytest.approx(0.5)
  with pytest.raises(ValueError, match="391"):
    tokens.tokens_to_note_sequence(np.array([tokens.SOS_ID, 391]))


def test_multi_instrument_merges_and_drums_dropped(tmp_path):
  path = _write_midi(tmp_path / "band.mid", [
      (0, False, [(60, 80, 0.0, 1.0), (64, 100, 0.5, 1.5)], []),
      (40, False, [(67, 40, 0.25, 2.0), (60, 60, 0.5, 0.8)], []),  # same key as piano's 60
      (0, True, [(36, 127, 0.0, 0.1), (42, 127, 0.3, 0.4)], []),
  ])
  ns = tokens.load_note_sequence(path)
  assert {n.instrument for n in ns.notes} == {0} and {n.program for n in ns.notes} == {0}
  assert sorted(n.pitch for n in ns.notes) == [60, 60, 64, 67]
  ids = tokens.midi_file_to_tokens(path)
  bin_of = lambda v: (v - 1) // 4 + 1
  # The second 60 ends the first one (a key sounds once); drums (36, 42) are gone.
  expected = [(0, 50, 60, bin_of(80)), (25, 200, 67, bin_of(40)), (50, 80, 60, bin_of(60)),
              (50, 150, 64, bin_of(100))]
  decoded_K4 = tokens.quantized_notes(tokens.tokens_to_note_sequence(ids))
  assert decoded_K4.tolist() == [list(row) for row in expected]
  np.testing.assert_array_equal(decoded_K4, tokens.quantized_notes(ns))


def test_sustain_pedal_folded_into_durations(tmp_path):
  path = _write_midi(tmp_path / "pedal.mid", [
      (0, False, [(60, 64, 0.0, 0.2)], [(64, 127, 0.1), (64, 0, 1.0)])])
  ns = tokens.load_note_sequence(path)
  assert [(n.start_time, n.end_time) for n in ns.notes] == [(0.0, 1.0)]
  assert not ns.control_changes


@pytest.mark.parametrize("kind,message", [
    ("empty", "no notes"), ("drums", "only drum notes"), ("corrupt", "not a readable MIDI")])
def test_bad_files_raise_midi_error_naming_the_file(tmp_path, kind, message):
  path = tmp_path / f"{kind}.mid"
  if kind == "empty":
    _write_midi(path, [(0, False, [], [])])
  elif kind == "drums":
    _write_midi(path, [(0, True, [(36, 100, 0.0, 0.5)], [])])
  else:
    path.write_bytes(b"MThd\x00\x00\x00\x06garbage")
  with pytest.raises(tokens.MidiError, match=message) as info:
    tokens.midi_file_to_tokens(path)
  assert str(path) in str(info.value)
  assert isinstance(info.value, ValueError)


def test_cli_encode_decode(maestro_paths, tmp_path, capsys):
  npy, mid = tmp_path / "piece.npy", tmp_path / "piece.mid"
  assert tokens_cli.main(["encode", str(maestro_paths[0]), str(npy)]) == 0
  ids = np.load(npy)
  assert ids[0] == tokens.SOS_ID and len(ids) == 9545
  assert tokens_cli.main(["decode", str(npy), str(mid)]) == 0
  assert mid.stat().st_size > 0
  assert f"{_expected_note_count(maestro_paths[0])} notes" in capsys.readouterr().out
  bad = tmp_path / "bad.mid"
  bad.write_bytes(b"not midi")
  assert tokens_cli.main(["encode", str(bad), str(npy)]) == 1
  assert str(bad) in capsys.readouterr().err


def _hanging_tokens() -> np.ndarray:
  """Pitch 60 never ends, 64 ends after 1 s, 50 ends after 21 s, 67 starts at 21 s, never ends."""
  shift_1s = tokens.TIME_SHIFT_START + 99
  return np.array([tokens.SOS_ID, tokens.NOTE_ON_START + 60, tokens.NOTE_ON_START + 64,
                   tokens.NOTE_ON_START + 50, shift_1s, tokens.NOTE_OFF_START + 64,
                   *[shift_1s] * 20, tokens.NOTE_OFF_START + 50, tokens.NOTE_ON_START + 67,
                   tokens.TIME_SHIFT_START + 9, tokens.EOS_ID])


def _ends(ns) -> dict[int, float]:
  return {note.pitch: round(note.end_time, 3) for note in ns.notes}


def test_note_without_note_off_is_capped():
  ids = _hanging_tokens()
  capped = tokens.tokens_to_note_sequence(ids)
  # 60 hangs: cut at the cap; 64 and 50 end (50 after 21 s, longer than the cap, kept);
  # 67 hangs but ends with the piece before reaching the cap.
  assert _ends(capped) == {60: tokens.DEFAULT_MAX_NOTE_SECONDS, 64: 1.0, 50: 21.0, 67: 21.1}
  assert _ends(tokens.tokens_to_note_sequence(ids, max_note_seconds=2.5))[60] == 2.5
  assert _ends(tokens.tokens_to_note_sequence(ids, max_note_seconds=0))[60] == 21.1  # no cap
  assert capped.total_time == pytest.approx(21.1)
  with pytest.raises(ValueError, match="max_note_seconds"):
    tokens.tokens_to_note_sequence(ids, max_note_seconds=-1)


def test_note_cap_default_lies_above_real_note_lengths(encoded):
  """The cap's justification: 99.9% of real notes are shorter; real notes are never cut."""
  lengths = np.concatenate([(q[:, 1] - q[:, 0]) / tokens.STEPS_PER_SECOND
                            for q in (tokens.quantized_notes(ns) for _, ns, _ in encoded)])
  assert np.percentile(lengths, 99.9) < tokens.DEFAULT_MAX_NOTE_SECONDS < lengths.max()
  longest = max(encoded, key=lambda e: tokens.quantized_notes(e[1])[:, 1].max())
  decoded = tokens.quantized_notes(tokens.tokens_to_note_sequence(longest[2]))
  assert (decoded == tokens.quantized_notes(longest[1])).all()  # notes over 10 s kept


def test_cli_decode_max_note_seconds(tmp_path, capsys):
  npy, mid = tmp_path / "hanging.npy", tmp_path / "hanging.mid"
  np.save(npy, _hanging_tokens())
  for flag, end in (([], tokens.DEFAULT_MAX_NOTE_SECONDS), (["--max_note_seconds=0"], 21.1),
                    (["--max_note_seconds=3"], 3.0)):
    assert tokens_cli.main(["decode", str(npy), str(mid), *flag]) == 0
    assert _ends(tokens.load_note_sequence(mid))[60] == pytest.approx(end, abs=0.01)
  with pytest.raises(SystemExit):
    tokens_cli.main(["decode", str(npy), str(mid), "--max_note_seconds=-2"])
  assert "--max_note_seconds: -2: must be >= 0" in capsys.readouterr().err


def test_opening_is_the_first_seconds_of_a_real_piece(encoded):
  """The notes of `opening(tokens, T)` are the piece's notes that start before T."""
  _, _, piece = encoded[8]
  for seconds in (2.0, 10.0, 30.0):
    head = tokens.opening(piece, seconds)
    assert np.array_equal(head, piece[:len(head)])  # a prefix
    assert tokens.tokens_duration_seconds(head) <= seconds
    assert tokens.tokens_duration_seconds(piece[:len(head) + 1]) > seconds  # cut at T
    cut = tokens.tokens_duration_seconds(head)
    onsets = [sorted((n.pitch, round(n.start_time, 2))
                     for n in tokens.tokens_to_note_sequence(t).notes if n.start_time < cut)
              for t in (head, piece)]
    assert onsets[0] == onsets[1] and len(onsets[0]) > seconds
  eos = np.array([tokens.SOS_ID, tokens.TIME_SHIFT_START, tokens.EOS_ID, tokens.NOTE_ON_START])
  assert tokens.opening(eos, 10.0).tolist() == eos[:2].tolist()  # stops at EOS
