"""The multi-host flags of the commands that run on every worker (perceivers-train, -sample).

On TPU pods, SLURM and Open MPI jax finds the other processes itself; the flags (or
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) are for other GPU/CPU clusters.
"""

from absl import flags

_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multi-host GPU/CPU only).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def initialize() -> bool:
  """`jax.distributed` start-up from the flags; must run before anything touches a backend."""
  from perceivers_jax.parallel import mesh  # pylint: disable=g-import-not-at-top
  return mesh.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                     _PROCESS_ID.value)
