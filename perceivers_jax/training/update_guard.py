"""Which updates the train step applies, what the loop does about the others, and the check of
the parameters a run resumes or fine-tunes from (README "Training", "Rejected updates").

The step (train_step.py) rejects an update, keeping the previous parameters and optimizer state
(only the step counter and the data advance), when
  non-finite  a gradient, the loss or an updated parameter is NaN or infinite;
  exploded    an updated parameter has |x| > MAX_PARAM_ABS;
  too large   the update's global norm exceeds config.train.max_update_ratio times the
              parameters' global norm;
  loss spike  the loss is more than config.train.loss_spike_sigmas standard deviations above
              the mean of the losses of the last config.train.loss_spike_window accepted steps
              (checked once half of that window is filled).
0 turns the last two checks off. Every applied update passed every check, so every state the
loop holds, and every checkpoint it saves, did. The window of accepted losses is part of the
train state (`loss_window`, checkpointed): a resumed run judges each step exactly as an
uninterrupted one, and a rejected step's loss never enters it.

`UpdateGuard` reads each step's verdict one step late (the device never waits) and stops the
run with a one-line RejectedUpdateError or counts the skipped update
(config.train.on_bad_update).
"""

import dataclasses
import math
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax

from perceivers_jax import config_base
from perceivers_jax.state import checkpointing

ON_BAD_UPDATE = ("stop", "skip")
# No parameter of a healthy model comes near this; a state beyond it is never saved or resumed.
MAX_PARAM_ABS = 1e6
# The loss window's standard deviation is at least this (nats), so a near-constant loss (a
# memorised batch) does not turn rounding noise into a spike.
MIN_LOSS_STD = 1e-3

# Bits of the step's `rejected` metric, and what each means.
NONFINITE, EXPLODED, TOO_LARGE, LOSS_SPIKE = 1, 2, 4, 8


class RejectedUpdateError(config_base.InputError, FloatingPointError):
  """An update was rejected (config.train.on_bad_update="stop"), or the parameters to resume or
  fine-tune from are non-finite or exploded. The message names the step, the reason, the last
  good checkpoint and the settings to change, so the CLI prints it as one line."""


@dataclasses.dataclass(frozen=True)
class Limits:
  """The thresholds of config.train (0 turns a check off)."""
  max_update_ratio: float
  loss_spike_sigmas: float
  loss_spike_window: int

  @classmethod
  def of(cls, train_config: ml_collections.ConfigDict) -> "Limits":
    # A config.json written before these fields existed gets today's defaults.
    defaults = config_base.base_config().train
    return cls(**{f.name: train_config.get(f.name, defaults[f.name])
                  for f in dataclasses.fields(cls)})


def all_finite(tree: Any) -> jax.Array:
  """A bool scalar: every element of every floating leaf of `tree` is finite."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack([jnp.isfinite(x).all() for x in leaves]).all()


def max_abs(tree: Any) -> jax.Array:
  """The largest |x| over `tree`'s leaves (NaN if any is NaN)."""
  return jnp.stack([jnp.max(jnp.abs(x)) for x in jax.tree.leaves(tree)]).max()


def empty_loss_window(limits: Limits) -> dict[str, jax.Array]:
  """The losses of the last `loss_spike_window` accepted steps (a ring: `count` accepted so
  far, the next one written at count % window)."""
  return {"losses": jnp.zeros((limits.loss_spike_window,), jnp.float32),
          "count": jnp.zeros((), jnp.int32)}


def _loss_z(loss: jax.Array, window: dict[str, jax.Array]) -> jax.Array:
  """How many standard deviations `loss` lies above the window's mean; 0 until half of the
  window is filled."""
  size = window["losses"].shape[0]
  filled = jnp.minimum(window["count"], size)
  valid = jnp.arange(size) < filled
  n = jnp.maximum(filled, 1).astype(jnp.float32)
  mean = jnp.where(valid, window["losses"], 0.0).sum() / n
  std = jnp.sqrt(jnp.where(valid, jnp.square(window["losses"] - mean), 0.0).sum() / n)
  z = (loss.astype(jnp.float32) - mean) / jnp.maximum(std, MIN_LOSS_STD)
  return jnp.where(filled >= size // 2, z, 0.0)


def judge(loss: jax.Array, grads: Any, params: Any, updates: Any, new_params: Any,
          window: dict[str, jax.Array], limits: Limits) -> dict[str, Any]:
  """The verdict on one update, inside the jitted step: {"rejected": int32 bits (0 =
  accepted), "update_ratio", "loss_z", "loss_window": the window after this step}."""
  update_ratio = optax.tree.norm(updates) / optax.tree.norm(params)
  loss_z = _loss_z(loss, window)
  finite = all_finite(grads) & jnp.isfinite(loss) & all_finite(new_params)
  checks = ((NONFINITE, ~finite),
            (EXPLODED, max_abs(new_params) > MAX_PARAM_ABS),
            (TOO_LARGE, (limits.max_update_ratio > 0) & (update_ratio > limits.max_update_ratio)),
            (LOSS_SPIKE, (limits.loss_spike_sigmas > 0) & (loss_z > limits.loss_spike_sigmas)))
  rejected = sum(jnp.where(failed, bit, 0) for bit, failed in checks).astype(jnp.int32)
  accepted = rejected == 0
  count = window["count"]
  written = window["losses"].at[count % window["losses"].shape[0]].set(
      loss.astype(jnp.float32))
  return {"rejected": rejected, "update_ratio": update_ratio, "loss_z": loss_z,
          "loss_window": {"losses": jnp.where(accepted, written, window["losses"]),
                          "count": count + accepted.astype(jnp.int32)}}


def describe(rejected: int, verdict: dict[str, float], limits: Limits) -> str:
  """Why an update was rejected, in words (`verdict`: the step's loss, update_ratio, loss_z)."""
  reasons = []
  if rejected & NONFINITE:
    reasons.append("non-finite gradients, loss or parameters")
  if rejected & EXPLODED:
    reasons.append(f"parameters beyond +-{MAX_PARAM_ABS:g}")
  if rejected & TOO_LARGE:
    ratio = float(verdict["update_ratio"])
    size = (f"{ratio:.3g} times the parameters' norm" if math.isfinite(ratio)
            else "too large for float32 to measure its norm")
    reasons.append(f"an update {size} "
                   f"(config.train.max_update_ratio={limits.max_update_ratio:g})")
  if rejected & LOSS_SPIKE:
    reasons.append(f"a loss spike: loss {verdict['loss']:.4g} is {verdict['loss_z']:.3g} "
                   "standard deviations above the mean of the last "
                   f"{limits.loss_spike_window} accepted steps "
                   f"(config.train.loss_spike_sigmas={limits.loss_spike_sigmas:g})")
  return "; ".join(reasons)


class UpdateGuard:
  """Reads each step's verdict one step late (so the device never waits) and stops
  (RejectedUpdateError) or counts the skipped update, as config.train.on_bad_update says; keeps
  the largest update ratio and loss z since the last record (how close the run came).

  The step itself never applies a rejected update, so every state the loop holds, and hence
  every checkpoint it writes, passed every check; `settle()` runs before each save and log so
  that "stop" raises before a step after the bad update is saved or logged.
  """

  def __init__(self, mode: str, limits: Limits, ckpt: checkpointing.Checkpointer):
    self._mode, self._limits, self._ckpt = mode, limits, ckpt
    self._pending = None  # (step, metrics) not yet read.
    self._skipped, self._max_ratio, self._max_z = 0, 0.0, None  # since take_interval().

  def after_step(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self.settle()
    self._pending = (step, metrics)

  def settle(self) -> None:
    if self._pending is None:
      return
    step, metrics = self._pending
    self._pending = None
    verdict = jax.device_get({k: metrics[k] for k in ("rejected", "loss", "update_ratio",
                                                      "loss_z")})
    self._max_ratio = max(self._max_ratio, float(verdict["update_ratio"]))
    z = float(verdict["loss_z"])
    self._max_z = z if self._max_z is None else max(self._max_z, z)
    rejected = int(verdict["rejected"])
    if not rejected:
      return
    why = describe(rejected, verdict, self._limits)
    if self._mode == "skip":
      logging.warning("Skipped the update of step %d (config.train.on_bad_update=skip): %s; the "
                      "state stays that of step %d.", step, why, step - 1)
      self._skipped += 1
      return
    self._ckpt.wait_until_finished()
    latest = self._ckpt.latest_step()
    good = (f"The last good checkpoint is step {latest} in {self._ckpt.directory} (every saved "
            "step passed these checks); rerunning resumes from it." if latest is not None
            else "No checkpoint was saved yet; rerunning starts the run afresh.")
    raise RejectedUpdateError(
        f"Rejected the update of step {step}: {why}. Stopping (config.train.on_bad_update="
        f"stop); the update was not applied and nothing after it is saved. {good} Lower "
        "config.train.learning_rate, raise config.train.warmup_steps or check "
        "config.train.grad_clip_norm; or set config.train.on_bad_update=skip to skip such "
        "updates (README \"Training\" lists the checks and their thresholds).")

  def take_interval(self) -> dict[str, float]:
    """Skipped updates, largest update ratio and loss z since the previous call (z: negative
    when every loss was below its window's mean, 0 while the window fills)."""
    interval = {"skipped_updates": self._skipped, "max_update_ratio": self._max_ratio,
                "max_loss_z": self._max_z or 0.0}
    self._skipped, self._max_ratio, self._max_z = 0, 0.0, None
    return interval


def check_sane(params: Any, source: str, fix: str) -> None:
  """Refuses parameters to resume or fine-tune from that are non-finite or exploded
  (|x| > MAX_PARAM_ABS): `source` names them ("Checkpoint step 5 in DIR"), `fix` what to do."""
  largest = float(jax.device_get(jax.jit(max_abs)(params)))
  if not largest <= MAX_PARAM_ABS:  # NaN included.
    raise RejectedUpdateError(
        f"{source} holds parameters with |x| up to {largest:.3g}, beyond +-{MAX_PARAM_ABS:g} "
        f"(a diverged run saved them, before these checks existed): {fix}")
