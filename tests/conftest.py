"""Shared fixtures: the real MAESTRO performances (fetched by `make test`); the environment
that keeps libtpu (installed by `make test` for the TPU compile tests) quiet off a TPU VM."""

import glob
import os
import pathlib

from perceivers_jax.parallel import topology  # no jax import: the environment comes first

# With libtpu installed, jax would start the TPU backend (and libtpu would ask a metadata
# server which TPU this is) on a machine that has none: the CPU backend only, unless asked
# otherwise (JAX_PLATFORMS) or on a TPU VM. TPU topologies are still described for compiling.
_ON_A_TPU_VM = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
if topology.has_libtpu() and not _ON_A_TPU_VM:
  for _name, _value in dict(topology.LIBTPU_QUIET_ENV, JAX_PLATFORMS="cpu").items():
    os.environ.setdefault(_name, _value)

import pytest

from data_prep import fetch_maestro_samples


def pytest_configure(config):
  config.addinivalue_line("markers", "tpu_compile: compiles for a TPU topology (needs libtpu; "
                          "`make test` installs it); select with -m tpu_compile")


@pytest.fixture(scope="session")
def maestro_paths() -> list[pathlib.Path]:
  """The 10 real MAESTRO pieces; `make test` fetches them before pytest starts."""
  paths = fetch_maestro_samples.sample_paths()
  missing = [p for p in paths if not p.exists()]
  if missing:
    pytest.fail(f"{len(missing)} MAESTRO test pieces missing under {missing[0].parent}: "
                "run `make fetch-data` (or `python -m data_prep.fetch_maestro_samples`).")
  return paths
