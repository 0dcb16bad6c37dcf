"""Multi-host start-up and the (data, fsdp, tensor) device mesh built from `config.mesh`."""

import math
import os

from absl import logging
import jax
from jax.sharding import AxisType, Mesh
import ml_collections

from perceivers_jax import config_base

MESH_AXES = ("data", "fsdp", "tensor")

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
                           process_id: int | None = None,
                           heartbeat_timeout_s: int | None = None) -> bool:
  """Calls `jax.distributed.initialize()` when this is one process of a multi-host job.

  Must run before anything touches a jax backend. Explicit arguments (or the environment
  variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) are used for GPU/CPU
  clusters; TPU pods, SLURM and Open MPI launches are auto-detected by jax.
  `heartbeat_timeout_s` (None: jax's default, 100 s): a process silent that long counts as
  dead, and jax's coordination service then ends every other process. Returns whether
  distributed mode was initialised.
  """
  timeouts = ({} if heartbeat_timeout_s is None
              else {"heartbeat_timeout_seconds": heartbeat_timeout_s})
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("A coordinator address needs num_processes and process_id too "
                       "(flags or JAX_NUM_PROCESSES / JAX_PROCESS_ID).")
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **timeouts)
  elif _multi_host_environment():
    jax.distributed.initialize(**timeouts)
  else:
    return False
  logging.info("jax.distributed initialised: process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: all); one axis size may be -1."""
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_mesh_shape(mesh_config, len(devices))
  # Auto axes: shardings come from the logical-axis rules and GSPMD propagation.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def data_mesh(devices=None) -> Mesh:
  """A data-only mesh over `devices` (default: all): parameters replicated, batch rows split."""
  return make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)), devices)


def resolve_mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """(data, fsdp, tensor) sizes with the one -1 axis filled in; raises ConfigError if impossible."""
  sizes = [mesh_config[axis] for axis in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes):
    if not isinstance(size, int) or (size <= 0 and size != -1):
      config_base.fail(f"mesh.{axis}", size,
            "must be a positive integer or -1 (filled with the remaining devices).")
  free = [i for i, size in enumerate(sizes) if size == -1]
  if len(free) > 1:
    config_base.fail("mesh", dict(zip(MESH_AXES, sizes)), "at most one axis may be -1.")
  fixed = math.prod(size for size in sizes if size != -1)
  if free:
    if num_devices % fixed:
      config_base.fail("mesh", dict(zip(MESH_AXES, sizes)),
            f"the fixed axes multiply to {fixed}, which does not divide the {num_devices} devices.")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    config_base.fail("mesh", dict(zip(MESH_AXES, sizes)),
          f"the axes multiply to {fixed} but there are {num_devices} devices; set one axis to -1.")
  return tuple(sizes)
