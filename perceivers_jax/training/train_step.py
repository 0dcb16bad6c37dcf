"""The train step: one guarded optimizer update from one global batch, its parts passed in.

  train_step(state, rest, batch, *, model, optimizer, limits, frozen, schedule,
             num_microbatches, dropout_seed, z_loss) -> (state, metrics)

`build_trainer` (train.py) binds the keyword parts with functools.partial and jits the step
with the train state's shardings, donating the state. The step:
  1. draws dropout from (dropout_seed, step) alone (`dropout_key`, `reseeded`), so a resumed
     run drops out exactly as an uninterrupted one;
  2. sums the gradients and losses over every target of the batch (`accumulated_grads`: in
     config.train.microbatches pieces, scanned, each with its own dropout key) and divides by
     the global number of targets, so any split gives the same mean;
  3. zeroes the gradients of frozen parameter groups (config.train.freeze), before clipping
     and the grad_norm metric;
  4. applies the optimizer's update only if `update_guard.judge` accepts it: a rejected one
     keeps the previous parameters and optimizer state (README "Rejected updates").

A batch is {"inputs", "positions", "targets"}: int32 [B, L] (`abstract_batch`).
"""

import functools
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import ml_collections
import optax

from perceivers_jax.model import losses
from perceivers_jax.parallel import partitioning
from perceivers_jax.state import model_state
from perceivers_jax.training import update_guard

State = dict[str, Any]
Batch = dict[str, Any]

BATCH_KEYS = ("inputs", "positions", "targets")


def abstract_batch(config: ml_collections.ConfigDict, batch_size: int,
                   sharding: NamedSharding) -> Batch:
  """ShapeDtypeStructs of a global batch of `batch_size` windows of config.model.max_length."""
  shape = (batch_size, config.model.max_length)
  return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for k in BATCH_KEYS}


def split_microbatches(batch: Batch, num_microbatches: int,
                       mesh: jax.sharding.Mesh) -> Batch:
  """[B, L] -> [M, B/M, L], microbatch m = rows m, M+m, 2M+m, ...

  Interleaving keeps every microbatch spread over all batch shards (a plain reshape would put
  each microbatch on a subset of devices).
  """
  def split(x):
    b = x.shape[0]
    x = x.reshape(b // num_microbatches, num_microbatches, *x.shape[1:])
    x = jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, PartitionSpec(partitioning.BATCH_AXES)))
    return jnp.swapaxes(x, 0, 1)
  return {k: split(v) for k, v in batch.items()}


def dropout_key(dropout_seed: int, step: jax.Array) -> jax.Array:
  """The key of step `step`'s dropout masks: a function of (seed, step) only."""
  return jax.random.fold_in(jax.random.key(dropout_seed), step)


def _rng_stream_names(rest: nnx.State) -> tuple[str, ...]:
  names = set()
  for _, var in nnx.to_flat_state(rest):
    if isinstance(var, nnx.RngKey):
      names.add(var.tag)
  return tuple(sorted(names))


def reseeded(model: model_state.ModelState, params: Any, rest: nnx.State,
             key: jax.Array) -> nnx.State:
  """`rest` with every RNG stream reset from `key`: dropout depends only on `key`."""
  rng_streams = _rng_stream_names(rest)
  if not rng_streams:
    return rest
  merged = model.merge(params, rest)
  nnx.reseed(merged, policy="match_shape", **{name: key for name in rng_streams})
  return model_state.split(merged)[1]


def loss_fn(params: Any, rest: nnx.State, batch: Batch, *, model: model_state.ModelState,
            z_loss: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(nll + z_loss summed over the batch's targets, the sums): a sum, so that microbatches
  add up; the step divides by the global number of targets."""
  logits_BNV = model.merge(params, rest)(batch["inputs"], batch["positions"],
                                         deterministic=False)
  sums = losses.sum_losses(losses.token_losses(logits_BNV, batch,
                                               model.config.model.num_latents, z_loss))
  return sums["nll"] + sums["z_loss"], sums


def accumulated_grads(grad_fn, model: model_state.ModelState, params: Any, rest: nnx.State,
                      batch: Batch, key: jax.Array, num_microbatches: int) -> tuple[Any, Any]:
  """(gradient sums, loss sums) of `grad_fn` over `batch`: in one piece, or scanned over
  `num_microbatches` interleaved microbatches, microbatch i with dropout from fold_in(key, i)."""
  if num_microbatches == 1:
    return grad_fn(params, reseeded(model, params, rest, key), batch)
  micro = split_microbatches(batch, num_microbatches, model.mesh)

  def body(carry, xs):
    index, microbatch = xs
    micro_rest = reseeded(model, params, rest, jax.random.fold_in(key, index))
    grads, sums = grad_fn(params, micro_rest, microbatch)
    return jax.tree.map(jnp.add, carry, (grads, sums)), None

  zero = jax.tree.map(jnp.zeros_like,
                      jax.eval_shape(grad_fn, params, rest, jax.tree.map(lambda x: x[0], micro)))
  (grads, sums), _ = jax.lax.scan(body, zero, (jnp.arange(num_microbatches), micro))
  return grads, sums


def train_step(state: State, rest: nnx.State, batch: Batch, *, model: model_state.ModelState,
               optimizer: optax.GradientTransformation, limits: update_guard.Limits,
               frozen: Any, schedule: optax.Schedule, num_microbatches: int, dropout_seed: int,
               z_loss: float) -> tuple[State, dict[str, jax.Array]]:
  """One step on the global `batch` (see the module docstring); `frozen`: the bool tree of
  frozen parameters, or None. Returns the new state and the step's scalar metrics."""
  step = state["step"]
  params = state["params"]
  grad_fn = jax.grad(functools.partial(loss_fn, model=model, z_loss=z_loss), has_aux=True)
  grads, sums = accumulated_grads(grad_fn, model, params, rest, batch,
                                  dropout_key(dropout_seed, step), num_microbatches)
  # Exact mean over every target of the global batch, however it was split.
  count = jnp.maximum(sums["count"], 1.0)
  grads = jax.tree.map(lambda g: g / count, grads)
  if frozen is not None:  # unused: without microbatches XLA then skips computing them.
    grads = jax.tree.map(lambda g, f: jnp.zeros_like(g) if f else g, grads, frozen)
  updates, opt_state = optimizer.update(grads, state["opt_state"], params)
  new_params = optax.apply_updates(params, updates)
  loss = losses.mean_loss(sums)
  # A rejected update is never applied: the previous parameters and optimizer state stay
  # (donation lets XLA select in place). The loop stops or counts it (config.train.on_bad_update).
  verdict = update_guard.judge(loss, grads, params, updates, new_params, state["loss_window"],
                               limits)
  keep = lambda new, old: jnp.where(verdict["rejected"] == 0, new, old)
  new_state = {"step": step + 1, "params": jax.tree.map(keep, new_params, params),
               "opt_state": jax.tree.map(keep, opt_state, state["opt_state"]),
               "loss_window": verdict["loss_window"]}
  metrics = {
      "rejected": verdict["rejected"],
      "update_ratio": verdict["update_ratio"],
      "loss_z": verdict["loss_z"],
      "loss": loss,
      "nll": sums["nll"] / count,
      "accuracy": sums["correct"] / count,
      "targets": sums["count"],
      "grad_norm": optax.tree.norm(grads),
      "lr": schedule(step),
  }
  return new_state, metrics
