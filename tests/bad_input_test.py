"""Every command-line tool: bad input gives one line on stderr, exit 1 and no traceback.

Each case runs the tool in a subprocess as a user would; the line must name the file, flag
or field at fault. `--verbose` brings the traceback back.
"""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from perceivers_jax.data import tokens

_REPO = pathlib.Path(__file__).resolve().parent.parent
_TINY = str(_REPO / "configs" / "tiny.py")


def _cli(name: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", f"perceivers_jax.cli.{name}", *map(str, args)],
                        capture_output=True, text=True, cwd=_REPO, timeout=600)


def _assert_one_line(result: subprocess.CompletedProcess, *named: str) -> str:
  """The run failed with exactly one stderr line, naming each of `named`."""
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
  for thing in named:
    assert thing in lines[0], lines[0]
  return lines[0]


@pytest.fixture(scope="module")
def piece_npy(maestro_paths, tmp_path_factory) -> tuple[pathlib.Path, np.ndarray]:
  path = tmp_path_factory.mktemp("ids") / "piece.npy"
  ids = tokens.midi_file_to_tokens(maestro_paths[0])
  np.save(path, ids)
  return path, ids


def test_decode_refuses_a_2d_array_or_writes_one_midi_per_row(piece_npy, tmp_path):
  _, ids = piece_npy
  rows = tmp_path / "rows.npy"
  # Two pieces, one ending early: EOS then PAD, as batched samples are.
  short = np.concatenate([ids[:399], [tokens.EOS_ID], np.zeros(200, ids.dtype)])
  np.save(rows, np.stack([short, ids[:600]]))
  line = _assert_one_line(_cli("tokens", "decode", rows, tmp_path / "out.mid"),
                          str(rows), "[2, 600]", "--rows")
  assert "1-D" in line and not (tmp_path / "out.mid").exists()
  result = _cli("tokens", "decode", "--rows", rows, tmp_path / "out.mid")
  assert result.returncode == 0, result.stderr
  for row, n in enumerate((399, 600)):
    decoded = tokens.midi_file_to_tokens(tmp_path / f"out_{row:03d}.mid")
    expected = tokens.midi_file_to_tokens(_write_midi(ids[:n], tmp_path / f"ref{row}.mid"))
    np.testing.assert_array_equal(decoded, expected)


def _write_midi(ids: np.ndarray, path: pathlib.Path) -> pathlib.Path:
  tokens.tokens_to_midi_file(ids, path)
  return path


def test_encode_writes_the_path_it_prints_or_names_the_missing_folder(maestro_paths, tmp_path):
  out = tmp_path / "out.ids"
  result = _cli("tokens", "encode", maestro_paths[0], out)
  assert result.returncode == 0 and result.stdout.strip().endswith(f"-> {out}")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ids"]
  np.testing.assert_array_equal(np.load(out), tokens.midi_file_to_tokens(maestro_paths[0]))
  _assert_one_line(_cli("tokens", "encode", maestro_paths[0], tmp_path / "no" / "x.npy"),
                   str(tmp_path / "no"), "does not exist")
  _assert_one_line(_cli("tokens", "encode", tmp_path / "out.ids", tmp_path / "x.npy"),
                   "out.ids", "not a readable MIDI file", "; pass a Standard MIDI File")
  _assert_one_line(_cli("tokens", "render", tmp_path / "none.npy", tmp_path / "x.png"),
                   "none.npy", "no such file; pass the path of an existing .npy of token ids")
  np.save(tmp_path / "floats.npy", np.ones(3))
  _assert_one_line(_cli("tokens", "decode", tmp_path / "floats.npy", tmp_path / "x.mid"),
                   "floats.npy", "dtype float64; save them as integers")


def test_verbose_shows_the_traceback(piece_npy, tmp_path):
  _, ids = piece_npy
  rows = tmp_path / "rows.npy"
  np.save(rows, np.stack([ids, ids]))
  result = _cli("tokens", "--verbose", "decode", rows, tmp_path / "out.mid")
  assert result.returncode != 0 and "Traceback" in result.stderr and "--rows" in result.stderr


def test_build_data_rerun_after_the_folder_changed(maestro_paths, tmp_path):
  midis = tmp_path / "midis"
  midis.mkdir()
  shutil.copy(maestro_paths[0], midis / "a.mid")
  flags = [f"--manual_dir={midis}", f"--data_dir={tmp_path / 'tfds'}", "--layout=folder",
           "--num_workers=1"]
  assert _cli("build_data", *flags).returncode == 0
  rerun = _cli("build_data", *flags)
  assert rerun.returncode == 0 and "up to date" in rerun.stdout
  shutil.copy(maestro_paths[2], midis / "b.mid")
  _assert_one_line(_cli("build_data", *flags), "1 added (e.g. b.mid)", "--rebuild")
  rebuilt = _cli("build_data", *flags, "--rebuild")
  assert rebuilt.returncode == 0 and "pieces: 2 of 2" in rebuilt.stdout, rebuilt.stderr[-2000:]
  _assert_one_line(_cli("build_data", f"--manual_dir={tmp_path / 'missing'}", "--layout=folder"),
                   str(tmp_path / "missing"), "does not exist")


def test_train_unknown_field_file_workdir_and_bad_mesh(tmp_path):
  workdir = tmp_path / "run"
  _assert_one_line(_cli("train", f"--config={_TINY}", f"--workdir={workdir}",
                        "--config.model.foo=1"),
                   "--config.model.foo", "config.model has no field 'foo'")
  # ml_collections' own suggestion, out of the AttributeError(KeyError(...)) it raises.
  line = _assert_one_line(_cli("train", f"--config={_TINY}", f"--workdir={workdir}",
                               "--config.train.num_stepz=5"))
  assert line == ("error: --config.train.num_stepz: config.train has no field 'num_stepz'; "
                  "did you mean --config.train.num_steps?")
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  _assert_one_line(_cli("train", f"--config={_TINY}", f"--workdir={a_file}"),
                   f"--workdir={a_file}", "is a file")
  _assert_one_line(_cli("train", f"--config={_TINY}", f"--workdir={workdir}",
                        "--config.mesh.fsdp=3"), "config.mesh=", "does not divide")
  assert not workdir.exists()


def test_sample_with_a_non_midi_primer(tmp_path):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(tiny.get_config().to_json_best_effort())
  primer = tmp_path / "notes.mid"
  primer.write_text("not a MIDI file")
  _assert_one_line(_cli("sample", f"--workdir={workdir}", f"--output_dir={tmp_path / 'out'}",
                        f"--primer={primer}"), str(primer), "not a readable MIDI file")


def test_evaluate_skips_an_unreadable_generated_file_and_lists_it(maestro_paths, tmp_path):
  reference, generated = tmp_path / "reference", tmp_path / "generated"
  for folder, paths in ((reference, maestro_paths[:2]), (generated, maestro_paths[2:4])):
    folder.mkdir()
    for path in paths:
      shutil.copy(path, folder / path.name)
  (generated / "broken.mid").write_bytes(b"MThd\x00\x00\x00\x06truncated")
  (generated / "broken_ids.npy").write_bytes(b"\x93NUMPY garbage")
  out = tmp_path / "out"
  result = _cli("evaluate", f"--reference={reference}", f"--generated=model:{generated}",
                f"--output_dir={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  entry = json.loads((out / "metrics.json").read_text())["sets"]["model"]
  assert entry["num_pieces"] == 2
  assert [b["filename"] for b in entry["skipped_files"]] == ["broken.mid", "broken_ids.npy"]
  assert "not a readable MIDI file" in entry["skipped_files"][0]["reason"]
  assert "broken_ids.npy" in (out / "report.md").read_text()
  _assert_one_line(_cli("evaluate", f"--reference={tmp_path / 'none'}",
                        f"--generated=model:{generated}", f"--output_dir={out}"),
                   str(tmp_path / "none"), "not a folder")
  empty, new_out = tmp_path / "empty", tmp_path / "new_out"
  empty.mkdir()
  _assert_one_line(_cli("evaluate", f"--reference={reference}", f"--generated=model:{empty}",
                        f"--output_dir={new_out}"), str(empty), "no .mid/.midi/.npy files")
  assert not new_out.exists()  # inputs are checked before any output is made
