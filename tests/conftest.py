"""Shared fixtures: the real MAESTRO performances (fetched by `make test`); the slow
training run, straight and interrupted (read by train_test and watch_test); the environment
that keeps libtpu (installed by `make test` for the TPU compile tests) quiet off a TPU VM."""

import pathlib

from perceivers_jax.parallel import topology  # no jax import: the environment comes first

topology.keep_jax_off_absent_tpus()

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from data_prep import fetch_maestro_samples
import slow_training_run

ROOT = pathlib.Path(__file__).resolve().parents[1]


def pytest_configure(config):
  config.addinivalue_line("markers", "tpu_compile: compiles for a TPU topology (needs libtpu; "
                          "`make test` installs it); select with -m tpu_compile")


@pytest.fixture(scope="session")
def maestro_paths() -> list[pathlib.Path]:
  """The 10 real MAESTRO pieces; `make test` fetches them before pytest starts."""
  paths = fetch_maestro_samples.sample_paths(
      pathlib.Path(__file__).resolve().parents[1] / fetch_maestro_samples.DEFAULT_DEST)
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
                                                    ROOT / "perceivers_jax" / "configs" / "tiny.py")
