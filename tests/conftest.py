"""Shared fixtures: the real MAESTRO performances (fetched by `make test`); the environment
that keeps libtpu (installed by `make test` for the TPU compile tests) quiet off a TPU VM."""

import pathlib

from perceivers_jax.parallel import topology  # no jax import: the environment comes first

topology.keep_jax_off_absent_tpus()

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from data_prep import fetch_maestro_samples


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
