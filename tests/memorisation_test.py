"""Memorisation check on the real pieces: a copied 40-note passage (also transposed) is
found with its length and share; the held-out pieces give the baseline."""

import json
import subprocess
import sys

import note_seq
import numpy as np
import pytest

from perceivers_jax.data import tokens
from perceivers_jax.evaluation import memorisation

COPY = 40


def _notes_on_grid(path) -> list[tuple[int, int, int]]:
  """(onset step, end step, pitch) of a real piece's notes in onset order, as tokens hold them."""
  q = tokens.quantized_notes(tokens.load_note_sequence(path))
  return [tuple(row) for row in q[np.lexsort((q[:, 2], q[:, 0]))][:, :3].tolist()]


def _sequence(notes) -> note_seq.NoteSequence:
  ns = note_seq.NoteSequence()
  for onset, end, pitch in notes:
    ns.notes.add(pitch=pitch, velocity=80, start_time=onset / 100, end_time=end / 100)
  ns.total_time = max(n.end_time for n in ns.notes)
  return ns


def _with_copy(own, passage, transpose: int):
  """`own`'s first 300 notes, 3 s of silence, the passage (transposed), 3 s, 200 more notes."""
  head, tail = own[:300], own[300:500]
  t = head[-1][0] + 300
  copy = [(o - passage[0][0] + t, e - passage[0][0] + t, p + transpose) for o, e, p in passage]
  t = copy[-1][0] + 300 - tail[0][0]
  return head + copy + [(o + t, e + t, p) for o, e, p in tail]


@pytest.fixture(scope="module")
def pieces(maestro_paths):
  return [_notes_on_grid(p) for p in maestro_paths]


@pytest.fixture(scope="module")
def checked(pieces, tmp_path_factory):
  """Train: pieces 1..8; generated: piece 9 with a copy of piece 3's notes 100..139, piece 10
  with the same copy transposed up a fourth, and piece 10 untouched; reference: 9 and 10."""
  passage = pieces[2][100:100 + COPY]
  generated = [_with_copy(pieces[8], passage, 0), _with_copy(pieces[9], passage, 5),
               pieces[9][:540]]
  out = tmp_path_factory.mktemp("memorisation")
  result = memorisation.evaluate_memorisation(
      [_sequence(p) for p in pieces[:8]],
      {"reference": [_sequence(p) for p in pieces[8:]],
       "generated": [_sequence(p) for p in generated]}, out)
  return result, out


def test_copied_passage_found_with_its_length_and_share(checked):
  result, _ = checked
  copied, transposed, untouched = result["sets"]["generated"]["pieces"]
  for entry in (copied, transposed):
    assert entry["num_notes"] == 540
    assert entry["longest_run"] == COPY
    assert entry["copied_share"] == pytest.approx(COPY / 540)
    assert entry["training_piece"] == "train[2]" and entry["training_note"] == 100
    assert entry["longest_run_at_note"] == 300
  assert untouched["longest_run"] < memorisation.MIN_RUN_NOTES
  assert untouched["copied_share"] == 0.0
  assert result["sets"]["generated"]["pieces_with_runs_of_16"] == 2


def test_held_out_pieces_are_the_baseline(checked):
  result, out = checked
  reference = result["sets"]["reference"]
  assert reference["num_pieces"] == 2
  # Real held-out performances share only short idioms with the training pieces.
  assert 3 <= reference["longest_run_max"] < memorisation.MIN_RUN_NOTES
  assert result["train"]["num_pieces"] == 8
  written = json.loads((out / "memorisation.json").read_text())
  assert written["sets"]["generated"]["pieces"][0]["longest_run"] == COPY
  assert "| generated | 3 |" in (out / "memorisation.md").read_text()


def _longest_common_run(query, train) -> int:
  best = 0
  for i in range(len(query)):
    for t in train:
      for j in range(len(t)):
        k = 0
        while i + k < len(query) and j + k < len(t) and query[i + k] == t[j + k]:
          k += 1
        best = max(best, k)
  return best


def test_matches_brute_force_on_random_steps():
  """Three symbols, so long chance runs, pieces of every length, runs ending at piece ends."""
  rng = np.random.default_rng(0)
  train = [rng.integers(0, 3, rng.integers(1, 50)) for _ in range(20)]
  queries = [rng.integers(0, 3, rng.integers(1, 50)) for _ in range(20)]
  corpus = memorisation.Corpus(train, [str(i) for i in range(20)])
  suffixes = sorted(range(corpus.text.symbols.size),
                    key=lambda i: corpus.text.symbols[i:].tolist())
  assert corpus.order.tolist() == suffixes
  for query, result in zip(queries, corpus.check(queries)):
    assert result["longest_run"] == _longest_common_run(query, train) + 1


def test_cli_train_flag_checks_the_folder_first(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "perceivers_jax.cli.evaluate", f"--reference={tmp_path}",
       f"--generated=g:{tmp_path}", f"--output_dir={tmp_path / 'out'}",
       f"--train={tmp_path / 'nowhere'}"], capture_output=True, text=True)
  assert result.returncode != 0
  assert f"--train={tmp_path / 'nowhere'}: not a folder" in result.stderr


def test_cli_train_flag_writes_the_check(maestro_paths, tmp_path):
  """perceivers-evaluate --train=FOLDER: an excerpt of a training piece is copied whole."""
  folders = {name: tmp_path / name for name in ("train", "reference", "generated")}
  for folder in folders.values():
    folder.mkdir()
  for i in (2, 3):
    (folders["train"] / maestro_paths[i].name).symlink_to(maestro_paths[i])
  for i in (0, 9):
    (folders["reference"] / maestro_paths[i].name).symlink_to(maestro_paths[i])
  np.save(folders["generated"] / "copy.npy", tokens.midi_file_to_tokens(maestro_paths[2])[:1500])
  out = tmp_path / "out"
  subprocess.run([sys.executable, "-m", "perceivers_jax.cli.evaluate",
                  f"--reference={folders['reference']}", f"--generated=g:{folders['generated']}",
                  f"--train={folders['train']}", f"--output_dir={out}"], check=True,
                 capture_output=True)
  result = json.loads((out / "memorisation.json").read_text())
  (copied,) = result["sets"]["g"]["pieces"]
  assert copied["longest_run"] == copied["num_notes"] > 300 and copied["copied_share"] == 1.0
  assert copied["training_piece"] == maestro_paths[2].name and copied["training_note"] == 0
  assert result["sets"]["reference"]["longest_run_max"] < memorisation.MIN_RUN_NOTES


def test_a_continuations_primer_is_not_counted_as_copied(maestro_paths, tmp_path):
  """Samples primed with a training piece's opening (sidecar prompt_tokens, as
  perceivers-sample writes): one continues it verbatim (every generated note copied), one
  continues with a held-out piece (nothing generated is copied)."""
  train, reference, generated = (tmp_path / name for name in ("train", "reference", "g"))
  for folder, indices in ((train, (2, 3)), (reference, (0,)), (generated, ())):
    folder.mkdir()
    for i in indices:
      (folder / maestro_paths[i].name).symlink_to(maestro_paths[i])
  opening = tokens.midi_file_to_tokens(maestro_paths[2])[:1500]
  held_out = tokens.midi_file_to_tokens(maestro_paths[9])[:800]
  np.save(generated / "verbatim.npy", opening)
  np.save(generated / "new.npy", np.concatenate([opening[:700], held_out]))
  for name in ("verbatim", "new"):
    (generated / f"{name}.json").write_text(json.dumps({"prompt_tokens": 700}))
  result = memorisation.evaluate_memorisation(train, {"g": generated, "reference": reference},
                                              tmp_path / "out")
  new, verbatim = result["sets"]["g"]["pieces"]  # sorted by file name
  primer = int(np.sum((opening[:700] >= tokens.NOTE_ON_START)
                      & (opening[:700] < tokens.NOTE_OFF_START)))
  assert new["primer_notes"] == verbatim["primer_notes"] == primer > 100
  assert verbatim["longest_run"] == verbatim["num_notes"] - primer
  assert verbatim["copied_share"] == 1.0
  assert new["longest_run"] < memorisation.MIN_RUN_NOTES and new["copied_share"] == 0.0
  assert result["sets"]["reference"]["pieces"][0]["primer_notes"] == 0
