"""perceivers-reproduce, shortened (a paper model and its size-matched control, two folds, 10
steps) end to end on the real pieces: the stages are the models and folds they claim to be,
every number of the report comes from the runs, a rerun skips finished work and redoes a stage
whose config changed."""

import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from data_prep.maestro_performance import maestro_performance_dataset_builder as builder_lib
from perceivers_jax import config_base
from perceivers_jax.data import tokens as tokens_lib
from perceivers_jax.evaluation import paired_differences
from perceivers_jax.evaluation import report as report_lib
from perceivers_jax.experiments import reproduce
from perceivers_jax.experiments import reproduce_report
from perceivers_jax.sampling import sampling
from perceivers_jax.state import run_dir
from perceivers_jax.training import validation as validation_lib

_MODELS = ("effective_segmentation", "effective_two_full")
_SEEDS = (0, 1)
_OPENING_SECONDS = 2.0
_RUN = [sys.executable, "-m", "perceivers_jax.cli.reproduce", f"--models={','.join(_MODELS)}",
        "--seeds=0,1", "--steps=10", "--num_samples=2", "--sample_tokens=128",
        f"--opening_seconds={_OPENING_SECONDS}", "--eval_targets_per_piece=1100"]


@pytest.fixture(scope="module")
def reproduce_run(tmp_path_factory, maestro_paths):
  out = tmp_path_factory.mktemp("reproduce") / "out"
  result = subprocess.run(_RUN + [f"--workdir={out}"], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return out


def _stage(out: pathlib.Path, model: str, seed: int) -> pathlib.Path:
  return out / "runs" / model / f"seed_{seed}"


def _results(out: pathlib.Path) -> dict:
  return json.loads((out / "results.json").read_text())


def _flat(tree: dict, prefix: str = "") -> dict:
  return {k: v for key, value in tree.items() for k, v in (
      _flat(value, f"{prefix}{key}.").items() if isinstance(value, dict)
      else [(f"{prefix}{key}", value)])}


def test_stages_are_the_models_and_folds_they_claim(reproduce_run):
  from perceivers_jax.configs import tiny  # pylint: disable=g-import-not-at-top
  for model in _MODELS:
    for seed in _SEEDS:
      config = run_dir.read_config(_stage(reproduce_run, model, seed) / "train")
      saved = _flat(json.loads(config.to_json()))
      model_fields = _flat(json.loads(config_base.paper_model(tiny.get_config(), model).to_json()))
      assert {k for k in saved if saved[k] != model_fields[k]} == {
          "seed", "data.data_dir", "train.num_steps", "eval.every_steps",
          "eval.max_targets_per_piece", "checkpoint.every_steps"} - ({"seed"} if seed == 0 else set())
      assert (config.seed, config.train.num_steps) == (seed, 10)
      assert config.data.data_dir == str(reproduce_run / "data" / f"fold_{seed}" / "tfds")
      assert config.eval.max_targets_per_piece == 1100
  # Each seed holds out its own two pieces (fold 0: the demo's 9 and 10; fold 1: 7 and 8).
  held_out = {}
  for seed in _SEEDS:
    csv = reproduce_run / "data" / f"fold_{seed}" / "maestro_v3" / builder_lib.MAESTRO_CSV
    held_out[seed] = sorted(re.findall(r"(Maestro_\d+)\.mid,[^\n]*", "\n".join(
        line for line in csv.read_text().splitlines() if ",validation," in line)))
  assert held_out == {0: ["Maestro_10", "Maestro_9"], 1: ["Maestro_7", "Maestro_8"]}
  assert _results(reproduce_run)["folds"] == {
      "0": {"fold": 0, "held_out": ["Maestro_9.mid", "Maestro_10.mid"]},
      "1": {"fold": 1, "held_out": ["Maestro_7.mid", "Maestro_8.mid"]}}


@pytest.mark.parametrize("model,seed", [(_MODELS[0], 0), (_MODELS[1], 1)])
def test_held_out_metrics_are_what_evaluate_gives_for_the_checkpoint(reproduce_run, model, seed):
  workdir = _stage(reproduce_run, model, seed) / "train"
  fresh = validation_lib.evaluate(run_dir.read_config(workdir), str(workdir))  # --mode=eval
  reported = _results(reproduce_run)["models"][model]["per_seed"][str(seed)]
  for name, value in fresh.items():
    if name != "seconds":
      assert reported[name] == pytest.approx(value, abs=1e-5), name
  # Log-spaced buckets from the first target; the first k targets of both held-out pieces.
  buckets = [k for k in fresh if k.startswith("nll_pos_")]
  assert buckets[:4] == ["nll_pos_1_2", "nll_pos_2_4", "nll_pos_4_8", "nll_pos_8_16"]
  assert sum(fresh[f"targets_in_{b}"] for b in buckets) == fresh["targets"] == 2 * 1100
  assert (fresh["targets_in_nll_first_16"], fresh["targets_in_nll_first_512"]) == (32, 1024)
  assert fresh["targets_in_nll_full_context"] == 2 * (1100 - 1024 + 1)
  for k in validation_lib.FIRST_TARGETS:
    assert reported[f"gap_{k}"] == pytest.approx(
        fresh[f"nll_first_{k}"] - fresh["nll_full_context"], abs=1e-5)


def _numbers(tree) -> list[float]:
  if isinstance(tree, dict):
    return [x for v in tree.values() for x in _numbers(v)]
  if isinstance(tree, list):
    return [x for v in tree for x in _numbers(v)]
  return [float(tree)] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_every_number_of_the_report_comes_from_the_runs(reproduce_run):
  results = _results(reproduce_run)
  pooled = json.loads((reproduce_run / "evaluation" / "metrics.json").read_text())
  openings = json.loads((reproduce_run / "openings" / "metrics.json").read_text())
  report = (reproduce_run / "report.md").read_text()
  for model in _MODELS:
    entry = results["models"][model]
    for seed in _SEEDS:
      per_seed = json.loads(
          (reproduce_run / "evaluation" / f"seed_{seed}" / "metrics.json").read_text())
      assert entry["per_seed"][str(seed)]["oa_mean"] == per_seed["sets"][model]["oa_mean"]
      assert per_seed["reference"]["num_pieces"] == 2  # excerpts of the seed's own pieces
    assert entry["table1"]["oa_mean"] == pooled["sets"][model]["oa_mean"]
    assert entry["openings"]["oa_mean"] == openings["sets"][model]["oa_mean"]
    assert f"{entry['num_params']:,}" in report
  # The contrast is the paired difference of the per-seed numbers.
  (contrast,) = results["contrasts"]
  assert (contrast["model"], contrast["against"]) == ("effective_two_full",
                                                      "effective_segmentation")
  measures = {m: [results["models"][m]["per_seed"][str(s)] for s in _SEEDS] for m in _MODELS}
  for name, difference in contrast["metrics"].items():
    assert difference == paired_differences.paired_difference(
        [m[name] for m in measures[_MODELS[1]]], [m[name] for m in measures[_MODELS[0]]])
    assert reproduce_report.finding(contrast, name) in report
  assert contrast["num_params_change_percent"] == pytest.approx(100 * (
      results["models"][_MODELS[1]]["num_params"] / results["models"][_MODELS[0]]["num_params"]
      - 1))
  # Every figure the report prints (x.yyy, x.y%) is one of the run's numbers.
  known = _numbers(results) + _numbers(pooled) + _numbers(openings)
  printed = set(re.findall(r"(?<![\d.])[-+]?\d+\.\d{3}(?!\d)", report))
  assert printed and printed <= {f"{v:.3f}" for v in known} | {f"{v:+.3f}" for v in known}
  percents = set(re.findall(r"([-+]?\d+\.\d)%", report))
  assert percents and percents <= {f"{v:+.1f}" for v in known}
  # The report is rendered from results.json alone.
  text = report
  reproduce_report.rewrite_report(reproduce_run)
  assert (reproduce_run / "report.md").read_text() == text
  for plot in ("nll_by_position.png", "evaluation/distance_kde.png",
               "openings/distance_kde.png"):
    assert (reproduce_run / plot).read_bytes().startswith(b"\x89PNG"), plot


def test_openings_are_the_first_seconds_of_samples_and_held_out_pieces(reproduce_run):
  references, generated = [], {m: [] for m in _MODELS}
  for seed in _SEEDS:
    config = run_dir.read_config(_stage(reproduce_run, _MODELS[0], seed) / "train")
    references += [tokens_lib.opening(t, _OPENING_SECONDS)
                   for t in reproduce.held_out_tokens(config)]
    for model in _MODELS:
      generated[model] += [
          tokens_lib.opening(np.load(p), _OPENING_SECONDS)
          for p in sorted((_stage(reproduce_run, model, seed) / "samples").glob("*.npy"))]
  assert all(tokens_lib.tokens_duration_seconds(t) <= _OPENING_SECONDS
             for t in references + sum(generated.values(), []))
  again = report_lib.evaluate_sets(references, generated, reproduce_run / "openings_again")
  reported = json.loads((reproduce_run / "openings" / "metrics.json").read_text())
  assert again["reference"]["num_pieces"] == 4
  for model in _MODELS:
    assert again["sets"][model]["oa_mean"] == reported["sets"][model]["oa_mean"]


def test_a_stage_is_skipped_when_done_resumed_when_cut_short_and_rerun_when_changed(
    reproduce_run, capsys):
  """What a rerun of the command does to each stage (run_reproduce calls run_stage for each)."""
  folder = _stage(reproduce_run, _MODELS[0], 1)
  config = run_dir.read_config(folder / "train")
  settings = sampling.SampleSettings.from_flag_values(
      json.loads((folder / "samples.json").read_text())["sampled"]["settings"])
  files = [folder / "eval.json", folder / "samples" / "sample_0000.npy"]
  stamps = [f.stat().st_mtime_ns for f in files]
  log = folder / "train" / "metrics.jsonl"
  reproduce.run_stage(config, settings, folder)  # the same config, done: nothing to do
  assert [f.stat().st_mtime_ns for f in files] == stamps

  (folder / "eval.json").unlink()  # cut short after training
  lines_before = log.read_text().count("\n")
  reproduce.run_stage(config, settings, folder)
  new_lines = log.read_text().splitlines()[lines_before:]
  assert not any("train/loss" in line for line in new_lines)  # resumed at its last step
  assert any("eval_once/nll" in line for line in new_lines)  # only the evaluation reran
  assert files[1].stat().st_mtime_ns == stamps[1]

  config.train.learning_rate = 0.001  # as --config.train.learning_rate=0.001 would
  reproduce.run_stage(config, settings, folder)
  assert "config.train.learning_rate: 0.002 -> 0.001" in capsys.readouterr().out
  assert run_dir.read_config(folder / "train").train.learning_rate == 0.001
  records = [json.loads(line) for line in log.open()]
  assert any("train/loss" in r for r in records)  # trained afresh, not resumed at step 10
  assert files[1].stat().st_mtime_ns != stamps[1]  # and sampled again


def test_bad_models_flag_is_one_clear_line(tmp_path):
  result = subprocess.run(_RUN + ["--models=perceiver_ar,nope", f"--workdir={tmp_path}"],
                          capture_output=True, text=True)
  assert result.returncode != 0
  assert "--models=perceiver_ar,nope: name at least two distinct" in result.stderr
  assert not any(tmp_path.iterdir())  # nothing built before the check


def test_bad_config_override_fails_before_any_work(tmp_path):
  from perceivers_jax.configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.model.attention_impl = "flash"
  options = reproduce.ReproduceOptions(
      workdir=str(tmp_path / "out"), config=config, data_dir="", models=_MODELS, seeds=_SEEDS,
      steps=10, num_samples=2, sample_tokens=128)
  with pytest.raises(config_base.ConfigError, match="config.model.attention_impl='flash'"):
    reproduce.run_reproduce(options)
  assert not any(tmp_path.iterdir())
