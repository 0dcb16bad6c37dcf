"""Repetition measures, the report (metrics.json, report.md, plots) and the CLI."""

import json
import subprocess
import sys

import note_seq
import numpy as np
from PIL import Image
import pytest

from perceivers_jax.data import piano_roll
from perceivers_jax.data import tokens as tokens_lib
from perceivers_jax.evaluation import features
from perceivers_jax.evaluation import piece_sets
from perceivers_jax.evaluation import repetition
from perceivers_jax.evaluation import report

_PATTERN = (60, 64, 67, 72)
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _evaluate_cli(*flags: str) -> list[str]:
  return [sys.executable, "-m", "perceivers_jax.cli.evaluate", *flags]


def _loop(repeats=40, step=0.25, length=0.2):
  """A 4-note pattern looped: notes every `step` s, each `length` s long."""
  pitches = np.tile(_PATTERN, repeats)
  starts = np.arange(pitches.size) * step
  return features.notes_from_arrays(starts, starts + length, pitches)


def _sequence(notes):
  ns = note_seq.NoteSequence()
  for start, end, pitch in zip(notes.starts, notes.ends, notes.pitches):
    ns.notes.add(pitch=int(pitch), velocity=80, start_time=start, end_time=end)
  ns.total_time = notes.duration
  return ns


def _shuffled(ns, seed):
  """The same notes with their pitches shuffled: same PCH/PR/NC, random intervals."""
  shuffled = note_seq.NoteSequence()
  shuffled.CopyFrom(ns)
  pitches = np.random.default_rng(seed).permutation([n.pitch for n in ns.notes])
  for note, pitch in zip(shuffled.notes, pitches):
    note.pitch = int(pitch)
  return shuffled


def test_repetitive_notes_window():
  pitches = [60, 62, 64, 65] * 2
  for step, expected_last in ((1.0, True), (1.1, False)):
    starts = np.arange(8) * step  # the second 4-gram ends 4 notes = 4 * step later
    notes = features.notes_from_arrays(starts, starts + 0.5, pitches)
    mask = repetition.repetitive_notes(notes)
    assert not mask[:7].any()
    assert mask[7] == expected_last


def test_token_autocorrelation_by_hand():
  a, b = tokens_lib.NOTE_ON_START + 60, tokens_lib.NOTE_ON_START + 62
  tokens = np.array([tokens_lib.SOS_ID, a, b, a, b, tokens_lib.EOS_ID, tokens_lib.PAD_ID])
  # p = (1/2, 1/2): chance 1/2; r(1) = 0 -> -1; r(2) = 1 -> 1; r(3) = 0 -> -1; lag 4: none.
  np.testing.assert_allclose(repetition.token_autocorrelation(tokens, 4),
                             [-1.0, 1.0, -1.0, np.nan])


def test_looped_pattern_is_maximally_repetitive(maestro_paths):
  notes = _loop()
  share = repetition.repetition_summary(notes)["repetitive_share"]
  assert share == pytest.approx(1 - 7 / len(notes))  # all but the first 7 notes
  _, density = repetition.repetition_density(notes)
  notes_per_second = 4.0
  assert density.max() == pytest.approx(notes_per_second)  # every note in the bin repeats
  tokens = tokens_lib.note_sequence_to_tokens(_sequence(notes))
  # Each note: NOTE_ON, TIME_SHIFT, NOTE_OFF, TIME_SHIFT (velocity set once): period 16.
  period = 4 * len(_PATTERN)
  rho = repetition.token_autocorrelation(tokens, 64)
  assert rho[period - 1] > 0.95
  assert np.nanargmax(rho) + 1 in (period, 2 * period, 3 * period, 4 * period)
  for path in maestro_paths[:2]:
    real_notes, real_tokens = features.load_piece(path)
    real = repetition.repetition_summary(real_notes)
    assert real["repetitive_share"] < 0.25 * share
    assert (real["repetitive_per_second"] <
            0.5 * repetition.repetition_summary(notes)["repetitive_per_second"])
    real_rho = repetition.token_autocorrelation(real_tokens, 64)
    assert np.nanmax(real_rho) < 0.1 < rho[period - 1]


def _png_ok(path):
  data = path.read_bytes()
  assert data.startswith(_PNG_MAGIC) and len(data) > 10_000, path
  from matplotlib import image  # pylint: disable=g-import-not-at-top
  pixels = image.imread(path)
  assert pixels.shape[0] > 200 and pixels.shape[1] > 400 and pixels.std() > 0.05, path


def test_cli_report_real_versus_shuffled(tmp_path, maestro_paths):
  reference_dir, real_dir, shuffled_dir = (tmp_path / d for d in ("ref", "real", "shuffled"))
  for folder in (reference_dir, real_dir, shuffled_dir):
    folder.mkdir()
  for i in (0, 2, 9):  # the three shortest pieces
    (reference_dir / maestro_paths[i].name).symlink_to(maestro_paths[i])
  for i in (3, 1):
    (real_dir / maestro_paths[i].name).symlink_to(maestro_paths[i])
    ns = tokens_lib.load_note_sequence(maestro_paths[i])
    np.save(shuffled_dir / f"{maestro_paths[i].stem}.npy",
            tokens_lib.note_sequence_to_tokens(_shuffled(ns, i)))
  out = tmp_path / "out"
  # A subprocess: each absl CLI owns its flags (several define --output_dir).
  subprocess.run(_evaluate_cli(f"--reference={reference_dir}", f"--output_dir={out}",
                               f"--generated=real:{real_dir},shuffled:{shuffled_dir}"),
                 check=True)

  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["config"]["kld"] == "shared_grid"
  assert metrics["reference"]["num_pieces"] == 3
  real, shuffled = metrics["sets"]["real"], metrics["sets"]["shuffled"]
  assert real["num_pieces"] == shuffled["num_pieces"] == 2
  assert list(real["features"]) == list(features.FEATURE_NAMES)
  # Shuffling pitches keeps PCH and PR but scrambles intervals and transitions.
  for name in ("PI", "PCTM"):
    assert shuffled["features"][name]["oa"] < real["features"][name]["oa"], name
  assert shuffled["features"]["PI"]["value_mean"] > real["features"]["PI"]["value_mean"] + 3
  assert shuffled["features"]["PR"]["value_mean"] == real["features"]["PR"]["value_mean"]
  oa, baseline = shuffled["features"]["PI"]["oa"], real["features"]["PI"]["oa"]
  assert shuffled["oa_change_percent"]["PI"] == pytest.approx(100 * (oa - baseline) / baseline)
  assert real["oa_change_percent"]["PI"] == 0.0
  for entry in real["features"].values():
    assert 0.0 <= entry["oa"] <= 1.0 and entry["kld"] >= 0.0

  table = (out / "report.md").read_text()
  assert "| Feature | real KLD | real OA | shuffled KLD | shuffled OA | shuffled OA vs real (%) |" \
      in table
  for name in features.FEATURE_NAMES:
    assert f"\n| {name} | " in table, name
  for name in ("distance_kde.png", "repetition_density.png", "token_autocorrelation.png"):
    _png_ok(out / name)
  for name, count in (("reference", 3), ("real", 2), ("shuffled", 2)):  # 2 rolls a row
    _png_ok(out / f"piano_rolls_{name}.png")
    with Image.open(out / f"piano_rolls_{name}.png") as image:
      assert image.size == (1200, -(-count // 2) * piano_roll.Layout(1.0).height_px), name
  assert "[piano_rolls_shuffled.png](piano_rolls_shuffled.png)" in table


def test_evaluate_sets_in_memory_and_mgeval_mode(tmp_path):
  rng = np.random.default_rng(0)
  reference = [_sequence(_loop(repeats=5 + i)) for i in range(3)]
  generated = {"tokens": [tokens_lib.note_sequence_to_tokens(ns) for ns in reference[:2]],
               "random": [_sequence(features.notes_from_arrays(
                   np.arange(12) * 0.3, np.arange(12) * 0.3 + 0.2,
                   rng.integers(40, 90, 12)))]}
  metrics = report.evaluate_sets(reference, generated, tmp_path, kld="mgeval", max_lag=8)
  assert metrics["config"]["kld"] == "mgeval"
  assert metrics["sets"]["random"]["num_pieces"] == 1
  assert metrics["sets"]["random"]["features"]["PC"]["generated_intra"]["mean"] is None
  assert len(metrics["sets"]["tokens"]["repetition"]["autocorrelation_by_lag"]) == 8
  assert (tmp_path / "report.md").exists()


def test_tfds_reference(monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  records = [{"tokens": tokens_lib.note_sequence_to_tokens(_sequence(_loop(repeats=3)))}] * 5
  calls = []

  class FakeBuilder:

    def __init__(self, name, data_dir):
      calls.append((name, data_dir))
      self.data_dir = data_dir

    def is_prepared(self):
      return self.data_dir == "/data"

    def as_data_source(self, split):
      calls.append(split)
      return records

  monkeypatch.setattr(tfds, "builder", FakeBuilder)
  piece_set = piece_sets.load_set("reference", "tfds:maestro_performance/full:validation",
                                  data_dir="/data", max_pieces=3)
  assert calls == [("maestro_performance/full", "/data"), "validation"]
  assert piece_set.piece_names == ["validation[0]", "validation[1]", "validation[2]"]
  assert len(piece_set.notes[0]) == 12
  with pytest.raises(ValueError, match="not built under /elsewhere.*perceivers-build-data"):
    piece_sets.load_set("reference", "tfds:maestro_performance/full:validation",
                        data_dir="/elsewhere")
  with pytest.raises(ValueError, match="tfds:NAME:SPLIT"):
    piece_sets.load_set("reference", "tfds:maestro_performance")


def test_bad_sets_raise_clear_errors(tmp_path):
  with pytest.raises(ValueError, match=f"{tmp_path}: no .mid"):
    report.evaluate_sets(tmp_path, {"g": tmp_path}, tmp_path / "out")
  with pytest.raises(ValueError, match="not a folder"):
    piece_sets.load_set("generated", tmp_path / "missing")
  with pytest.raises(ValueError, match=r"generated\[1\]: token ids must lie in"):
    piece_sets.load_set("generated", [[tokens_lib.SOS_ID, tokens_lib.EOS_ID], [2, 999, 1]])
  with pytest.raises(ValueError, match=r"generated\[0\]: expected a 1-D integer token array"):
    piece_sets.load_set("generated", [np.zeros((2, 2), np.int32)])
  result = subprocess.run(_evaluate_cli(f"--reference={tmp_path}", f"--output_dir={tmp_path}",
                                        "--generated=no_colon"), capture_output=True, text=True)
  assert result.returncode != 0 and "expected NAME:FOLDER" in result.stderr


def test_folder_counts_a_sample_written_as_mid_and_npy_once(tmp_path, maestro_paths):
  """perceivers-sample writes x.mid and x.npy for one piece: the set holds it once."""
  folder = tmp_path / "samples"
  folder.mkdir()
  tokens = tokens_lib.midi_file_to_tokens(maestro_paths[0])[:400]
  for name in ("sample_0000", "sample_0001"):
    np.save(folder / f"{name}.npy", tokens)
    tokens_lib.tokens_to_midi_file(tokens, folder / f"{name}.mid")
  (folder / "other.mid").symlink_to(maestro_paths[2])
  piece_set = piece_sets.load_set("generated", folder)
  assert piece_set.piece_names == ["other.mid", "sample_0000.npy", "sample_0001.npy"]
