"""Finite state only (config.train.on_nonfinite): the check each train step makes, what the
loop does when an update is not finite, and the check of a checkpoint to resume from.

The step never applies a non-finite update (train.py), so no checkpoint holds one;
`NonFiniteGuard` then stops the run with a one-line NonFiniteError or counts the skipped
update.
"""

from typing import Any

from absl import logging
import jax
import jax.numpy as jnp

from perceivers_jax import config_base
from perceivers_jax.state import checkpointing


class NonFiniteError(config_base.InputError, FloatingPointError):
  """An update had non-finite gradients or parameters (config.train.on_nonfinite="stop"), or a
  checkpoint to resume from holds non-finite parameters. The message names the step, the last
  good checkpoint and the settings to change, so the CLI prints it as one line."""


def all_finite(tree: Any) -> jax.Array:
  """A bool scalar: every element of every floating leaf of `tree` is finite."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack([jnp.isfinite(x).all() for x in leaves]).all()


class NonFiniteGuard:
  """Reads each step's `nonfinite` flag one step late (so the device never waits) and stops
  (NonFiniteError) or counts the skipped update, as config.train.on_nonfinite says.

  The step itself never applies a non-finite update, so every state the loop holds, and hence
  every checkpoint it writes, has finite parameters; `settle()` runs before each save and log so
  that "stop" raises before a step after the bad update is saved or logged.
  """

  def __init__(self, mode: str, ckpt: checkpointing.Checkpointer):
    self._mode, self._ckpt = mode, ckpt
    self._pending = None  # (step, metrics) not yet read.
    self.skipped = 0  # skipped updates since the last take_skipped().

  def after_step(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self.settle()
    self._pending = (step, metrics)

  def settle(self) -> None:
    if self._pending is None:
      return
    step, metrics = self._pending
    self._pending = None
    if not int(metrics["nonfinite"]):
      return
    if self._mode == "skip":
      logging.warning("Non-finite gradients or parameters in the update of step %d: skipped "
                      "(config.train.on_nonfinite=skip); the state stays that of step %d.",
                      step, step - 1)
      self.skipped += 1
      return
    self._ckpt.wait_until_finished()
    latest = self._ckpt.latest_step()
    good = (f"The last good checkpoint is step {latest} in {self._ckpt.directory} (every saved "
            "step has finite parameters); rerunning resumes from it." if latest is not None
            else "No checkpoint was saved yet; rerunning starts the run afresh.")
    raise NonFiniteError(
        f"Non-finite gradients or parameters in the update of step {step}: stopping "
        f"(config.train.on_nonfinite=stop); the update was not applied and nothing after it is "
        f"saved. {good} Lower config.train.learning_rate, raise config.train.warmup_steps or "
        "check config.train.grad_clip_norm, or set config.train.on_nonfinite=skip to skip such "
        "updates.")

  def take_skipped(self) -> int:
    skipped, self.skipped = self.skipped, 0
    return skipped


def check_restored_finite(state: dict[str, Any], step: int, directory: str) -> None:
  if not bool(jax.device_get(jax.jit(all_finite)(state["params"]))):
    raise NonFiniteError(
        f"Checkpoint step {step} in {directory} holds non-finite parameters (saved by a version "
        "without this check): delete that step's folder to resume from an earlier one.")
