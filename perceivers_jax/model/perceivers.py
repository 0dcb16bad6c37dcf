"""PerceiverS: Perceiver AR with Multi-Scale cross-attention (SPEC 3), in Flax NNX.

inputs [B, L] -> token embedding -> latents = a linear map of the embeddings of the latent
block (the last N valid inputs, `masks.latent_block_start`) -> cross-attention layers over
the embedded inputs, one per scale, combined in cascade (layer k's output is layer k+1's
query input) or summed (every layer reads the initial latents; their residual updates are
added, i.e. the outputs summed minus the repeated input) -> latent self-attention stack ->
final LayerNorm -> zero-initialised head: logits [B, N, vocab] in float32.

All attention uses rotary encoding from absolute positions and the masks of `masks.py`.
Layers expose their steps (`CrossAttentionLayer.key_value` / `attend`,
`LatentLayer.project` / `finish`) so the cached decoder runs the same code; training uses
`CrossAttentionLayer.attend_inputs` (the same function, keys/values computed inside the
chunked kernel). A windowed `sliding` scale W keys only the N + W - 1 inputs its latents can
see, padded to whole kernel blocks (`cross_key_lengths`); each layer's kernels are chosen for
the model's backend when it is built (`attention.resolve_impl`): one for the forward over
windows (`attend_inputs`, `LatentLayer.__call__`; splash on a TPU when the model is told its
windows are left-padded, `left_padded_windows`) and one for the decoder's cached calls
(never splash).
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from perceivers_jax.data import tokens
from perceivers_jax.model import attention as attention_lib
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


def _dtype(name: str, field: str):
  try:
    return jnp.dtype(name)
  except TypeError as e:
    raise ValueError(f"config.model.{field}={name!r} is not a dtype (e.g. 'bfloat16').") from e


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


class _Settings:
  """The static settings the layers share, read once from config.model."""

  def __init__(self, cfg: ml_collections.ConfigDict, left_padded_windows: bool, backend: str):
    self.backend = backend
    self.embed_dim = cfg.embed_dim
    self.num_heads = cfg.num_heads
    self.head_dim = cfg.head_dim
    self.mlp_dim = cfg.embed_dim * cfg.mlp_ratio
    self.dropout_rate = cfg.dropout_rate
    self.rotary_fraction = cfg.rotary_fraction
    self.max_wavelength = cfg.max_wavelength or cfg.max_length
    self.requested_impl = cfg.attention_impl
    self.chunk_size = cfg.attention_chunk_size
    self.left_padded_windows = left_padded_windows
    self.scale_mask = cfg.scale_mask
    self.num_latents = cfg.num_latents
    self.dtype = _dtype(cfg.dtype, "dtype")
    self.param_dtype = _dtype(cfg.param_dtype, "param_dtype")
    self.layer_norm_epsilon = float(cfg.layer_norm_epsilon)


def _layer_norm(s: _Settings, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm as SPEC 3: variance mean(x^2) - mean(x)^2 (flax's fast variance, clipped at 0),
  epsilon config.model.layer_norm_epsilon (1e-5: Haiku's default, which Perceiver AR uses)."""
  return nnx.LayerNorm(
      s.embed_dim, epsilon=s.layer_norm_epsilon, use_fast_variance=True, dtype=s.dtype,
      param_dtype=s.param_dtype,
      scale_init=partitioning.logical_param(nnx.initializers.ones, ("embed",)),
      bias_init=partitioning.logical_param(nnx.initializers.zeros, ("embed",)), rngs=rngs)


def _attention(s: _Settings, kv_length: int, rngs: nnx.Rngs, *,
               scale: int = 0) -> attention_lib.Attention:
  """Attention of the N latents over `kv_length` keys (at scale `scale`, 0: causal), with
  kernels chosen for the model's backend and this length: for cached calls, decoder steps
  (one query) and window calls. A window call is a slot-masked one (splash can run) only over
  left-padded windows and with a causal or `sliding` mask (a `final_block` window is no slot
  mask)."""
  slot_masked = s.left_padded_windows and (scale == 0 or s.scale_mask == "sliding")
  impl, step_impl, window_impl = (
      attention_lib.resolve_impl(s.requested_impl, backend=s.backend, dtype=s.dtype,
                                 kv_length=kv_length, chunk_size=s.chunk_size, call=call,
                                 num_queries=1 if call == "step" else s.num_latents,
                                 head_dim=s.head_dim)
      for call in ("cached", "step", "window" if slot_masked else "cached"))
  return attention_lib.Attention(
      s.embed_dim, s.embed_dim, num_heads=s.num_heads, head_dim=s.head_dim,
      rotary_fraction=s.rotary_fraction, max_wavelength=s.max_wavelength, impl=impl,
      step_impl=step_impl, window_impl=window_impl, window_scale=scale, chunk_size=s.chunk_size,
      backend=s.backend, dtype=s.dtype, param_dtype=s.param_dtype, rngs=rngs)


class Dense(nnx.Module):
  """y = x W + b with logical axis names on W and b."""

  def __init__(self, in_dim: int, out_dim: int, axes: tuple[str | None, str | None], *,
               dtype, param_dtype, rngs: nnx.Rngs, zero_init: bool = False):
    kernel_init = nnx.initializers.zeros if zero_init else nnx.initializers.lecun_normal()
    self.kernel = nnx.Param(partitioning.logical_param(kernel_init, axes)(
        rngs.params(), (in_dim, out_dim), param_dtype))
    self.bias = nnx.Param(partitioning.logical_param(nnx.initializers.zeros, axes[1:])(
        rngs.params(), (out_dim,), param_dtype))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.dot(x.astype(self.dtype), self.kernel.get_value().astype(self.dtype))
    return y + self.bias.get_value().astype(self.dtype)


class Mlp(nnx.Module):
  """Widening MLP with squared-ReLU (Perceiver AR)."""

  def __init__(self, s: _Settings, rngs: nnx.Rngs):
    self.wi = Dense(s.embed_dim, s.mlp_dim, ("embed", "mlp"), dtype=s.dtype,
                    param_dtype=s.param_dtype, rngs=rngs)
    self.wo = Dense(s.mlp_dim, s.embed_dim, ("mlp", "embed"), dtype=s.dtype,
                    param_dtype=s.param_dtype, rngs=rngs)

  def __call__(self, x_BND: jax.Array) -> jax.Array:
    h_BNF = jnp.square(jax.nn.relu(self.wi(x_BND)))
    h_BNF = partitioning.constrain(h_BNF, ("batch", "latents", "mlp"))
    return self.wo(h_BNF)


class CrossAttentionLayer(nnx.Module):
  """Latents attend to the embedded inputs: pre-LN on q and kv, residual, squared-ReLU MLP."""

  def __init__(self, s: _Settings, kv_length: int, scale: int, rngs: nnx.Rngs):
    self.query_norm = _layer_norm(s, rngs)
    self.kv_norm = _layer_norm(s, rngs)
    self.attention = _attention(s, kv_length, rngs, scale=scale)
    self.mlp_norm = _layer_norm(s, rngs)
    self.mlp = Mlp(s, rngs)
    self.dropout = nnx.Dropout(s.dropout_rate, rngs=rngs)

  def key_value(self, inputs_BLD: jax.Array, positions_BL: jax.Array):
    """Keys and values of the inputs (cacheable: they never change once computed)."""
    return self.attention.project_key_value(self.kv_norm(inputs_BLD), positions_BL)

  def attend(self, x_BND: jax.Array, positions_BN: jax.Array, k_BLHK: jax.Array,
             v_BLHK: jax.Array, mask: masks_lib.Mask, *, deterministic: bool) -> jax.Array:
    """The layer over (cached) keys/values of the inputs."""
    return self._finish(x_BND, positions_BN, deterministic,
                        lambda q: self.attention.attend(q, k_BLHK, v_BLHK, mask))

  def attend_inputs(self, x_BND: jax.Array, positions_BN: jax.Array, inputs_BLD: jax.Array,
                    kv_positions_BL: jax.Array, mask: masks_lib.Mask, *,
                    deterministic: bool) -> jax.Array:
    """The layer over a window's embedded inputs (= attend(x, ..., *key_value(inputs), ...)
    with the window kernel); the chunked kernel normalises and projects them chunk by chunk
    (`Attention.attend_inputs`)."""
    return self._finish(x_BND, positions_BN, deterministic,
                        lambda q: self.attention.attend_inputs(q, inputs_BLD, kv_positions_BL,
                                                               mask, norm=self.kv_norm))

  def _finish(self, x_BND, positions_BN, deterministic, attend_fn):
    q_BNHK = self.attention.project_query(self.query_norm(x_BND), positions_BN)
    h_BND = x_BND + self.dropout(attend_fn(q_BNHK), deterministic=deterministic)
    return h_BND + self.dropout(self.mlp(self.mlp_norm(h_BND)), deterministic=deterministic)


class LatentLayer(nnx.Module):
  """Latent self-attention block: pre-LN attention + squared-ReLU MLP, both residual."""

  def __init__(self, s: _Settings, num_latents: int, rngs: nnx.Rngs):
    self.attention_norm = _layer_norm(s, rngs)
    self.attention = _attention(s, num_latents, rngs)
    self.mlp_norm = _layer_norm(s, rngs)
    self.mlp = Mlp(s, rngs)
    self.dropout = nnx.Dropout(s.dropout_rate, rngs=rngs)

  def project(self, x_BND: jax.Array, positions_BN: jax.Array):
    """(q, k, v) of the latents; a decoder caches k and v."""
    y_BND = self.attention_norm(x_BND)
    k_BNHK, v_BNHK = self.attention.project_key_value(y_BND, positions_BN,
                                                      length_axis="latents")
    return self.attention.project_query(y_BND, positions_BN), k_BNHK, v_BNHK

  def finish(self, x_BND: jax.Array, q_BNHK: jax.Array, k_BMHK: jax.Array, v_BMHK: jax.Array,
             mask: masks_lib.Mask, *, deterministic: bool, window: bool = False) -> jax.Array:
    """Attention of q over (possibly cached) latent keys, residual and MLP. `window`: a call of
    the forward over a window (`Attention.attend`), not a decoder's cached one."""
    h_BND = x_BND + self.dropout(self.attention.attend(q_BNHK, k_BMHK, v_BMHK, mask,
                                                       window=window),
                                 deterministic=deterministic)
    return h_BND + self.dropout(self.mlp(self.mlp_norm(h_BND)), deterministic=deterministic)

  def __call__(self, x_BND: jax.Array, positions_BN: jax.Array, mask: masks_lib.Mask, *,
               deterministic: bool) -> jax.Array:
    q, k, v = self.project(x_BND, positions_BN)
    return self.finish(x_BND, q, k, v, mask, deterministic=deterministic, window=True)


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
    s = _Settings(cfg, left_padded_windows, backend or jax.default_backend())
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
    self.latent_init = Dense(s.embed_dim, s.embed_dim, ("embed", None), dtype=s.dtype,
                             param_dtype=s.param_dtype, rngs=rngs)
    self.cross_layers = nnx.List([CrossAttentionLayer(s, length, scale, rngs)
                                  for length, scale in zip(self.key_lengths, self.scales)])
    if self.scan_layers:
      @nnx.split_rngs(splits=cfg.num_latent_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_layers(layer_rngs: nnx.Rngs) -> LatentLayer:
        return LatentLayer(s, cfg.num_latents, layer_rngs)
      self.latent_layers = make_layers(rngs)
    else:
      self.latent_layers = nnx.List([LatentLayer(s, cfg.num_latents, rngs)
                                     for _ in range(cfg.num_latent_layers)])
    self.final_norm = _layer_norm(s, rngs)
    self.head = Dense(s.embed_dim, cfg.vocab_size, ("embed", "vocab"), dtype=jnp.float32,
                      param_dtype=s.param_dtype, rngs=rngs, zero_init=True)

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

  def cross_attend(self, x_BND: jax.Array, positions_BN: jax.Array,
                   kv_positions_BL: jax.Array, kv_valid_BL: jax.Array, *,
                   embedded_BLD: jax.Array | None = None,
                   latent_start_B: jax.Array | None = None,
                   keys_values: Sequence[tuple[jax.Array, jax.Array]] | None = None,
                   layer_kv_positions: Sequence[jax.Array] | None = None,
                   min_key_position_B: jax.Array | None = None,
                   deterministic: bool, remat: bool = True) -> jax.Array:
    """All cross-attention layers (cascade or sum) over the inputs.

    Keys/values come from `embedded_BLD` (training: recomputed under remat) or, per layer,
    from `keys_values` (a decoder's cache; `layer_kv_positions` gives, per layer, the
    positions its cache holds, -1 for empty slots, in place of kv_positions_BL/kv_valid_BL:
    a sliding layer's cache may be a shorter ring). With `embedded_BLD` and `latent_start_B` (the
    latent block's first slot, positions contiguous), a windowed `sliding` layer of scale W
    projects and scores only the N + W - 1 inputs its latents can see
    (`masks.slice_sliding_window`); the result equals the masked computation over all L.
    `min_key_position_B` hides keys at or before it. `remat=False` skips the configured
    remat policy: inference inside lax control flow (the decoder) needs no remat, and
    nnx.remat cannot write state back across those traces.
    """
    if (embedded_BLD is None) == (keys_values is None):
      raise ValueError("cross_attend needs exactly one of embedded_BLD and keys_values.")

    def layer_fn(layer, x, mask, inputs):
      if keys_values is None:  # inputs = (embedded, positions)
        return layer.attend_inputs(x, positions_BN, *inputs, mask, deterministic=deterministic)
      return layer.attend(x, positions_BN, *inputs, mask, deterministic=deterministic)
    if remat:
      layer_fn = self._remat(layer_fn, in_scan=False)

    x0_BND = x_BND
    for index, (layer, scale) in enumerate(zip(self.cross_layers, self.scales)):
      kv_positions, kv_valid = kv_positions_BL, kv_valid_BL
      if keys_values is not None:
        inputs = keys_values[index]
        if layer_kv_positions is not None:
          kv_positions = layer_kv_positions[index]
          kv_valid = kv_positions >= 0
      else:
        inputs = (embedded_BLD, kv_positions_BL)
        if self.windowed[index] and latent_start_B is not None:
          window = functools.partial(masks_lib.slice_sliding_window,
                                     latent_start_B=latent_start_B,
                                     size=self.key_lengths[index],
                                     num_latents=self.num_latents)
          kv_positions, kv_valid = window(kv_positions_BL), window(kv_valid_BL)
          inputs = (window(embedded_BLD), kv_positions)
      mask = masks_lib.cross_attention_mask(positions_BN, kv_positions, kv_valid,
                                             scale=scale, scale_mask=self.scale_mask,
                                             min_key_position_B=min_key_position_B)
      if self.combine == "cascade":
        x_BND = layer_fn(layer, x_BND, mask, inputs)
      else:  # sum: each layer's update of the shared query input is added.
        x_BND = x_BND + layer_fn(layer, x0_BND, mask, inputs) - x0_BND
    return x_BND

  def latent_stack(self, x_BND: jax.Array, positions_BN: jax.Array, valid_BN: jax.Array, *,
                   deterministic: bool) -> jax.Array:
    mask = masks_lib.self_attention_mask(positions_BN, valid_BN)

    def layer_fn(layer, x):
      return layer(x, positions_BN, mask, deterministic=deterministic)
    layer_fn = self._remat(layer_fn, in_scan=self.scan_layers)

    if self.scan_layers:
      scan = nnx.scan(layer_fn, in_axes=(0, nnx.Carry), out_axes=nnx.Carry,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
      return scan(self.latent_layers, x_BND)
    for layer in self.latent_layers:
      x_BND = layer_fn(layer, x_BND)
    return x_BND

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
    x_BND = self.cross_attend(x_BND, latent_positions_BN, positions_BL, valid_BL,
                              embedded_BLD=embedded_BLD,
                              latent_start_B=masks_lib.latent_block_start(inputs_BL, n),
                              deterministic=deterministic)
    x_BND = self.latent_stack(x_BND, latent_positions_BN, latent_valid_BN,
                              deterministic=deterministic)
    return self.logits(x_BND)
