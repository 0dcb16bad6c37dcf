"""Watching a run, on the slow training run straight through and interrupted by SIGTERM then
resumed (conftest's `resumed_runs`): the music evaluator's scalars, pages and pieces, the same
after a resume; a profile of the chosen steps; the second start reading the compilation
cache; the time account adding up; perceivers-score equal to the validation pass."""

import json
import pathlib

import numpy as np
import pytest

from perceivers_jax import config_base
from perceivers_jax.training import train
from perceivers_jax.watch import music
from perceivers_jax.watch import score
from listening_page_test import _media_after_load, needs_chromium  # headless Chromium
from metrics_writer_test import _events  # TensorBoard's event files, read back

# The music evaluator of slow_training_run.RESUMED_RUN: validation at steps 10 and 20.
MUSIC_STEPS = ("10", "20")
PIECES = {"unconditional": 2, "continuation": 2}
PRIMER = 32
TIME_TOLERANCE = 0.05  # the account's spans cover the wall time but for at most this share


def _records(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _time_records(workdir: pathlib.Path) -> list[dict]:
  return [r for r in _records(workdir) if "time/wall_seconds" in r]


def _validation_piece(runs) -> np.ndarray:
  return list(np.load(runs.straight.parent / "pieces.npz").values())[-1][:300]


def test_music_evaluator_writes_scalars_and_pages(resumed_runs):
  for workdir in (resumed_runs.straight, resumed_runs.interrupted):
    folder = workdir / music.NAME
    assert sorted(json.loads((folder / music.MANIFEST).read_text())) == list(MUSIC_STEPS)
    for step in MUSIC_STEPS:
      for name, count in PIECES.items():
        assert sorted(p.name for p in (folder / step / name).glob("sample_*.png")) == [
            f"sample_{i:04d}.png" for i in range(count)]
      page = (folder / step / "index.html").read_text()
      assert page.count("<div class='card'>") == sum(PIECES.values())
      assert (folder / step / "evaluation" / "report.md").exists()
    comparison = (folder / "index.html").read_text()
    assert "step 10" in comparison and "step 20" in comparison
    assert "src='20/continuation/sample_0001.png'" in comparison
    logged = {r["step"]: r for r in _records(workdir) if "music/oa_mean/unconditional" in r}
    assert sorted(logged) == [10, 20]
    for record in logged.values():
      assert 0 <= record["music/oa_mean/continuation"] <= 1
      assert 0 <= record["music/copied_share/unconditional"] <= 1
      assert "music/repetitive_share/reference" in record
    images = {v.tag for e in _events(workdir / "tensorboard") for v in e.summary.value
              if v.HasField("image")}
    assert images == {"music/piano_rolls/unconditional", "music/piano_rolls/continuation"}


@needs_chromium
def test_checkpoint_page_loads_every_piano_roll_in_chromium(resumed_runs):
  folder = resumed_runs.straight / music.NAME
  media = _media_after_load(folder / "index.html")
  rolls = [src for tag, src, _ in media if tag == "img"]
  assert len(rolls) == len(MUSIC_STEPS) * sum(PIECES.values()), rolls
  assert all(status == "ok" for _, _, status in media), media


def test_music_evaluator_plays_the_same_pieces_after_a_resume(resumed_runs):
  """The same seeds and primers, hence (with the same parameters) the same pieces, whether
  the run was interrupted or not; continuations start with the validation piece's opening."""
  straight, resumed = (w / music.NAME for w in (resumed_runs.straight,
                                                resumed_runs.interrupted))
  opening = _validation_piece(resumed_runs)[:PRIMER + 1]
  for step in MUSIC_STEPS:
    for name, count in PIECES.items():
      for i in range(count):
        stem = pathlib.Path(step) / name / f"sample_{i:04d}"
        tokens = np.load(straight / stem.with_suffix(".npy"))
        np.testing.assert_array_equal(np.load(resumed / stem.with_suffix(".npy")), tokens)
        sidecar = json.loads((straight / stem.with_suffix(".json")).read_text())
        assert sidecar == json.loads((resumed / stem.with_suffix(".json")).read_text())
        if name == "continuation":
          np.testing.assert_array_equal(tokens[:PRIMER + 1], opening)
    assert (json.loads((straight / step / "scalars.json").read_text())["oa_mean/unconditional"]
            == json.loads((resumed / step / "scalars.json").read_text())["oa_mean/unconditional"])
  first = np.load(straight / "10" / "unconditional" / "sample_0000.npy")
  assert not np.array_equal(first, np.load(straight / "10" / "unconditional" / "sample_0001.npy"))


def test_profile_of_the_chosen_steps(resumed_runs):
  traces = list((resumed_runs.straight / "tensorboard" / "plugins" / "profile").glob(
      "*/*.xplane.pb"))
  assert len(traces) == 1, traces  # steps 15 and 16, one trace.
  assert b"step_num" in traces[0].read_bytes()  # the steps are marked for XProf's step view.


def test_second_start_reads_its_programs_from_the_compilation_cache(resumed_runs):
  """The straight run starts with an empty cache; both starts of the interrupted run, later,
  with the same shapes, read programs from it."""
  straight = _time_records(resumed_runs.straight)[-1]
  assert straight["time/cache_hits"] == 0 and straight["time/compilations"] > 0
  saved = resumed_runs.saved_at_sigterm[0]
  records = _time_records(resumed_runs.interrupted)
  for start in ([r for r in records if r["step"] <= saved][-1], records[-1]):
    assert start["time/cache_hits"] > 0, start
  cached = [p.name for p in (resumed_runs.straight.parent / "compilation_cache").iterdir()]
  assert any(name.startswith("jit_train_step-") for name in cached), cached


def test_time_shares_add_up_to_the_wall_time(resumed_runs):
  for workdir in (resumed_runs.straight, resumed_runs.interrupted):
    final = _time_records(workdir)[-1]
    wall = final["time/wall_seconds"]
    seconds = {k[len("time/"):-len("_seconds")]: v for k, v in final.items()
               if k.endswith("_seconds") and k not in ("time/wall_seconds",
                                                       "time/time_to_first_step_seconds")}
    assert {"setup", "compilation", "train_steps", "data_wait", "evaluation", "music",
            "checkpoints", "other"} <= set(seconds)
    assert sum(seconds.values()) == pytest.approx(wall, rel=1e-6)
    assert sum(final[f"time/{c}_share"] for c in seconds) == pytest.approx(1.0, rel=1e-6)
    assert all(v >= 0 for c, v in seconds.items() if c != "other"), seconds
    assert abs(seconds["other"]) <= TIME_TOLERANCE * wall, seconds
    assert seconds["data_wait"] > 0 and seconds["music"] > 0


def test_score_equals_the_validation_nll_of_the_same_tokens(resumed_runs, tmp_path):
  """The final validation (one batch of 8 windows: positions 1..256 of the 300 tokens) equals
  perceivers-score's total on those tokens; a second checkpoint gives per-note differences."""
  piece = _validation_piece(resumed_runs)[:257]
  np.save(tmp_path / "validation.npy", piece)
  validation = [r for r in _records(resumed_runs.straight) if "eval/nll" in r][-1]
  assert validation["step"] == 20 and validation["eval/targets"] == 256

  (result,) = score.score_files(
      [str(tmp_path / "validation.npy")], str(tmp_path / "out"), str(resumed_runs.straight),
      compare=str(resumed_runs.interrupted), compare_step=resumed_runs.saved_at_sigterm[0])
  assert result["step"] == 20 and len(result["tokens"]["bits"]) == 256
  assert result["total_bits"] / score.BITS_PER_NAT == pytest.approx(
      validation["eval/nll"] * 256, rel=1e-5)
  notes = result["notes"]
  assert len(notes["bits"]) == len(result["compare"]["note_bits_difference"]) > 20
  for position, pitch in zip(notes["position"], notes["pitch"]):
    assert piece[position] == 3 + pitch  # each note's surprisal is its NOTE_ON token's.
  assert any(d != 0 for d in result["compare"]["note_bits_difference"])
  written = json.loads((tmp_path / "out" / "validation.json").read_text())
  assert written["total_bits"] == result["total_bits"]
  assert {p.name for p in (tmp_path / "out").iterdir()} == {
      "validation.json", "validation.png", "validation_difference.png"}


def test_bad_music_or_profile_settings_fail_before_any_work(tmp_path):
  from perceivers_jax.configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.eval.music.update(dict(every_evals=1, num_reference=1))
  with pytest.raises(config_base.ConfigError, match=r"config.eval.music.num_reference=1: .*>= 2"):
    music.evaluators(config, str(tmp_path / "run"), eval_source=[])
  config = tiny.get_config()
  config.profile.steps = (0, 5)
  with pytest.raises(config_base.InputError, match=r"config.profile.steps=\(0, 5\): .*positive"):
    train.train_and_evaluate(config, str(tmp_path / "run"), train_source=[], eval_source=[])
  assert not (tmp_path / "run").exists()
