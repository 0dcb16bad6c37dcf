"""Orbax checkpoints of the training state plus the Grain iterator, and preemption handling.

A checkpoint step holds two items: `state` (step, parameters, optimizer state: sharded jax
arrays, restored straight into the target shardings) and `data_iter` (the Grain iterator
state, one small JSON file per host), so a resumed run sees exactly the batches an
uninterrupted run would have seen.
"""

import signal
import threading
from typing import Any

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp

STATE = "state"
DATA_ITER = "data_iter"


class Checkpointer:
  """CheckpointManager over `directory`: interval saves, keep-N, async, iterator state."""

  def __init__(self, directory: str, checkpoint_config: ml_collections.ConfigDict, *,
               with_data_iter: bool = True):
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
    )
    self._manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)

  @property
  def directory(self):
    return self._manager.directory

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

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
  """Turns SIGTERM (preemption, `kill`) into a flag the training loop checks once per step.

  On a multi-host job jax's coordination service already watches for preemption; every host
  must stop at the same step, which `multihost_utils.reached_preemption_sync_point` agrees on.
  """

  def __init__(self):
    self._flag = threading.Event()
    self._previous = None
    self._multi_host = jax.process_count() > 1
    if not self._multi_host and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("Received signal %d: saving a checkpoint and exiting at the end of this step.",
                    signum)
    self._flag.set()

  def should_stop(self, step: int) -> bool:
    """True when the run must save and exit after `step`."""
    if self._multi_host:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._flag.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
