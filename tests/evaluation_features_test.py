"""Table I features on hand-made MIDI files with known answers, and on real MAESTRO."""

import numpy as np
import pretty_midi
import pytest

from perceivers_jax.data import tokens as tokens_lib
from perceivers_jax.evaluation import features

C_MAJOR = (60, 62, 64, 65, 67, 69, 71, 72)


def _write_midi(path, voices, sustain=()):
  """voices: one [(pitch, start, end)] list per instrument; sustain: [(time, value)]."""
  pm = pretty_midi.PrettyMIDI()
  for notes in voices:
    inst = pretty_midi.Instrument(program=0)
    inst.notes = [pretty_midi.Note(velocity=80, pitch=p, start=s, end=e) for p, s, e in notes]
    inst.control_changes = [pretty_midi.ControlChange(64, v, t) for t, v in sustain]
    pm.instruments.append(inst)
  pm.write(str(path))
  return path


def _scale_notes():
  return [(p, 0.5 * i, 0.5 * i + 0.4) for i, p in enumerate(C_MAJOR)]


def _histogram(entries, size=12):
  h = np.zeros(size)
  for index, value in entries.items():
    h[index] = value
  return h


def test_c_major_scale(tmp_path):
  notes, _ = features.load_piece(_write_midi(tmp_path / "scale.mid", [_scale_notes()]))
  f = features.extract_features(notes, num_segments=4)
  assert f["PC"] == 8  # distinct pitches: C4 and C5 both count (mgeval total_used_pitch)
  assert f["NC"] == 8
  np.testing.assert_allclose(f["PCH"], _histogram({0: 2 / 8, 2: 1 / 8, 4: 1 / 8, 5: 1 / 8,
                                                   7: 1 / 8, 9: 1 / 8, 11: 1 / 8}))
  pctm = np.zeros((12, 12))
  for a, b in zip(C_MAJOR, C_MAJOR[1:]):
    pctm[a % 12, b % 12] = 1 / 7
  np.testing.assert_allclose(f["PCTM"], pctm)
  assert f["PR"] == 12
  assert f["PI"] == pytest.approx(12 / 7)
  assert f["IOI"] == pytest.approx(0.5)
  # 0.4 s lies in (0.287, 0.5]: class 5.
  np.testing.assert_allclose(f["NLH"], _histogram({5: 1.0}))
  assert f["NLTM"][5, 5] == pytest.approx(1.0) and f["NLTM"].sum() == pytest.approx(1.0)
  # 4 segments of 3.9 s / 4: two onsets each, half a second apart.
  np.testing.assert_allclose(f["NC/seg"], [2, 2, 2, 2])
  np.testing.assert_allclose(f["PC/seg"], [2, 2, 2, 2])
  np.testing.assert_allclose(f["IOI/seg"], [0.5] * 4, atol=1e-6)
  np.testing.assert_allclose(f["PCH/seg"][0], _histogram({0: 0.5, 2: 0.5}))
  np.testing.assert_allclose(f["PCH/seg"][3], _histogram({11: 0.5, 0: 0.5}))


def test_segments_with_one_onset_have_zero_ioi(tmp_path):
  notes, _ = features.load_piece(_write_midi(tmp_path / "scale.mid", [_scale_notes()]))
  f = features.extract_features(notes)  # 64 segments: each onset alone in its own
  assert f["NC/seg"].shape == f["PC/seg"].shape == f["IOI/seg"].shape == (64,)
  assert f["PCH/seg"].shape == (64, 12)
  assert f["NC/seg"].sum() == 8 and set(np.unique(f["NC/seg"])) == {0.0, 1.0}
  np.testing.assert_array_equal(f["IOI/seg"], np.zeros(64))
  # Occupied segments have a normalised histogram, empty ones a zero row.
  np.testing.assert_allclose(f["PCH/seg"].sum(axis=1), f["NC/seg"])


def test_repeated_chord(tmp_path):
  chord = [(p, t, t + 0.8) for t in (0.0, 1.0, 2.0, 3.0) for p in (60, 64, 67)]
  notes, _ = features.load_piece(_write_midi(tmp_path / "chord.mid", [chord]))
  f = features.extract_features(notes, num_segments=4)
  assert (f["PC"], f["NC"], f["PR"]) == (3, 12, 7)
  np.testing.assert_allclose(f["PCH"], _histogram({0: 1 / 3, 4: 1 / 3, 7: 1 / 3}))
  # Onset order reads each chord bottom-up: intervals 4, 3, 7, 4, 3, 7, ... (11 of them).
  assert f["PI"] == pytest.approx(49 / 11)
  assert f["IOI"] == pytest.approx(3 / 11)  # every onset counts: chords add zero intervals
  assert f["PCTM"][0, 4] == pytest.approx(4 / 11)
  assert f["PCTM"][4, 7] == pytest.approx(4 / 11)
  assert f["PCTM"][7, 0] == pytest.approx(3 / 11)
  np.testing.assert_allclose(f["NC/seg"], [3, 3, 3, 3])
  np.testing.assert_allclose(f["PC/seg"], [3, 3, 3, 3])
  np.testing.assert_allclose(f["IOI/seg"], [0, 0, 0, 0], atol=1e-9)


def test_two_voices_in_two_instruments_are_merged(tmp_path):
  upper = [(72, 0.0, 0.45), (74, 0.5, 0.95), (76, 1.0, 1.45), (77, 1.5, 1.95)]
  lower = [(48, 0.0, 2.0)]
  notes, _ = features.load_piece(_write_midi(tmp_path / "voices.mid", [upper, lower]))
  f = features.extract_features(notes)
  np.testing.assert_array_equal(notes.pitches, [48, 72, 74, 76, 77])
  assert (f["PC"], f["NC"], f["PR"]) == (5, 5, 29)
  assert f["PI"] == pytest.approx((24 + 2 + 2 + 1) / 4)
  assert f["IOI"] == pytest.approx(1.5 / 4)
  np.testing.assert_allclose(f["PCH"], _histogram({0: 2 / 5, 2: 1 / 5, 4: 1 / 5, 5: 1 / 5}))
  # 2.0 s is class 8 (1.52..2.64 s), 0.45 s class 5.
  np.testing.assert_allclose(f["NLH"], _histogram({8: 1 / 5, 5: 4 / 5}))
  assert f["NLTM"][8, 5] == pytest.approx(1 / 4) and f["NLTM"][5, 5] == pytest.approx(3 / 4)


def test_sustain_pedal_extends_notes(tmp_path):
  # C4 released at 0.2 s while the pedal is down (0.1..1.2 s) sounds until 1.2 s;
  # D4 after the pedal keeps its 0.2 s.
  path = _write_midi(tmp_path / "pedal.mid", [[(60, 0.0, 0.2), (62, 2.0, 2.2)]],
                     sustain=[(0.1, 127), (1.2, 0)])
  notes, _ = features.load_piece(path)
  np.testing.assert_allclose(notes.ends - notes.starts, [1.2, 0.2], atol=1e-3)
  f = features.extract_features(notes)
  # 1.2 s: class 7 (0.87..1.52 s); 0.2 s: class 4 (0.165..0.287 s).
  np.testing.assert_allclose(f["NLH"], _histogram({7: 0.5, 4: 0.5}))
  np.testing.assert_array_equal(features.note_length_classes(np.array([1.2, 0.2])), [7, 4])


def test_note_length_classes_are_documented_log_bins():
  edges = features.NOTE_LENGTH_EDGES_S
  assert features.NUM_LENGTH_CLASSES == 12
  assert edges[0] == pytest.approx(1 / 32) and edges[-1] == pytest.approx(8.0)
  np.testing.assert_allclose(edges[1:] / edges[:-1], 2 ** 0.8)
  np.testing.assert_array_equal(features.note_length_classes(np.array([0.01, 0.04, 10.0])),
                                [0, 1, 11])


def test_token_arrays_give_the_midi_features(tmp_path):
  midi = _write_midi(tmp_path / "scale.mid", [_scale_notes()])
  npy = tmp_path / "scale.npy"
  np.save(npy, tokens_lib.midi_file_to_tokens(midi))
  from_midi, midi_tokens = features.load_piece(midi)
  from_npy, npy_tokens = features.load_piece(npy)
  np.testing.assert_array_equal(midi_tokens, npy_tokens)
  a, b = features.extract_features(from_midi), features.extract_features(from_npy)
  for name in features.FEATURE_NAMES:
    np.testing.assert_allclose(a[name], b[name], atol=1e-6, err_msg=name)


def test_empty_piece_gives_zero_features():
  f = features.extract_features(features.notes_from_arrays([], [], []))
  for name in features.FEATURE_NAMES:
    assert not np.any(f[name]), name


def test_bad_inputs_name_the_file(tmp_path):
  text = tmp_path / "notes.txt"
  text.write_text("not music")
  with pytest.raises(ValueError, match="notes.txt.*unsupported"):
    features.load_piece(text)
  matrix = tmp_path / "matrix.npy"
  np.save(matrix, np.zeros((2, 3), np.int32))
  with pytest.raises(ValueError, match="matrix.npy.*1-D integer"):
    features.load_piece(matrix)
  broken = tmp_path / "broken.mid"
  broken.write_bytes(b"MThd garbage")
  with pytest.raises(ValueError, match="broken.mid"):
    features.load_piece(broken)


def test_real_maestro_piece_is_consistent(maestro_paths):
  notes, token_ids = features.load_piece(maestro_paths[0])
  f = features.extract_features(notes)
  assert f["NC"] == len(notes) > 1000
  assert f["NC/seg"].sum() == f["NC"]
  assert 40 <= f["PC"] <= 88 and f["PR"] >= f["PC"] - 1
  for name in ("PCH", "PCTM", "NLH", "NLTM"):
    assert f[name].sum() == pytest.approx(1.0), name
  # Segments split [0, end of the last note) evenly: the first and the last but one hold
  # onsets (the final chord rings on through the last 5.4 s segment).
  assert f["NC/seg"][0] > 0 and f["NC/seg"][-2] > 0
  assert 0.0 < f["IOI"] < 1.0 and np.all(f["IOI/seg"] >= 0)
  assert token_ids[0] == tokens_lib.SOS_ID and token_ids[-1] == tokens_lib.EOS_ID
