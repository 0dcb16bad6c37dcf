"""The optimizer (OPTIMIZERS), gradient clipping and the learning-rate schedules of `config.train`.

Optimizers (config.train.optimizer, all with b1, b2 and the schedule below):
  adam:  Adam; config.train.weight_decay must be 0.
  adamw: AdamW, decoupled weight decay config.train.weight_decay (applied to every parameter).

Schedules (t = optimizer step, w = config.train.warmup_steps, lr = config.train.learning_rate):
  rsqrt:    lr * min(t * w**-1.5, t**-0.5): the Transformer's schedule, where lr is the width
            factor d**-0.5. The paper's "initial learning rate 0.03125" is 1024**-0.5; with
            w = 10,000 it peaks at 3.1e-4 (Perceiver AR's base_lr) at t = w, then decays.
  constant: linear warm-up from 0 to lr over w steps, then lr.
  cosine:   linear warm-up to lr, then cosine decay to 0 at config.train.num_steps.

Frozen parameter groups (config.train.freeze): `with_frozen_groups`.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ("adam", "adamw")


def make_schedule(train_config: ml_collections.ConfigDict) -> optax.Schedule:
  """The learning rate as a function of the optimizer step."""
  lr = train_config.learning_rate
  warmup = train_config.warmup_steps
  if train_config.schedule == "rsqrt":

    def rsqrt(step):
      t = jnp.maximum(step, 1).astype(jnp.float32)  # step 0 gets the step-1 rate, not zero.
      return lr * jnp.minimum(t * warmup**-1.5, t**-0.5)

    return rsqrt
  if train_config.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif train_config.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, max(train_config.num_steps - warmup, 1))
  else:
    raise ValueError(f"config.train.schedule={train_config.schedule!r}: "
                     "must be rsqrt, constant or cosine.")
  if not warmup:
    return main
  # Warm-up starts at lr/w so that the first update is not a no-op.
  ramp = optax.linear_schedule(lr / warmup, lr, warmup)
  return optax.join_schedules((ramp, main), boundaries=(warmup,))


def make_optimizer(train_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping (if grad_clip_norm > 0), then config.train.optimizer at the
  schedule's rate. The config is validated first (config_validation: a known optimizer,
  weight decay only with adamw)."""
  schedule = make_schedule(train_config)
  if train_config.optimizer == "adamw":
    adam = optax.adamw(schedule, b1=train_config.b1, b2=train_config.b2,
                       weight_decay=train_config.weight_decay)
  elif train_config.optimizer == "adam":
    adam = optax.adam(schedule, b1=train_config.b1, b2=train_config.b2)
  else:
    raise ValueError(f"config.train.optimizer={train_config.optimizer!r}: "
                     f"must be one of {', '.join(OPTIMIZERS)}.")
  if train_config.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(train_config.grad_clip_norm), adam)
  return adam


def with_frozen_groups(optimizer: optax.GradientTransformation,
                       frozen: Any) -> optax.GradientTransformation:
  """`optimizer` on the parameters where the bool tree `frozen` is False; zero updates and no
  optimizer state where it is True (clipping and Adam see only the trained gradients)."""
  labels = jax.tree.map(lambda f: "frozen" if f else "trained", frozen)
  return optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, labels)
