"""The multi-host flags of the commands that run on every worker (perceivers-train, -sample).

On TPU pods, SLURM and Open MPI jax finds the other processes itself; the flags (or
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) are for other GPU/CPU clusters.

When one process of a job dies (SIGKILL, out of memory, a lost host), the others cannot go on.
A collective with the dead process fails at once, and a barrier (a checkpoint's) fails once
the process has been silent for --heartbeat_timeout_s: `exit_when_a_process_fails` then prints
one line and exits. A process blocked where nothing fails (an NCCL collective) is ended by
jax's coordination service after that timeout too ("Terminating process because the JAX
distributed service detected fatal errors").
"""

import contextlib
import os
import sys
import traceback

from absl import flags

from perceivers_jax.cli import logs

_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multi-host GPU/CPU only).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 100, "Multi-host: seconds without a heartbeat after which a process "
    "counts as dead and every other process of the job exits (jax's default: 100).",
    lower_bound=1)


def initialize() -> bool:
  """`jax.distributed` start-up from the flags; must run before anything touches a backend."""
  from perceivers_jax.parallel import mesh  # pylint: disable=g-import-not-at-top
  return mesh.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                     _PROCESS_ID.value, _HEARTBEAT_TIMEOUT.value)


@contextlib.contextmanager
def exit_when_a_process_fails():
  """On a multi-host job, turns an exception other than bad input (a collective or a barrier
  that failed because another process died) into its traceback, one closing line saying what
  to do, and exit status 1 at once: jax's exit handler would wait for the lost process, then
  abort. Bad input (the same on every host) is left to `logs`."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    yield
  except Exception as error:  # pylint: disable=broad-except
    if jax.process_count() == 1 or logs.input_error_line(error) is not None:
      raise
    traceback.print_exc()
    first_line = (str(error).strip().splitlines() or [""])[0]
    print(f"error: process {jax.process_index()} of {jax.process_count()} stopped: "
          f"{type(error).__name__}: {first_line} -- a multi-host job stops when any of its "
          "processes does (killed, out of memory, its host lost); rerun the same command on "
          "every host to resume from the last checkpoint.", file=sys.stderr, flush=True)
    os._exit(1)  # pylint: disable=protected-access
