"""Checks a config before anything is built or compiled.

Every failure raises `ConfigError` naming the field, its value and what would fix it, so a bad
`--config.x=y` override fails in a second instead of after a long compilation.
"""

from collections.abc import Sequence
import math

from absl import logging
import jax
from jax.sharding import Mesh
import ml_collections

from perceivers_jax import config_base
from perceivers_jax.data import tokens
from perceivers_jax.data import windows
from perceivers_jax.model import attention
from perceivers_jax.model import masks
from perceivers_jax.model import param_groups
from perceivers_jax.model import perceivers as model_lib
from perceivers_jax.model import splash
from perceivers_jax.parallel import mesh as mesh_lib
from perceivers_jax.state import model_state
from perceivers_jax.training import optimizer as optimizer_lib
from perceivers_jax.training import update_guard

SCHEDULES = ("rsqrt", "constant", "cosine")
DTYPES = ("float32", "bfloat16", "float16")


ConfigError = config_base.ConfigError
_fail = config_base.fail


def _check_choice(config: ml_collections.ConfigDict, field: str, choices: Sequence[str]) -> None:
  value = _get(config, field)
  if value not in choices:
    _fail(field, value, f"must be one of {', '.join(choices)}.")


def _check_positive(config: ml_collections.ConfigDict, field: str) -> None:
  value = _get(config, field)
  if not isinstance(value, int) or value <= 0:
    _fail(field, value, "must be a positive integer.")


def _get(config: ml_collections.ConfigDict, field: str):
  node = config
  for part in field.split("."):
    if part not in node:
      raise ConfigError(f"config.{field} is missing: start the config from "
                        "perceivers_jax.config_base.base_config().")
    node = node[part]
  return node


def job_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """Validates `config` for this job's devices (or `devices`: e.g. a TPU topology's, compiled
  for from another host), then builds its mesh (config.mesh)."""
  if devices is None:
    devices, process_count = jax.devices(), jax.process_count()
  else:
    process_count = len({d.process_index for d in devices})
  validate(config, num_devices=len(devices), process_count=process_count,
           num_slices=mesh_lib.num_slices(devices))
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  logging.info("Mesh %s over %d devices (%s).", dict(mesh.shape), mesh.size,
               devices[0].device_kind)
  return mesh


def validate(config: ml_collections.ConfigDict, *, num_devices: int,
             process_count: int = 1, num_slices: int = 1) -> None:
  """Raises ConfigError for the first value that cannot work with `num_devices` devices on
  `process_count` hosts in `num_slices` slices."""
  model = config.model
  for field in ("vocab_size", "max_length", "num_latents", "embed_dim", "num_heads", "head_dim",
                "mlp_ratio", "num_latent_layers", "attention_chunk_size"):
    _check_positive(config, f"model.{field}")
  if model.vocab_size < tokens.VOCAB_SIZE:
    _fail("model.vocab_size", model.vocab_size,
          f"the token vocabulary has {tokens.VOCAB_SIZE} ids (perceivers_jax/data/tokens.py).")
  if model.num_latents > model.max_length:
    _fail("model.num_latents", model.num_latents,
          f"N must be <= config.model.max_length (L={model.max_length}).")
  _check_choice(config, "model.attention_impl", attention.ATTENTION_IMPLS)
  if model.attention_impl == "splash":  # off a TPU: Pallas interpret mode, for tests only
    if not splash.fits(model.num_latents):
      _fail("model.attention_impl", "splash",
            f"splash needs config.model.num_latents (N={model.num_latents}) to be a multiple "
            f"of {splash.BLOCK}; use auto.")
    if config.data.padding_side != "left":
      _fail("model.attention_impl", "splash",
            "splash's slot masks need config.data.padding_side='left'; use auto.")
  _check_choice(config, "model.remat_policy", model_lib.REMAT_POLICIES)
  _check_choice(config, "model.scale_mask", masks.SCALE_MASKS)
  _check_choice(config, "model.combine", model_lib.COMBINES)
  _check_choice(config, "model.embedding_init", tuple(model_lib.EMBEDDING_INITS))
  epsilon = _get(config, "model.layer_norm_epsilon")
  if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
    _fail("model.layer_norm_epsilon", epsilon, "must be a number > 0 (1e-5: Haiku's default).")
  _check_choice(config, "model.dtype", DTYPES)
  _check_choice(config, "model.param_dtype", DTYPES)
  scales = tuple(model.cross_attention_scales)
  if not scales:
    _fail("model.cross_attention_scales", scales, "needs at least one scale (0 = full context).")
  for scale in scales:
    if not isinstance(scale, int) or scale < 0:
      _fail("model.cross_attention_scales", scales,
            "each scale must be 0 (full context) or a positive window W.")
  if not 0.0 <= model.rotary_fraction <= 1.0:
    _fail("model.rotary_fraction", model.rotary_fraction, "must be in [0, 1].")
  if not 0.0 <= model.dropout_rate < 1.0:
    _fail("model.dropout_rate", model.dropout_rate, "must be in [0, 1).")
  if model.max_wavelength < 0:
    _fail("model.max_wavelength", model.max_wavelength, "must be >= 0 (0 means max_length).")

  _check_choice(config, "data.windows", windows.WINDOW_KINDS)
  _check_choice(config, "data.padding_side", windows.PADDING_SIDES)

  train = config.train
  _check_choice(config, "train.optimizer", optimizer_lib.OPTIMIZERS)
  if train.weight_decay < 0:
    _fail("train.weight_decay", train.weight_decay, "must be >= 0.")
  if train.weight_decay and train.optimizer != "adamw":
    _fail("train.weight_decay", train.weight_decay,
          f"weight decay needs config.train.optimizer='adamw' (it is {train.optimizer!r}); "
          "set config.train.optimizer=adamw or config.train.weight_decay=0.")
  _check_choice(config, "train.on_bad_update", update_guard.ON_BAD_UPDATE)
  for field in ("max_update_ratio", "loss_spike_sigmas"):
    value = _get(config, f"train.{field}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
      _fail(f"train.{field}", value, "must be a number >= 0 (0 turns the check off).")
  window = _get(config, "train.loss_spike_window")
  if isinstance(window, bool) or not isinstance(window, int) or window < 4:
    _fail("train.loss_spike_window", window,
          "must be an integer >= 4 (the loss-spike check starts once half of it is filled).")
  _check_choice(config, "train.schedule", SCHEDULES)
  for field in ("batch_size", "microbatches", "num_steps"):
    _check_positive(config, f"train.{field}")
  if train.learning_rate <= 0:
    _fail("train.learning_rate", train.learning_rate, "must be > 0.")
  if train.warmup_steps < 0:
    _fail("train.warmup_steps", train.warmup_steps, "must be >= 0.")
  if train.schedule == "rsqrt" and train.warmup_steps == 0:
    _fail("train.warmup_steps", 0, "the rsqrt schedule needs warm-up steps > 0.")

  _check_freeze(config)

  mesh_shape = mesh_lib.resolve_mesh_shape(config.mesh, num_devices, num_slices)
  batch_shards = mesh_shape[0] * mesh_shape[1]  # data x fsdp (both levels) split the batch.
  if train.batch_size % train.microbatches:
    _fail("train.batch_size", train.batch_size,
          f"must be divisible by config.train.microbatches={train.microbatches}.")
  microbatch = train.batch_size // train.microbatches
  rows = math.lcm(batch_shards * train.microbatches, process_count)
  if microbatch % batch_shards or train.batch_size % process_count:
    _fail("train.batch_size", train.batch_size,
          f"each of the {train.microbatches} microbatch(es) must split evenly over the "
          f"{batch_shards} batch shards of mesh {dict(zip(mesh_lib.MESH_AXES, mesh_shape))} "
          f"(data x fsdp) and the batch over {process_count} host(s): use a multiple of "
          f"{rows} (e.g. --config.train.batch_size={rows}), or move devices to "
          "config.mesh.tensor.")
  _check_positive(config, "eval.batch_size")
  eval_rows = math.lcm(batch_shards, process_count)
  if config.eval.batch_size % eval_rows:
    _fail("eval.batch_size", config.eval.batch_size,
          f"must split evenly over {batch_shards} batch shards and {process_count} host(s): "
          f"use a multiple of {eval_rows}.")
  for field in ("eval.every_steps", "checkpoint.every_steps", "checkpoint.keep", "log_every_steps"):
    _check_positive(config, field)
  for field in ("eval.max_batches", "eval.max_targets_per_piece"):
    value = _get(config, field)
    if not isinstance(value, int) or value < 0:
      _fail(field, value, "must be an integer >= 0 (0 = no limit).")

  for rule in config.logical_axis_rules:
    targets = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    for target in targets:
      if target is not None and target not in mesh_lib.MESH_AXES:
        _fail("logical_axis_rules", rule, f"mesh axis {target!r} is not one of {mesh_lib.MESH_AXES}.")


def _check_freeze(config: ml_collections.ConfigDict) -> None:
  """config.train.freeze: parameter groups of this model (from its abstract shapes only)."""
  freeze = config.train.get("freeze", ())
  if isinstance(freeze, str) or not all(isinstance(g, str) for g in freeze):
    _fail("train.freeze", freeze, 'must be a tuple of group names, e.g. ("embed", "cross_layers").')
  if not freeze:
    return
  names = param_groups.flatten(model_state.param_shapes(config.model))
  unknown = param_groups.unknown_groups(names, freeze)
  if unknown:
    hint = (" On the command line write a tuple: --config.train.freeze=\"('embed','head')\"."
            if any("," in g for g in unknown) else "")
    _fail("train.freeze", tuple(freeze),
          f"{', '.join(map(repr, unknown))} names no parameter group of this model; use "
          f"{', '.join(param_groups.GROUPS)} or a dotted prefix of a parameter name such as "
          f"{next(iter(names))!r} (see perceivers_jax/model/param_groups.py).{hint}")
  if all(any(param_groups.in_group(n, g) for g in freeze) for n in names):
    _fail("train.freeze", tuple(freeze), "freezes every parameter: nothing left to train.")
