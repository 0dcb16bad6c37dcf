"""Accelerator targets to compile for from any host: TPU slice names -> their devices and HBM.

`perceivers-train --dry_run --compile_topology=v5p-32` (and `perceivers-sample`'s) builds the
mesh over `target_devices("v5p-32", num_slices)`: compile-only devices that libtpu describes
on a CPU host (`jax.experimental.topologies`), so the real step compiles for that slice as
MaxText's train_compile.py does, and the compiled memory is compared with `Target.hbm_bytes`.

Names follow Cloud TPU: v4-N and v5p-N count TensorCores (two per chip, one jax device per
chip, "megacore"), v5e-N and v6e-N count chips. A target is a platform plus how to describe
its devices, so another platform (a GPU node) is one more entry of `TARGETS` and one more
branch of `target_devices`. Needs libtpu (`pip install -e '.[tpu]'`; `make test` installs it).
"""

import dataclasses
import importlib.util
import os

from perceivers_jax import config_base

_GIB = 2**30
# libtpu's start-up asks the cloud metadata server which TPU it runs on: off a TPU VM these
# say there is nothing to ask, so describing a topology is quiet and quick; and several
# processes may compile at once (libtpu otherwise locks /tmp/libtpu_lockfile for one).
LIBTPU_QUIET_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5p-8",
                    "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


@dataclasses.dataclass(frozen=True)
class Target:
  """One slice of an accelerator: what libtpu needs to describe its devices, and its chips."""
  name: str
  platform: str
  topology: str  # libtpu's topology name, e.g. "v5p:2x2x4"
  chip_config: str  # "megacore": one jax device per chip of two TensorCores
  chips_per_host: tuple[int, int, int]
  chips: int
  hbm_bytes: int  # per chip


def _tpu(generation: str, name_count_per_chip: int, chip_config: str, hbm_gib: int,
         shapes: dict[int, str], host: tuple[int, int, int] = (2, 2, 1),
         single_host_chips: int = 4) -> dict[str, Target]:
  targets = {}
  for chips, shape in shapes.items():
    bounds = host if chips > single_host_chips else tuple(
        int(x) for x in (shape.split("x") + ["1"])[:3])
    name = f"{generation}-{chips * name_count_per_chip}"
    targets[name] = Target(name, "tpu", f"{generation}:{shape}", chip_config, bounds, chips,
                           hbm_gib * _GIB)
  return targets


_CUBES = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
          256: "4x8x8"}
_PLANES = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
# HBM per chip from the Cloud TPU system-architecture pages: v4 32 GiB, v5p 95 GiB, v5e
# 16 GiB, v6e 32 GiB. v5e-8 and v6e-8 are single hosts of 8 chips.
TARGETS: dict[str, Target] = {
    **_tpu("v4", 2, "megacore", 32, _CUBES),
    **_tpu("v5p", 2, "megacore", 95, _CUBES),
    **_tpu("v5e", 1, "default", 16, _PLANES, single_host_chips=8),
    **_tpu("v6e", 1, "default", 32, _PLANES, single_host_chips=8),
}


def target(name: str) -> Target:
  """The target called `name` (an InputError naming the known ones otherwise)."""
  if name not in TARGETS:
    raise config_base.InputError(
        f"--compile_topology={name}: unknown target; use one of {', '.join(TARGETS)}.")
  return TARGETS[name]


def quiet_libtpu() -> None:
  """Environment for describing TPU topologies on a host that is no TPU VM: only the CPU
  backend starts, and libtpu asks no metadata server (values already set are kept)."""
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_platforms:  # jax read JAX_PLATFORMS when it was imported
    jax.config.update("jax_platforms", "cpu")
  for name, value in LIBTPU_QUIET_ENV.items():
    os.environ.setdefault(name, value)


def has_libtpu() -> bool:
  """Is libtpu installed beside jax (what describes and compiles for TPU topologies)?"""
  return importlib.util.find_spec("libtpu") is not None


def target_devices(name: str, num_slices: int = 1) -> list:
  """The compile-only devices of `num_slices` slices of target `name` (slice_index set when
  there are several)."""
  spec = target(name)
  if num_slices < 1:
    raise config_base.InputError(
        f"--compile_topology_num_slices={num_slices}: must be a positive number of slices.")
  if spec.platform == "tpu" and not has_libtpu():
    raise config_base.InputError(
        f"--compile_topology={name}: libtpu is not installed, and it is what compiles for TPU "
        "topologies; install it beside jax: pip install -e '.[tpu]'.")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  devices = list(topologies.get_topology_desc(
      platform=spec.platform, topology_name=spec.topology, chip_config_name=spec.chip_config,
      chips_per_host_bounds=spec.chips_per_host, num_slices=num_slices).devices)
  if len(devices) != spec.chips * num_slices:
    raise RuntimeError(f"libtpu describes {len(devices)} devices for {num_slices} x {name}, "
                       f"not {spec.chips * num_slices}.")
  return devices
