"""Orbax checkpoints of the training state plus the Grain iterator, and preemption handling.

A checkpoint step holds two items: `state` (step, parameters, optimizer state: sharded jax
arrays, restored straight into the target shardings) and `data_iter` (the Grain iterator
state, one small JSON file per host), so a resumed run sees exactly the batches an
uninterrupted run would have seen. Reading a checkpoint's parameters alone (sampling, export,
fine-tuning, --mode=eval) is `state/run_dir.py`'s.
"""

import os
import signal
import threading
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp

CHECKPOINTS = "checkpoints"  # workdir/checkpoints/STEP
STATE = "state"
DATA_ITER = "data_iter"


def checkpoint_dir(workdir: str) -> str:
  """Where the Orbax checkpoints of `workdir` live (local paths made absolute, as Orbax needs)."""
  if "://" not in workdir:
    workdir = os.path.abspath(workdir)
  return str(epath.Path(workdir) / CHECKPOINTS)


class Checkpointer:
  """CheckpointManager over `directory`: interval saves, keep-N, async, iterator state."""

  def __init__(self, directory: str, checkpoint_config: ml_collections.ConfigDict, *,
               with_data_iter: bool = True, clean_partial_saves: bool = False):
    """`clean_partial_saves`: delete the temporary folders (`*.orbax-checkpoint-tmp*`) of saves
    that never finished (the process was killed mid-write). Only the training run that writes
    `directory` may ask for it: a reader (export, evaluation) could delete a running job's
    save in progress."""
    self._with_data_iter = with_data_iter
    handlers = {STATE: ocp.StandardCheckpointHandler()}
    if with_data_iter:
      handlers[DATA_ITER] = grain.checkpoint.CheckpointHandler()
    # Interval policy kept here (steps divisible by every_steps): Orbax's own would also save
    # whichever step comes first in a fresh directory.
    self._every_steps = checkpoint_config.every_steps
    options = ocp.CheckpointManagerOptions(
        max_to_keep=checkpoint_config.keep,
        enable_async_checkpointing=checkpoint_config.async_save,
        create=True,
        cleanup_tmp_directories=clean_partial_saves,
    )
    self._manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)

  @property
  def directory(self):
    return self._manager.directory

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def saved_state_shapes(self, step: int) -> dict[str, Any]:
    """The shapes of checkpoint `step`'s state arrays, as a dict tree read from its metadata (a
    checkpoint written by an older version or config may lack a key or differ in a shape)."""
    return jax.tree.map(lambda leaf: tuple(leaf.shape),
                        dict(self._manager.item_metadata(step)[STATE]))

  def should_save(self, step: int) -> bool:
    """Whether the interval policy saves at `step`."""
    return step % self._every_steps == 0

  def save(self, step: int, state: Any, data_iter: Any = None, *, force: bool = False) -> bool:
    """Saves if the interval policy says so (or `force`); returns whether a save started."""
    if not (force or self.should_save(step)):
      return False
    items = {STATE: ocp.args.StandardSave(state)}
    if self._with_data_iter:
      items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    if saved:
      logging.info("Saving checkpoint at step %d to %s.", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
    """Restores `state` into the shapes/dtypes/shardings of `abstract_state`; sets `data_iter`."""
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    if self._with_data_iter:
      items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("Restored checkpoint step %d from %s.", step, self.directory)
    return restored[STATE]

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class PreemptionWatcher:
  """Turns SIGTERM (preemption, `kill`) and SIGINT (Ctrl-C) into a flag the training loop checks
  once per step: the run saves a checkpoint after the current step and exits normally.

  A second SIGINT ends the process at once (exit status 130, nothing saved; a half-written save
  leaves a temporary folder that the next run deletes). Python runs signal handlers only between
  Python bytecodes, not inside a long compilation or device wait, so the second one is counted
  by a thread reading the signal wakeup fd, which the C-level handler writes to at once.

  On a multi-host job jax's coordination service watches for SIGTERM on every host, and every
  host must stop at the same step, which `multihost_utils.reached_preemption_sync_point` agrees
  on; a SIGINT there is passed on to this process as SIGTERM so it takes the same path.
  """

  def __init__(self):
    self._flag = threading.Event()
    self._previous = {}
    self._wakeup = None
    self._multi_host = jax.process_count() > 1
    if threading.current_thread() is not threading.main_thread():
      return
    signals = (signal.SIGINT,) if self._multi_host else (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
      self._previous[signum] = signal.signal(signum, self._handle)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    self._wakeup = (read_fd, write_fd, signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False))
    threading.Thread(target=self._count_interrupts, args=(read_fd,), daemon=True).start()

  def _count_interrupts(self, read_fd: int) -> None:
    interrupts = 0
    while data := os.read(read_fd, 64):
      interrupts += data.count(signal.SIGINT)
      if interrupts >= 2:
        os.write(2, b"Second Ctrl-C: exiting at once without saving.\n")
        os._exit(130)  # pylint: disable=protected-access
    os.close(read_fd)

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      logging.warning("Ctrl-C: saving a checkpoint and exiting at the end of this step; press "
                      "Ctrl-C again to exit at once without saving.")
      if self._multi_host:
        os.kill(os.getpid(), signal.SIGTERM)  # to the coordination service's preemption notice.
        return
    else:
      logging.warning("Received signal %d: saving a checkpoint and exiting at the end of this "
                      "step.", signum)
    self._flag.set()

  def should_stop(self, step: int) -> bool:
    """True when the run must save and exit after `step`."""
    if self._multi_host:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._flag.is_set()

  def close(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}
    if self._wakeup is not None:
      read_fd, write_fd, previous_fd = self._wakeup
      signal.set_wakeup_fd(previous_fd)
      os.close(write_fd)  # the counting thread reads end-of-file, closes read_fd and ends.
      self._wakeup = None
