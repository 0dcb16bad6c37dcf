"""TFDS builder `maestro_performance` on real pieces in MAESTRO-v3 and folder layouts."""

import csv
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pretty_midi
import pytest
import tensorflow_datasets as tfds

from data_prep import maestro_performance
from data_prep.maestro_performance import maestro_performance_dataset_builder as mpdb
from data_prep.maestro_performance import workers
from perceivers_jax import config_base
from perceivers_jax.data import built_dataset
from perceivers_jax.data import input_pipeline
from perceivers_jax.data import tokens

# Three of the shorter real pieces, one per split.
REAL = {"Maestro_3.mid": "train", "Maestro_1.mid": "validation", "Maestro_10.mid": "test"}
BAD = {"corrupt.midi": ("train", "not a readable MIDI"), "empty.midi": ("validation", "no notes"),
       "drums.midi": ("test", "only drum notes")}


def _write_bad(path: pathlib.Path, kind: str) -> None:
  if kind == "corrupt.midi":
    path.write_bytes(b"MThd\x00\x00\x00\x06\x00\x01truncated")
    return
  pm = pretty_midi.PrettyMIDI()
  inst = pretty_midi.Instrument(program=0, is_drum=kind == "drums.midi")
  if kind == "drums.midi":
    inst.notes = [pretty_midi.Note(velocity=100, pitch=36 + i, start=i * 0.5, end=i * 0.5 + 0.1)
                  for i in range(4)]
  pm.instruments.append(inst)
  pm.write(str(path))


def _populate(root: pathlib.Path, maestro_dir: pathlib.Path, year_folders: bool) -> list[dict]:
  """Copies the real pieces and writes the bad ones; returns CSV rows."""
  rows = []
  for i, (name, split) in enumerate(REAL.items()):
    rel = f"{2004 + i}/{name}" if year_folders else f"sub{i % 2}/{name}"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(maestro_dir / name, root / rel)
    rows.append(dict(canonical_composer=f"Composer {i}", canonical_title=f"Title {i}",
                     split=split, year=2004 + i, midi_filename=rel,
                     audio_filename=rel.replace(".mid", ".wav"), duration=100.0 + i))
  for name, (split, _) in BAD.items():
    rel = f"2018/{name}"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    _write_bad(root / rel, name)
    rows.append(dict(canonical_composer="X", canonical_title=name, split=split, year=2018,
                     midi_filename=rel, audio_filename="x.wav", duration=1.0))
  return rows


@pytest.fixture(scope="module")
def maestro_build(maestro_paths, tmp_path_factory):
  """One MAESTRO-v3-shaped manual dir built as `full` (2 processes)."""
  root = tmp_path_factory.mktemp("maestro-v3.0.0")
  rows = _populate(root, maestro_paths[0].parent, year_folders=True)
  with (root / mpdb.MAESTRO_CSV).open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=mpdb.MAESTRO_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  data_dir = tmp_path_factory.mktemp("tfds")
  builder, report = maestro_performance.build(root, data_dir, "full", num_workers=2)
  return dict(root=root, rows=rows, data_dir=data_dir, builder=builder, report=report)


def test_report_lists_the_bad_files_with_reasons(maestro_build):
  report = maestro_build["report"]
  path = pathlib.Path(maestro_build["builder"].data_dir) / "build_report.json"
  assert path == maestro_build["data_dir"] / "maestro_performance/full/1.0.0/build_report.json"
  assert {**json.loads(path.read_text()), "reused": False} == report
  assert report["pieces_found"] == 6 and report["pieces_built"] == 3
  assert report["pieces_per_split"] == {"train": 1, "validation": 1, "test": 1}
  assert report["skipped"] == 3
  reasons = {pathlib.PurePosixPath(b["filename"]).name: b["reason"]
             for b in report["skipped_files"]}
  assert set(reasons) == set(BAD)
  for name, (_, reason) in BAD.items():
    assert reason in reasons[name] and name in reasons[name]


def test_full_config_splits_follow_the_csv(maestro_build):
  by_file = {r["midi_filename"]: r for r in maestro_build["rows"]}
  for split in mpdb.SPLITS:
    source = tfds.data_source("maestro_performance/full", split=split,
                              data_dir=maestro_build["data_dir"])
    assert len(source) == 1
    record = source[0]
    row = by_file[record["filename"].decode()]
    assert row["split"] == split and REAL[pathlib.PurePosixPath(row["midi_filename"]).name] == split
    expected = tokens.midi_file_to_tokens(maestro_build["root"] / row["midi_filename"])
    np.testing.assert_array_equal(record["tokens"], expected)
    assert record["tokens"].dtype == np.int32 and record["num_tokens"] == len(expected)
    assert record["composer"].decode() == row["canonical_composer"]
    assert record["title"].decode() == row["canonical_title"]
    assert record["year"] == row["year"]
    assert record["duration"] == pytest.approx(row["duration"])
    assert record["piece_id"] == maestro_build["rows"].index(row)


def test_open_data_source_feeds_the_pipeline(maestro_build):
  config = config_base.base_config()
  config.data.data_dir = str(maestro_build["data_dir"])
  config.model.max_length, config.model.num_latents = 128, 32
  config.train.batch_size = config.eval.batch_size = 2
  source = input_pipeline.open_data_source(config, "train")
  batch = next(input_pipeline.make_train_iterator(config, source, seed=0, process_index=0,
                                                  process_count=1))
  assert batch["inputs"].shape == (2, 128)
  config.eval.max_batches = 3
  eval_batches = list(input_pipeline.make_eval_batches(
      config, input_pipeline.open_data_source(config, "test"), process_index=0,
      process_count=1))
  assert len(eval_batches) == 3 and (eval_batches[0]["targets"] != 0).sum() == 2 * 32
  config.data.dataset = "maestro_performance/folder_full"
  with pytest.raises(FileNotFoundError, match="perceivers-build-data"):
    input_pipeline.open_data_source(config, "train")
  config.data.dataset = "maestro_performance/windows_L8_N4"  # pre-cut windows are gone
  with pytest.raises(config_base.ConfigError,
                     match="config.data.dataset=.*maestro_performance/full or"):
    input_pipeline.open_data_source(config, "train")


_OPEN_WITHOUT_BUILDER = """
import json, sys
from perceivers_jax import config_base
from perceivers_jax.data import input_pipeline
config = config_base.base_config()
config.data.data_dir = sys.argv[1]
source = input_pipeline.open_data_source(config, "train")
print(json.dumps(dict(builder_imported=[m for m in sys.modules if m.startswith("data_prep")],
                      tokens=source[0]["tokens"].tolist(),
                      lengths=input_pipeline.record_lengths(source))))
"""


def test_a_build_opens_without_the_builder_code(maestro_build):
  """Only building imports data_prep (which registers the builder): a fresh process reads the
  built split from its files, the stored lengths included."""
  result = subprocess.run([sys.executable, "-c", _OPEN_WITHOUT_BUILDER,
                           str(maestro_build["data_dir"])], capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  read = json.loads(result.stdout.strip().splitlines()[-1])
  expected = maestro_build["builder"].as_data_source(split="train")[0]["tokens"]
  assert read["builder_imported"] == [] and read["tokens"] == expected.tolist()
  assert read["lengths"] == [len(expected)]


def test_eval_lengths_come_from_the_stored_file(maestro_build, monkeypatch):
  stored = json.loads((pathlib.Path(maestro_build["builder"].data_dir)
                       / built_dataset.LENGTHS_FILE).read_text())
  sources = {split: maestro_build["builder"].as_data_source(split=split)
             for split in mpdb.SPLITS}
  for split, source in sources.items():
    assert stored[split] == [len(source[i]["tokens"]) for i in range(len(source))]
  # Start-up reads no record: the sources' records are out of reach.
  monkeypatch.setattr(type(sources["train"]), "__getitem__",
                      lambda *_: pytest.fail("read a record"))
  for split, source in sources.items():
    assert input_pipeline.record_lengths(source) == stored[split]


def test_folder_layout_builds_through_the_cli(maestro_paths, tmp_path):
  root = tmp_path / "midis"
  _populate(root, maestro_paths[0].parent, year_folders=False)
  data_dir = tmp_path / "tfds"
  result = subprocess.run(
      [sys.executable, "-m", "perceivers_jax.cli.build_data", f"--manual_dir={root}",
       f"--data_dir={data_dir}", "--layout=folder", "--num_workers=1"],
      capture_output=True, text=True, check=True)
  assert "pieces: 3 of 6" in result.stdout and "skipped: 3" in result.stdout
  report = json.loads(
      (data_dir / "maestro_performance/folder_full/1.0.0/build_report.json").read_text())
  assert {pathlib.PurePosixPath(b["filename"]).name for b in report["skipped_files"]} == set(BAD)
  seen = []
  for split, count in report["pieces_per_split"].items():
    if not count:
      continue
    source = tfds.data_source("maestro_performance/folder_full", split=split,
                              data_dir=data_dir)
    for i in range(len(source)):
      filename = source[i]["filename"].decode()
      assert mpdb.folder_split(filename) == split
      assert source[i]["duration"] == pytest.approx(
          tokens.tokens_duration_seconds(source[i]["tokens"]))
      seen.append(pathlib.PurePosixPath(filename).name)
  assert sorted(seen) == sorted(REAL)


def test_folder_split_is_deterministic_and_balanced():
  splits = [mpdb.folder_split(f"composer{i}/piece_{i}.mid") for i in range(2000)]
  assert splits == [mpdb.folder_split(f"composer{i}/piece_{i}.mid") for i in range(2000)]
  shares = {s: splits.count(s) / len(splits) for s in mpdb.SPLITS}
  assert shares["train"] == pytest.approx(0.8, abs=0.03)
  assert shares["validation"] == pytest.approx(0.1, abs=0.02)


def test_wrong_layouts_say_what_was_expected(tmp_path):
  with pytest.raises(maestro_performance.LayoutError, match="does not exist"):
    mpdb.list_pieces(tmp_path / "missing", "maestro_v3")
  with pytest.raises(maestro_performance.LayoutError,
                     match="maestro-v3.0.0.csv is missing.*magenta.tensorflow.org"):
    mpdb.list_pieces(tmp_path, "maestro_v3")
  (tmp_path / mpdb.MAESTRO_CSV).write_text("split,midi_filename\ntrain,a.midi\n")
  with pytest.raises(maestro_performance.LayoutError, match="missing columns"):
    mpdb.list_pieces(tmp_path, "maestro_v3")
  with pytest.raises(maestro_performance.LayoutError, match="no MIDI files"):
    mpdb.list_pieces(tmp_path, "folder")


def test_config_names():
  assert maestro_performance.make_config("folder_full").layout == "folder"
  assert maestro_performance.make_config("full").layout == "maestro_v3"
  for bad in ("windows_L64_N16", "folder_windows_L32768_N1024", "other"):
    with pytest.raises(ValueError, match="no windows_\\* configs"):
      maestro_performance.make_config(bad)


def _folder_of(maestro_paths, root: pathlib.Path, names) -> pathlib.Path:
  root.mkdir()
  for name in names:
    shutil.copy(maestro_paths[0].parent / name, root / name)
  return root


def test_caps_and_a_dying_worker_cost_only_their_files(maestro_paths, tmp_path, monkeypatch):
  # Maestro_10 holds 5,323 notes, Maestro_2 12,418; Maestro_1 (348 s) and Maestro_3 pass.
  root = _folder_of(maestro_paths, tmp_path / "midis",
                    ["Maestro_1.mid", "Maestro_2.mid", "Maestro_3.mid", "Maestro_10.mid"])
  monkeypatch.setenv(workers.DIE_ON_ENV, "Maestro_3.mid")  # its worker SIGKILLs itself
  _, report = maestro_performance.build(root, tmp_path / "tfds", "folder_full", num_workers=2,
                                        limits=workers.Limits(max_notes=6000))
  reasons = {b["filename"]: b["reason"] for b in report["skipped_files"]}
  assert set(reasons) == {"Maestro_2.mid", "Maestro_3.mid"}
  assert "12,418 notes, over the cap of 6,000 (--max_notes)" in reasons["Maestro_2.mid"]
  assert "killed by SIGKILL" in reasons["Maestro_3.mid"]
  assert report["pieces_built"] == 2 and report["tokens"] == sum(
      len(tokens.midi_file_to_tokens(root / n)) for n in ("Maestro_1.mid", "Maestro_10.mid"))
  alone = workers.tokenise_alone(str(root / "Maestro_1.mid"), workers.Limits(max_seconds=300))
  assert alone[0] is None and "348 s long, over the cap of 300 s (--max_seconds)" in alone[1]


def test_default_caps_pass_every_real_piece(maestro_paths):
  for path in maestro_paths:
    ns = tokens.load_note_sequence(path)
    assert workers.Limits().excess(len(ns.notes), ns.total_time) == ""


def test_a_changed_folder_is_named_and_rebuilt_on_request(maestro_paths, tmp_path):
  root = _folder_of(maestro_paths, tmp_path / "midis", ["Maestro_1.mid", "Maestro_3.mid"])
  data_dir = tmp_path / "tfds"
  _, report = maestro_performance.build(root, data_dir, "folder_full", num_workers=1)
  assert not report["reused"] and report["pieces_built"] == 2
  assert maestro_performance.build(root, data_dir, "folder_full")[1]["reused"]
  shutil.copy(maestro_paths[0].parent / "Maestro_10.mid", root / "Maestro_10.mid")
  (root / "Maestro_1.mid").unlink()
  with pytest.raises(maestro_performance.InputsChangedError,
                     match=r"1 added \(e.g. Maestro_10.mid\), 1 removed \(e.g. Maestro_1.mid\)"
                           ".*--rebuild"):
    maestro_performance.build(root, data_dir, "folder_full")
  with pytest.raises(maestro_performance.InputsChangedError, match="caps"):
    maestro_performance.build(root, data_dir, "folder_full",
                              limits=workers.Limits(max_notes=10))
  _, report = maestro_performance.build(root, data_dir, "folder_full", num_workers=1,
                                        rebuild=True)
  assert not report["reused"] and report["pieces_built"] == 2
  assert {"Maestro_3.mid", "Maestro_10.mid"} == set(report["inputs"]["files"])
