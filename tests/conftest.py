"""Shared fixtures: the real MAESTRO performances (fetched by `make test`) and the slow
training run, straight and interrupted (read by train_test and watch_test)."""

import pathlib

import pytest

from data_prep import fetch_maestro_samples
import slow_training_run

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def maestro_paths() -> list[pathlib.Path]:
  """The 10 real MAESTRO pieces; `make test` fetches them before pytest starts."""
  paths = fetch_maestro_samples.sample_paths()
  missing = [p for p in paths if not p.exists()]
  if missing:
    pytest.fail(f"{len(missing)} MAESTRO test pieces missing under {missing[0].parent}: "
                "run `make fetch-data` (or `python -m data_prep.fetch_maestro_samples`).")
  return paths


@pytest.fixture(scope="session")
def resumed_runs(maestro_paths, tmp_path_factory) -> slow_training_run.Runs:
  """slow_training_run.RESUMED_RUN straight through and interrupted by SIGTERM then rerun,
  on the first three pieces (two to train on, 300 tokens of the third to validate on)."""
  directory = tmp_path_factory.mktemp("resumed_runs")
  _, pieces = slow_training_run.save_pieces(maestro_paths[:3], directory)
  return slow_training_run.straight_and_interrupted(pieces, directory,
                                                    ROOT / "configs" / "tiny.py")
