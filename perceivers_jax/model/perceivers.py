"""PerceiverS: Perceiver AR with Multi-Scale cross-attention (README "Architecture"), in Flax NNX.

inputs [B, L] -> token embedding -> latents = a linear map of the embeddings of the latent
block (the last N valid inputs, `masks.latent_block_start`) -> cross-attention layers over
the embedded inputs, one per scale, combined in cascade (layer k's output is layer k+1's
query input) or summed (every layer reads the initial latents; their residual updates are
added, i.e. the outputs summed minus the repeated input) -> latent self-attention stack ->
final LayerNorm -> zero-initialised head: logits [B, N, vocab] in float32.

All attention uses rotary encoding from absolute positions and the masks of `masks.py`; the
layers are in `layers.py`. Training and decoding take one path through them: both run the
cross-attention layers through `_combine_scales` (cascade or sum) from their own entry point
(`cross_attend_window`: a window's embedded inputs, under remat; `cross_attend_cached`: a
decoder's cached keys/values) and the latent layers through `over_latent_layers` (scan or
loop) with their own per-layer step. A windowed `sliding` scale W keys only the N + W - 1
inputs its latents can see, padded to whole kernel blocks (`cross_key_lengths`).
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from perceivers_jax.data import tokens
from perceivers_jax.model import attention as attention_lib
from perceivers_jax.model import layers
from perceivers_jax.model import masks as masks_lib
from perceivers_jax.parallel import partitioning

COMBINES = ("cascade", "sum")
REMAT_POLICIES = ("none", "full", "nothing_saveable", "everything_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable")
# Token embedding initialisers. `reference`: Haiku's hk.Embed default, which Perceiver AR uses:
# hk.initializers.TruncatedNormal(stddev=1), a standard normal truncated at +-2 and scaled by 1
# with no std correction (its std is 0.88), the same draw as jax's truncated_normal(1.0).
EMBEDDING_INITS = {
    "reference": nnx.initializers.truncated_normal(1.0, lower=-2.0, upper=2.0),
    "normal_0.02": nnx.initializers.normal(0.02),
}


def embedding_init(name: str):
  """The token embedding initialiser named by config.model.embedding_init."""
  if name not in EMBEDDING_INITS:
    raise ValueError(f"config.model.embedding_init={name!r}; use one of "
                     f"{tuple(EMBEDDING_INITS)}.")
  return EMBEDDING_INITS[name]


def remat_policy(name: str):
  """None for 'none' (no remat), else the jax.checkpoint policy of that name."""
  if name == "none":
    return None
  if name == "full":
    return jax.checkpoint_policies.nothing_saveable
  if name not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat_policy={name!r}; use one of {REMAT_POLICIES}.")
  return getattr(jax.checkpoint_policies, name)


def windowed_layers(cfg: ml_collections.ConfigDict) -> tuple[bool, ...]:
  """Per cross-attention layer: does it key only its window in training (a `sliding` scale
  with config.model.windowed_scales)? (.get: configs saved before that field existed.)"""
  return tuple(bool(cfg.get("windowed_scales", True)) and int(scale) > 0
               and cfg.scale_mask == "sliding" for scale in cfg.cross_attention_scales)


def cross_key_lengths(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Keys each cross-attention layer projects and scores per window in training: all L, or
  a windowed sliding scale's N + W - 1 rounded up to whole `attention.KEY_BLOCK`s (what every
  kernel accepts: 2,048 at paper size; `masks.sliding_window_size`)."""
  return tuple(
      masks_lib.sliding_window_size(int(scale), cfg.num_latents, cfg.max_length,
                                    attention_lib.KEY_BLOCK) if windowed
      else cfg.max_length
      for scale, windowed in zip(cfg.cross_attention_scales, windowed_layers(cfg)))


class PerceiverS(nnx.Module):
  """PerceiverS language model over token windows (see module docstring).

  `left_padded_windows`: the forward is only given left-padded windows of contiguous positions
  (training's config.data.padding_side == "left"), so its masks are slot masks and splash may
  run them; False (the default: layout unknown) keeps splash out. `backend`: the platform
  the model runs on, whose kernels its layers get (default jax.default_backend(); a model
  compiled for a TPU topology from a CPU host is built for `tpu`).
  """

  def __init__(self, model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs,
               left_padded_windows: bool = False, backend: str | None = None):
    cfg = model_config
    s = layers.Settings(cfg, left_padded_windows, backend or jax.default_backend())
    if cfg.combine not in COMBINES:
      raise ValueError(f"config.model.combine={cfg.combine!r}; use one of {COMBINES}.")
    if cfg.scale_mask not in masks_lib.SCALE_MASKS:
      raise ValueError(f"config.model.scale_mask={cfg.scale_mask!r}; "
                       f"use one of {masks_lib.SCALE_MASKS}.")
    if not 0 < cfg.num_latents <= cfg.max_length:
      raise ValueError(f"config.model.num_latents={cfg.num_latents} must be in "
                       f"[1, max_length={cfg.max_length}].")
    self.num_latents = cfg.num_latents
    self.max_length = cfg.max_length
    self.num_heads = cfg.num_heads
    self.head_dim = cfg.head_dim
    self.num_latent_layers = cfg.num_latent_layers
    self.scales = tuple(int(w) for w in cfg.cross_attention_scales)
    self.scale_mask = cfg.scale_mask
    self.windowed = windowed_layers(cfg)
    self.key_lengths = cross_key_lengths(cfg)
    self.combine = cfg.combine
    self.scan_layers = bool(cfg.scan_layers)
    self.remat_policy_name = cfg.remat_policy
    remat_policy(cfg.remat_policy)  # validates the name early
    self.dtype = s.dtype

    self.embed = nnx.Embed(
        cfg.vocab_size, s.embed_dim, dtype=s.dtype, param_dtype=s.param_dtype,
        embedding_init=partitioning.logical_param(embedding_init(cfg.embedding_init),
                                                  ("vocab", "embed")), rngs=rngs)
    # Output axis unnamed (replicated): one width can't carry two mesh axes' worth of names.
    self.latent_init = layers.Dense(s.embed_dim, s.embed_dim, ("embed", None), dtype=s.dtype,
                                    param_dtype=s.param_dtype, rngs=rngs)
    self.cross_layers = nnx.List([layers.CrossAttentionLayer(s, length, scale, rngs)
                                  for length, scale in zip(self.key_lengths, self.scales)])
    if self.scan_layers:
      @nnx.split_rngs(splits=cfg.num_latent_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_layers(layer_rngs: nnx.Rngs) -> layers.LatentLayer:
        return layers.LatentLayer(s, cfg.num_latents, layer_rngs)
      self.latent_layers = make_layers(rngs)
    else:
      self.latent_layers = nnx.List([layers.LatentLayer(s, cfg.num_latents, rngs)
                                     for _ in range(cfg.num_latent_layers)])
    self.final_norm = layers.layer_norm(s, rngs)
    self.head = layers.Dense(s.embed_dim, cfg.vocab_size, ("embed", "vocab"),
                             dtype=jnp.float32, param_dtype=s.param_dtype, rngs=rngs,
                             zero_init=True)

  # -- steps shared with the cached decoder ----------------------------------------------------

  def embed_inputs(self, inputs_BL: jax.Array) -> jax.Array:
    return partitioning.constrain(self.embed(inputs_BL), ("batch", "length", "embed"))

  def initial_latents(self, embedded_BND: jax.Array) -> jax.Array:
    return partitioning.constrain(self.latent_init(embedded_BND), ("batch", "latents", "embed"))

  def _remat(self, fn, *, in_scan: bool):
    policy = remat_policy(self.remat_policy_name)
    if policy is None:
      return fn
    # Inside scan, CSE cannot undo rematerialisation and prevent_cse only costs speed.
    return nnx.remat(fn, policy=policy, prevent_cse=not in_scan)

  def _cross_mask(self, index: int, positions_BN: jax.Array, kv_positions_BL: jax.Array,
                  kv_valid_BL: jax.Array,
                  min_key_position_B: jax.Array | None = None) -> masks_lib.Mask:
    """Cross-attention layer `index`'s mask: its scale over the given keys."""
    return masks_lib.cross_attention_mask(positions_BN, kv_positions_BL, kv_valid_BL,
                                          scale=self.scales[index], scale_mask=self.scale_mask,
                                          min_key_position_B=min_key_position_B)

  def _combine_scales(self, x_BND: jax.Array, layer_output) -> jax.Array:
    """The Multi-Scale combination of the cross-attention layers, `layer_output(index, x)`
    being layer `index` queried by x: `cascade` feeds each layer's output to the next one;
    `sum` queries every layer with x and adds their residual updates."""
    x0_BND = x_BND
    for index in range(len(self.cross_layers)):
      if self.combine == "cascade":
        x_BND = layer_output(index, x_BND)
      else:
        x_BND = x_BND + layer_output(index, x0_BND) - x0_BND
    return x_BND

  def cross_attend_window(self, x_BND: jax.Array, positions_BN: jax.Array,
                          embedded_BLD: jax.Array, kv_positions_BL: jax.Array,
                          kv_valid_BL: jax.Array, latent_start_B: jax.Array, *,
                          deterministic: bool) -> jax.Array:
    """The cross-attention layers over a window's embedded inputs (training, validation),
    each under the configured remat policy (its keys/values recomputed).

    A windowed `sliding` layer of scale W projects and scores only the N + W - 1 inputs its
    latents can see, from `latent_start_B` (the latent block's first slot; positions
    contiguous; `masks.slice_sliding_window`): the result equals the masked computation over
    all L.
    """
    def layer_fn(layer, x, mask, inputs):
      return layer.attend_inputs(x, positions_BN, *inputs, mask, deterministic=deterministic)
    layer_fn = self._remat(layer_fn, in_scan=False)

    def layer_output(index, x):
      kv_positions, kv_valid = kv_positions_BL, kv_valid_BL
      inputs = (embedded_BLD, kv_positions_BL)
      if self.windowed[index]:
        window = functools.partial(masks_lib.slice_sliding_window,
                                   latent_start_B=latent_start_B,
                                   size=self.key_lengths[index], num_latents=self.num_latents)
        kv_positions, kv_valid = window(kv_positions_BL), window(kv_valid_BL)
        inputs = (window(embedded_BLD), kv_positions)
      mask = self._cross_mask(index, positions_BN, kv_positions, kv_valid)
      return layer_fn(self.cross_layers[index], x, mask, inputs)
    return self._combine_scales(x_BND, layer_output)

  def cross_attend_cached(self, x_BTD: jax.Array, positions_BT: jax.Array,
                          keys_values: Sequence[tuple[jax.Array, jax.Array]],
                          kv_positions: Sequence[jax.Array],
                          min_key_position_B: jax.Array) -> jax.Array:
    """The cross-attention layers of T new latents over a decoder's caches: per layer, its
    (keys, values) and the positions its slots hold (-1: empty; a sliding layer's cache may
    be a shorter ring). Keys at or before `min_key_position_B` are hidden. Inference: no
    dropout, no remat (nnx.remat cannot write state back across the decoder's lax loops)."""
    def layer_output(index, x):
      mask = self._cross_mask(index, positions_BT, kv_positions[index],
                              kv_positions[index] >= 0, min_key_position_B)
      return self.cross_layers[index].attend(x, positions_BT, *keys_values[index], mask,
                                             deterministic=True)
    return self._combine_scales(x_BTD, layer_output)

  def over_latent_layers(self, layer_step, carry, *, remat: bool):
    """`carry = layer_step(layer, index, carry)` through the latent layers in turn: one scan
    over the stacked layers (config.model.scan_layers; `index` then traced) or a Python loop.
    `remat`: each step under the configured remat policy (the forward over windows)."""
    if remat:
      layer_step = self._remat(layer_step, in_scan=self.scan_layers)
    if self.scan_layers:
      scan = nnx.scan(layer_step, in_axes=(0, 0, nnx.Carry), out_axes=nnx.Carry,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
      return scan(self.latent_layers, jnp.arange(self.num_latent_layers), carry)
    for index, layer in enumerate(self.latent_layers):
      carry = layer_step(layer, index, carry)
    return carry

  def latent_stack(self, x_BND: jax.Array, positions_BN: jax.Array, valid_BN: jax.Array, *,
                   deterministic: bool) -> jax.Array:
    """The latent self-attention layers over the latents of a window."""
    mask = masks_lib.self_attention_mask(positions_BN, valid_BN)

    def layer_step(layer, index, x):
      del index
      return layer(x, positions_BN, mask, deterministic=deterministic)
    return self.over_latent_layers(layer_step, x_BND, remat=True)

  def logits(self, x_BND: jax.Array) -> jax.Array:
    logits_BNV = self.head(self.final_norm(x_BND).astype(jnp.float32))
    return partitioning.constrain(logits_BNV, ("batch", "latents", "vocab"))

  # -- training / evaluation forward -----------------------------------------------------------

  def __call__(self, inputs_BL: jax.Array, positions_BL: jax.Array, *,
               deterministic: bool = True,
               first_latent_position_B: jax.Array | None = None) -> jax.Array:
    """Logits [B, N, V] (float32) for the latent block of each row.

    `first_latent_position_B` turns latents before that position into padding latents (the
    cached decoder's reference: a latent block that starts at its last reset).
    """
    valid_BL = inputs_BL != tokens.PAD_ID
    positions_BL = masks_lib.masked_positions(inputs_BL, positions_BL)
    embedded_BLD = self.embed_inputs(inputs_BL)
    n = self.num_latents
    latent_positions_BN = masks_lib.gather_latent_block(positions_BL, inputs_BL, n)
    latent_valid_BN = masks_lib.gather_latent_block(valid_BL, inputs_BL, n)
    if first_latent_position_B is not None:
      latent_valid_BN &= latent_positions_BN >= first_latent_position_B[:, None]
      latent_positions_BN = jnp.where(latent_valid_BN, latent_positions_BN, -1)
    x_BND = self.initial_latents(masks_lib.gather_latent_block(embedded_BLD, inputs_BL, n))
    x_BND = self.cross_attend_window(x_BND, latent_positions_BN, embedded_BLD, positions_BL,
                                     valid_BL, masks_lib.latent_block_start(inputs_BL, n),
                                     deterministic=deterministic)
    x_BND = self.latent_stack(x_BND, latent_positions_BN, latent_valid_BN,
                              deterministic=deterministic)
    return self.logits(x_BND)
