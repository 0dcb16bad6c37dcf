"""Shared fixtures: the real MAESTRO performances (fetched by `make test`)."""

import pathlib

import pytest

from data_prep import fetch_maestro_samples


@pytest.fixture(scope="session")
def maestro_paths() -> list[pathlib.Path]:
  """The 10 real MAESTRO pieces; `make test` fetches them before pytest starts."""
  paths = fetch_maestro_samples.sample_paths()
  missing = [p for p in paths if not p.exists()]
  if missing:
    pytest.fail(f"{len(missing)} MAESTRO test pieces missing under {missing[0].parent}: "
                "run `make fetch-data` (or `python -m data_prep.fetch_maestro_samples`).")
  return paths
