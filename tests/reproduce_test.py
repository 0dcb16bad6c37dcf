"""perceivers-reproduce, shortened (2 models, 1 seed, 30 steps) end to end on the real pieces:
every number of the report comes from the runs, and a rerun skips finished work."""

import json
import pathlib
import re
import subprocess
import sys

import pytest

from perceivers_jax.experiments import reproduce
from perceivers_jax.sampling import sampling
from perceivers_jax.training import validation as validation_lib

_MODELS = ("perceiver_ar", "perceivers")
_RUN = [sys.executable, "-m", "perceivers_jax.cli.reproduce", f"--models={','.join(_MODELS)}",
        "--seeds=0", "--steps=30", "--num_samples=2", "--sample_tokens=128",
        "--config.eval.max_batches=4"]  # 4 x 8 windows of 128 targets: positions 0..4095


@pytest.fixture(scope="module")
def reproduce_run(tmp_path_factory, maestro_paths):
  out = tmp_path_factory.mktemp("reproduce") / "out"
  result = subprocess.run(_RUN + [f"--workdir={out}"], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return out


def _stage(out: pathlib.Path, model: str) -> pathlib.Path:
  return out / "runs" / model / "seed_0"


def test_models_differ_only_as_the_paper_says(reproduce_run):
  settings = {}
  for model in _MODELS:
    config = sampling.read_config(_stage(reproduce_run, model) / "train")
    settings[model] = (config.data.windows, tuple(config.model.cross_attention_scales))
    assert config.train.num_steps == 30 and config.seed == 0
  assert settings == {"perceiver_ar": ("baseline", (0,)), "perceivers": ("effective", (0, 64))}


def test_nll_is_what_evaluate_gives_for_the_checkpoint(reproduce_run):
  results = json.loads((reproduce_run / "results.json").read_text())
  report = (reproduce_run / "report.md").read_text()
  for model in _MODELS:
    workdir = _stage(reproduce_run, model) / "train"
    config = sampling.read_config(workdir)
    fresh = validation_lib.evaluate(config, str(workdir))  # = `perceivers-train --mode=eval`
    validation = results["models"][model]["validation"]
    assert validation["nll"]["per_seed"] == [pytest.approx(fresh["nll"], abs=1e-5)]
    buckets = {k: v for k, v in fresh.items() if k.startswith(reproduce.BUCKET_PREFIX)}
    assert len(buckets) >= 2 and set(buckets) == set(validation["buckets"])
    for name, value in buckets.items():
      assert validation["buckets"][name]["mean"] == pytest.approx(value, abs=1e-5)
      assert f"{validation['buckets'][name]['mean']:.3f} ± 0.000" in report
    assert f"{validation['nll']['mean']:.3f} ± 0.000" in report


def test_table1_numbers_come_from_the_evaluation_of_the_samples(reproduce_run):
  results = json.loads((reproduce_run / "results.json").read_text())
  metrics = json.loads((reproduce_run / "evaluation" / "metrics.json").read_text())
  report = (reproduce_run / "report.md").read_text()
  assert list(metrics["sets"]) == list(_MODELS)  # the baseline first: OA change against it
  for model in _MODELS:
    table1 = results["models"][model]["table1"]
    entry = metrics["sets"][model]
    assert entry["num_pieces"] == table1["num_pieces"] == 2
    assert table1["oa_mean"] == entry["oa_mean"]
    assert sorted(pathlib.Path(p).name for p in entry["pieces"]) == [
        "sample_0000.npy", "sample_0001.npy"]
    assert f"| {reproduce.LABELS[model]} | 2 | {table1['oa_mean']:.3f} |" in report
  change = results["models"]["perceivers"]["table1"]["oa_change_percent_mean"]
  assert change == metrics["sets"]["perceivers"]["oa_change_percent_mean"]
  assert (f"{change:+.1f}" if change is not None else "n/a") in report
  for plot in ("nll_by_position.png", "evaluation/distance_kde.png",
               "evaluation/repetition_density.png", "evaluation/token_autocorrelation.png"):
    assert (reproduce_run / plot).read_bytes().startswith(b"\x89PNG"), plot
  # Every figure the report prints (x.yyy) is one of the run's numbers.
  known = {f"{v:.3f}" for v in _numbers(results) + _numbers(metrics)}
  printed = set(re.findall(r"(?<![\d.])-?\d+\.\d{3}(?!\d)", report))
  assert printed and printed <= known, printed - known


def _numbers(tree) -> list[float]:
  if isinstance(tree, dict):
    return [x for v in tree.values() for x in _numbers(v)]
  if isinstance(tree, list):
    return [x for v in tree for x in _numbers(v)]
  return [float(tree)] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_rerun_skips_finished_stages_and_redoes_a_missing_one(reproduce_run):
  done, redo = (_stage(reproduce_run, m) for m in _MODELS)
  stamp = (done / "eval.json").stat().st_mtime_ns
  sample_stamp = (done / "samples" / "sample_0000.npy").stat().st_mtime_ns
  (redo / "eval.json").unlink()
  log = redo / "train" / "metrics.jsonl"
  lines_before = log.read_text().count("\n")
  result = subprocess.run(_RUN + [f"--workdir={reproduce_run}"], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (done / "eval.json").stat().st_mtime_ns == stamp
  assert (done / "samples" / "sample_0000.npy").stat().st_mtime_ns == sample_stamp
  new_lines = log.read_text().splitlines()[lines_before:]
  assert not any("train/loss" in line for line in new_lines)  # resumed at its last step
  assert any("eval_once/nll" in line for line in new_lines)  # only the evaluation reran
  assert json.loads((redo / "eval.json").read_text())["step"] == 30


def test_bad_models_flag_is_one_clear_line(tmp_path):
  result = subprocess.run(_RUN[:3] + ["--models=perceiver_ar,nope", f"--workdir={tmp_path}"],
                          capture_output=True, text=True)
  assert result.returncode != 0
  assert "--models=perceiver_ar,nope: name at least two distinct models" in result.stderr
  assert not any(tmp_path.iterdir())  # nothing built before the check


def test_config_without_two_scales_is_refused():
  from perceivers_jax.configs import tiny  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"config.model.cross_attention_scales=\(0,\)"):
    reproduce.model_config(tiny.get_config("baseline"), "perceivers", 0, 10)
