"""Multi-host start-up and the (data, fsdp, tensor) device mesh built from `config.mesh`.

The mesh has two levels, as MaxText's ici_*/dcn_* parallelism: `config.mesh.data`, `fsdp`,
`tensor` split the devices of one slice (a TPU slice's ICI, a GPU node's NVLink), and
`dcn_data`, `dcn_fsdp`, `dcn_tensor` split the slices (the data-centre network between
them). Each mesh axis is the product of its two levels (a 2 x v5p-32 job with data=1,
fsdp=-1 and dcn_data=-1 has data 2, fsdp 16); devices of one slice are neighbours along the
slice level (jax's hybrid device mesh), so only the DCN level's collectives cross slices.
One axis per level may be -1 (the rest of that level). With one slice every dcn_* is 1.
"""

import math
import os

from absl import logging
import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh
import ml_collections

from perceivers_jax import config_base

MESH_AXES = ("data", "fsdp", "tensor")
DCN_AXES = tuple(f"dcn_{axis}" for axis in MESH_AXES)  # config.mesh fields of the DCN level
# The DCN level of configs saved before it existed: data parallelism across slices.
_DCN_DEFAULTS = {"dcn_data": -1, "dcn_fsdp": 1, "dcn_tensor": 1}

# Environment markers of a multi-host launch that `jax.distributed.initialize()` auto-detects.
_AUTO_DETECT_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS",
                    "OMPI_COMM_WORLD_SIZE")


def _multi_host_environment() -> bool:
  for name in _AUTO_DETECT_ENV:
    value = os.environ.get(name, "")
    if name == "TPU_WORKER_HOSTNAMES" and "," in value:
      return True
    if name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE") and value.isdigit() and int(value) > 1:
      return True
    if name == "MEGASCALE_COORDINATOR_ADDRESS" and value:
      return True
  return False


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Calls `jax.distributed.initialize()` when this is one process of a multi-host job.

  Must run before anything touches a jax backend. Explicit arguments (or the environment
  variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) are used for GPU/CPU
  clusters; TPU pods, SLURM and Open MPI launches are auto-detected by jax. Returns whether
  distributed mode was initialised.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("A coordinator address needs num_processes and process_id too "
                       "(flags or JAX_NUM_PROCESSES / JAX_PROCESS_ID).")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif _multi_host_environment():
    jax.distributed.initialize()
  else:
    return False
  logging.info("jax.distributed initialised: process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def num_slices(devices) -> int:
  """Slices the devices span (TPU devices of a multi-slice job carry a slice_index)."""
  return len({getattr(d, "slice_index", 0) or 0 for d in devices})


def platform(mesh: Mesh) -> str:
  """The platform of the mesh's devices ('tpu' for a TPU topology compiled for on a CPU)."""
  return mesh.devices.flat[0].platform


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: all), slices along the DCN level."""
  devices = jax.devices() if devices is None else list(devices)
  slices = num_slices(devices)
  slice_shape, dcn_shape = resolve_mesh_levels(mesh_config, len(devices), slices)
  # Auto axes: shardings come from the logical-axis rules and GSPMD propagation.
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if slices == 1:
    return jax.make_mesh(slice_shape, MESH_AXES, axis_types=axis_types, devices=devices)
  grid = mesh_utils.create_hybrid_device_mesh(slice_shape, dcn_shape, devices)
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


def data_mesh(devices=None) -> Mesh:
  """A data-only mesh over `devices` (default: all): parameters replicated, batch rows split."""
  return make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)), devices)


def _resolve_level(fields: tuple[str, ...], sizes: list, num_devices: int, what: str) -> list:
  for field, size in zip(fields, sizes):
    if isinstance(size, bool) or not isinstance(size, int) or (size <= 0 and size != -1):
      config_base.fail(f"mesh.{field}", size,
                       "must be a positive integer or -1 (filled with the remaining devices).")
  given = dict(zip(fields, sizes))
  free = [i for i, size in enumerate(sizes) if size == -1]
  if len(free) > 1:
    config_base.fail("mesh", given, f"at most one of {', '.join(fields)} may be -1.")
  fixed = math.prod(size for size in sizes if size != -1)
  if free:
    if num_devices % fixed:
      config_base.fail("mesh", given, f"the fixed axes multiply to {fixed}, which does not "
                       f"divide the {num_devices} {what}.")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    config_base.fail("mesh", given, f"the axes multiply to {fixed} but there are {num_devices} "
                     f"{what}; set one axis to -1.")
  return sizes


def resolve_mesh_levels(mesh_config: ml_collections.ConfigDict, num_devices: int,
                        slices: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """((data, fsdp, tensor) within a slice, the same across slices), -1s filled in; raises
  ConfigError if impossible. Configs without dcn_* fields get data parallelism across slices."""
  if num_devices % slices:
    config_base.fail("mesh", dict(mesh_config), f"{num_devices} devices do not split evenly "
                     f"into {slices} slices.")
  slice_sizes = _resolve_level(MESH_AXES, [mesh_config[axis] for axis in MESH_AXES],
                               num_devices // slices, "devices of a slice" if slices > 1
                               else "devices")
  dcn_sizes = _resolve_level(DCN_AXES, [mesh_config.get(f, _DCN_DEFAULTS[f]) for f in DCN_AXES],
                             slices, "slices")
  return tuple(slice_sizes), tuple(dcn_sizes)


def resolve_mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int,
                       slices: int = 1) -> tuple[int, ...]:
  """(data, fsdp, tensor) sizes of the whole mesh: each axis's slice and DCN levels multiplied."""
  slice_sizes, dcn_sizes = resolve_mesh_levels(mesh_config, num_devices, slices)
  return tuple(a * b for a, b in zip(slice_sizes, dcn_sizes))
