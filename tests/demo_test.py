"""README command 1, shortened: the demo end to end on the real MAESTRO pieces, then rerun."""

import json
import re
import shutil
import subprocess
import sys

import pytest

import unigram
from perceivers_jax.data import tokens
from perceivers_jax.experiments import demo

# 80 steps: enough to beat a model of token frequencies alone on the validation piece.
_DEMO = [sys.executable, "-m", "perceivers_jax.cli.demo", "--steps=80", "--num_samples=2",
         "--sample_tokens=128"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, maestro_paths):
  out = tmp_path_factory.mktemp("demo") / "demo_output"
  result = subprocess.run(_DEMO + [f"--output_dir={out}"], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return out, result


def test_demo_writes_music_report_and_curve(demo_run):
  out, result = demo_run
  assert "Done in" in result.stdout
  for name in ("trained", "untrained"):
    folder = out / "samples" / name
    assert sorted(p.name for p in folder.glob("*.mid")) == ["sample_0000.mid", "sample_0001.mid"]
    sidecar = json.loads((folder / "sample_0000.json").read_text())
    assert sidecar["num_tokens"] > 1
  assert len(list((out / "samples" / "continuation").glob("*.mid"))) == 1
  assert len(list((out / "reference").glob("*.mid"))) == 2
  assert (out / "training_curve.png").read_bytes().startswith(b"\x89PNG")
  metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
  assert set(metrics["sets"]) == {"untrained", "trained"}
  report = (out / "report.md").read_text()
  assert "| untrained |" in report and "| trained |" in report
  assert "| PCTM |" in report


def test_trained_model_beats_token_frequencies_on_validation_nll(demo_run, maestro_paths):
  out, _ = demo_run
  summary = json.loads((out / "summary.json").read_text())
  nll = {name: m["nll"] for name, m in summary["validation"].items()}
  pieces = {split: [tokens.midi_file_to_tokens(path)
                    for index, path in enumerate(maestro_paths, start=1)
                    if demo.SPLIT_OF_PIECE[index] == split] for split in ("train", "validation")}
  bar = unigram.frequency_only_nll(pieces["train"], pieces["validation"])  # 4.82 nats
  assert nll["trained"] < bar < nll["untrained"], (nll, bar)
  # The report's own token-frequency row (add-one smoothed) sits between them too.
  assert nll["trained"] < nll["token_frequency"] < nll["untrained"], nll
  assert f"| trained | {nll['trained']:.3f} |" in (out / "report.md").read_text()


def test_rerun_reuses_data_and_model(demo_run):
  out, _ = demo_run
  metrics_file = out / "train" / "metrics.jsonl"
  lines_before = metrics_file.read_text().count("\n")
  dataset = next((out / "tfds").rglob("*.array_record*"))
  stamp = dataset.stat().st_mtime_ns
  result = subprocess.run(_DEMO + [f"--output_dir={out}"], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert dataset.stat().st_mtime_ns == stamp  # not rebuilt
  new_lines = metrics_file.read_text().splitlines()[lines_before:]
  assert not any("train/loss" in line for line in new_lines)  # not retrained


def test_demo_writes_the_listening_page(demo_run):
  out, result = demo_run
  assert "listening page:" in result.stdout
  page = (out / "index.html").read_text()
  for link in ("samples/trained/sample_0001.png", "samples/continuation/sample_0000.png",
               "evaluation/report.md", "training_curve.png", "evaluation/piano_rolls_trained.png"):
    assert f"'{link}'" in page, link
  assert (out / "samples" / "trained" / "index.html").exists()


def test_report_links_resolve_and_headings_nest(demo_run):
  """Every link of report.md resolves from its folder; one H1, no heading skips a level; no
  machine path."""
  out, _ = demo_run
  report = (out / "report.md").read_text()
  links = re.findall(r"\]\(([^)]+)\)", report)
  assert "evaluation/distance_kde.png" in links and "evaluation/piano_rolls_trained.png" in links
  missing = [link for link in links if not (out / link).exists()]
  assert not missing and len(links) >= 15, (missing, links)
  levels = [len(hashes) for hashes in re.findall(r"^(#+) ", report, flags=re.M)]
  assert levels[0] == 1 and levels.count(1) == 1, levels
  assert all(b <= a + 1 for a, b in zip(levels, levels[1:])), levels
  assert str(out.parent) not in report
  assert "| token frequencies (unigram) |" in report and "zero-initialised" in report


def test_every_set_with_midi_is_heard_beside_the_reference(demo_run):
  """The listening page holds the reference excerpts; every card has its audio when
  fluidsynth rendered it, and the page says why there is none when it did not."""
  out, _ = demo_run
  page = (out / "index.html").read_text()
  assert "'reference/reference_0001.png'" in page and "Real music" in page
  cards, players = page.count("class='card'"), page.count("<audio")
  assert cards == 2 + 1 + 2 + 2  # trained, continuation, untrained, reference
  if shutil.which("fluidsynth"):
    assert players == cards and "'reference/reference_0000.wav'" in page
  else:
    assert players == 0 and "WAV rendering skipped" in page
