"""Attention visibility, built in one place from absolute positions.

Every attention layer of the model (and the cached decoder) uses the same rule: query i sees
key j iff key j is valid (not padding), pos(j) <= pos(i), and pos(j) > lower(i), where
lower(i) is -1 for full context, pos(i) - W for a `sliding` scale W, and
last_position - W for a `final_block` scale W (the inputs before the last W positions of the
window are hidden). Positions are absolute, so left and right padding behave identically.
"""

import flax.struct
import jax
import jax.numpy as jnp

from perceivers_jax.data import tokens

SCALE_MASKS = ("sliding", "final_block")
# Lower bound meaning "no lower bound": real positions are >= 0.
NO_LOWER_BOUND = -1


def latent_block_start(inputs_BL: jax.Array, num_latents: int) -> jax.Array:
  """First slot of the latent block: the last `num_latents` valid inputs of each row.

  With end = 1 + index of the last valid input (0 for an all-PAD row), the block is the slots
  [max(end - N, 0), end). Returns int32[B].
  """
  valid_BL = inputs_BL != tokens.PAD_ID
  length = inputs_BL.shape[1]
  last_B = length - 1 - jnp.argmax(valid_BL[:, ::-1], axis=1)
  end_B = jnp.where(valid_BL.any(axis=1), last_B + 1, 0)
  return jnp.maximum(end_B - num_latents, 0).astype(jnp.int32)


def latent_block_indices(inputs_BL: jax.Array, num_latents: int) -> jax.Array:
  """Slot indices int32[B, N] of the latent block (always inside [0, L) since N <= L)."""
  start_B = latent_block_start(inputs_BL, num_latents)
  return start_B[:, None] + jnp.arange(num_latents, dtype=jnp.int32)[None, :]


def gather_latent_block(x_BL: jax.Array, inputs_BL: jax.Array, num_latents: int) -> jax.Array:
  """x's entries at the latent block: [B, L, ...] -> [B, N, ...]."""
  idx_BN = latent_block_indices(inputs_BL, num_latents)
  idx = idx_BN.reshape(idx_BN.shape + (1,) * (x_BL.ndim - 2))
  return jnp.take_along_axis(x_BL, idx, axis=1)


def sliding_window_size(scale: int, num_latents: int, length: int, multiple: int = 1) -> int:
  """Keys a `sliding` layer of scale W needs in training: the N + W - 1 slots ending at the
  latent block's end (the first latent sees W - 1 inputs before the block), rounded up to a
  multiple of `multiple` (the extra slots are keys the mask hides), at most L."""
  return min(-(-(num_latents + scale - 1) // multiple) * multiple, length)


def slice_sliding_window(x_BL: jax.Array, latent_start_B: jax.Array, *, size: int,
                         num_latents: int) -> jax.Array:
  """x's `size` slots ending at the latent block's end, [start + N - size, start + N) per row,
  clamped into [0, L): [B, L, ...] -> [B, size, ...].

  In a window of contiguous positions, with size >= N + W - 1 (`sliding_window_size`), these
  hold every input a `sliding` scale W lets the latent block [start, start + N) see; the
  mask, applied to them, still decides which are visible, so the result equals the masked
  computation over all L inputs.
  """
  first_B = jnp.clip(latent_start_B + num_latents - size, 0, x_BL.shape[1] - size)
  return jax.vmap(lambda x, first: jax.lax.dynamic_slice_in_dim(x, first, size))(x_BL, first_B)


def masked_positions(inputs_BL: jax.Array, positions_BL: jax.Array) -> jax.Array:
  """Positions with -1 in padding slots (whatever the batch put there)."""
  return jnp.where(inputs_BL != tokens.PAD_ID, positions_BL, -1).astype(jnp.int32)


def lower_bounds(q_positions_BN: jax.Array, kv_positions_BL: jax.Array, *, scale: int,
                 scale_mask: str) -> jax.Array:
  """Exclusive lower key position per query, int32[B, N], for one attention scale.

  scale 0 means full context. `final_block` measures the last `scale` positions from the
  window's last valid input (the largest key position).
  """
  if scale_mask not in SCALE_MASKS:
    raise ValueError(f"config.model.scale_mask={scale_mask!r}; use one of {SCALE_MASKS}.")
  if scale == 0:
    return jnp.full(q_positions_BN.shape, NO_LOWER_BOUND, jnp.int32)
  if scale_mask == "sliding":
    return (q_positions_BN - scale).astype(jnp.int32)
  last_B = kv_positions_BL.max(axis=1)
  return jnp.broadcast_to((last_B - scale)[:, None], q_positions_BN.shape).astype(jnp.int32)


@flax.struct.dataclass
class Mask:
  """Visibility of keys to queries, kept factored so chunked attention never builds [B,N,L].

  q_positions_BN: query positions (-1 for padding queries, which then see nothing).
  q_lower_BN: exclusive lower bound on visible key positions.
  kv_positions_BL: key positions; kv_valid_BL: key is not padding (or a filled cache slot).
  """
  q_positions_BN: jax.Array
  q_lower_BN: jax.Array
  kv_positions_BL: jax.Array
  kv_valid_BL: jax.Array

  def dense(self) -> jax.Array:
    """bool[B, N, L]."""
    q = self.q_positions_BN[:, :, None]
    lower = self.q_lower_BN[:, :, None]
    kv = self.kv_positions_BL[:, None, :]
    return self.kv_valid_BL[:, None, :] & (kv <= q) & (kv > lower)


def cross_attention_mask(q_positions_BN: jax.Array, kv_positions_BL: jax.Array,
                         kv_valid_BL: jax.Array, *, scale: int, scale_mask: str,
                         min_key_position_B: jax.Array | None = None) -> Mask:
  """Latents (queries) over inputs: causal by position, padding hidden, scale window.

  `min_key_position_B` (exclusive) additionally hides older keys (the cached decoder's
  context horizon).
  """
  lower_BN = lower_bounds(q_positions_BN, jnp.where(kv_valid_BL, kv_positions_BL, -1),
                          scale=scale, scale_mask=scale_mask)
  if min_key_position_B is not None:
    lower_BN = jnp.maximum(lower_BN, min_key_position_B[:, None].astype(jnp.int32))
  return Mask(q_positions_BN, lower_BN, kv_positions_BL, kv_valid_BL)


def causal_mask(q_positions_BN: jax.Array, kv_positions_BM: jax.Array,
                kv_valid_BM: jax.Array) -> Mask:
  """Query i sees key k iff k is valid and pos(k) <= pos(i)."""
  lower_BN = jnp.full(q_positions_BN.shape, NO_LOWER_BOUND, jnp.int32)
  return Mask(q_positions_BN, lower_BN, kv_positions_BM, kv_valid_BM)


def self_attention_mask(positions_BN: jax.Array, valid_BN: jax.Array) -> Mask:
  """Latents over latents: latent i sees k iff k valid and pos(k) <= pos(i)."""
  return causal_mask(positions_BN, positions_BN, valid_BN)
