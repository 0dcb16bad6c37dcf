"""The layers of PerceiverS (`perceivers.py`): Dense, the squared-ReLU MLP, the cross-attention
layer (latents over the embedded inputs) and the latent self-attention layer, in Flax NNX.

Layers expose their steps (`CrossAttentionLayer.key_value` / `attend`,
`LatentLayer.project` / `finish`) so the cached decoder runs the same code; training uses
`CrossAttentionLayer.attend_inputs` (the same function, keys/values computed inside the
chunked kernel). Each layer's kernels are chosen for the model's backend when it is built
(`attention.resolve_impl`): one for the forward over windows (`attend_inputs`,
`LatentLayer.__call__`; splash on a TPU when the model is told its windows are left-padded,
`left_padded_windows`) and one for the decoder's cached calls (never splash).
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from perceivers_jax.model import attention as attention_lib
from perceivers_jax.model import masks as masks_lib
from perceivers_jax.parallel import partitioning


def _dtype(name: str, field: str):
  try:
    return jnp.dtype(name)
  except TypeError as e:
    raise ValueError(f"config.model.{field}={name!r} is not a dtype (e.g. 'bfloat16').") from e


class Settings:
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


def layer_norm(s: Settings, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm with variance mean(x^2) - mean(x)^2 (flax's fast variance, clipped at 0),
  epsilon config.model.layer_norm_epsilon (1e-5: Haiku's default, which Perceiver AR uses)."""
  return nnx.LayerNorm(
      s.embed_dim, epsilon=s.layer_norm_epsilon, use_fast_variance=True, dtype=s.dtype,
      param_dtype=s.param_dtype,
      scale_init=partitioning.logical_param(nnx.initializers.ones, ("embed",)),
      bias_init=partitioning.logical_param(nnx.initializers.zeros, ("embed",)), rngs=rngs)


def _attention(s: Settings, kv_length: int, rngs: nnx.Rngs, *,
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

  def __init__(self, s: Settings, rngs: nnx.Rngs):
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

  def __init__(self, s: Settings, kv_length: int, scale: int, rngs: nnx.Rngs):
    self.query_norm = layer_norm(s, rngs)
    self.kv_norm = layer_norm(s, rngs)
    self.attention = _attention(s, kv_length, rngs, scale=scale)
    self.mlp_norm = layer_norm(s, rngs)
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

  def __init__(self, s: Settings, num_latents: int, rngs: nnx.Rngs):
    self.attention_norm = layer_norm(s, rngs)
    self.attention = _attention(s, num_latents, rngs)
    self.mlp_norm = layer_norm(s, rngs)
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

