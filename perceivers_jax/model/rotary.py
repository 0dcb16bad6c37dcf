"""Rotary position encoding on a fraction of each head's channels (Perceiver AR style).

The first `rotated_channels(head_dim, fraction)` channels of every head are rotated in
interleaved pairs (2i, 2i+1) by angle position / wavelength_i, with wavelengths log-spaced
from 1 to `max_wavelength`; the remaining channels pass through unchanged. Positions are
absolute, so q.k depends only on the difference of positions.
"""

import jax
import jax.numpy as jnp
import numpy as np


def rotated_channels(head_dim: int, fraction: float) -> int:
  """Number of rotated channels per head (even)."""
  return int(head_dim * fraction) // 2 * 2


def wavelengths(num_pairs: int, max_wavelength: float) -> np.ndarray:
  """Log-spaced wavelengths 1 .. max_wavelength, one per rotated pair (float32)."""
  return (float(max_wavelength) ** np.linspace(0.0, 1.0, num_pairs)).astype(np.float32)


def apply_rotary(x_BTHK: jax.Array, positions_BT: jax.Array, *, fraction: float,
                 max_wavelength: float) -> jax.Array:
  """Rotates the first channels of each head of x by its position; same dtype out."""
  head_dim = x_BTHK.shape[-1]
  num_rot = rotated_channels(head_dim, fraction)
  if num_rot == 0:
    return x_BTHK
  inv_wavelength_P = jnp.asarray(1.0 / wavelengths(num_rot // 2, max_wavelength))
  angle_BTP = positions_BT.astype(jnp.float32)[..., None] * inv_wavelength_P
  cos_BT1P = jnp.cos(angle_BTP)[:, :, None, :]
  sin_BT1P = jnp.sin(angle_BTP)[:, :, None, :]
  x_rot = x_BTHK[..., :num_rot].astype(jnp.float32)
  even, odd = x_rot[..., 0::2], x_rot[..., 1::2]
  rot_even = even * cos_BT1P - odd * sin_BT1P
  rot_odd = even * sin_BT1P + odd * cos_BT1P
  rotated = jnp.stack([rot_even, rot_odd], axis=-1).reshape(x_rot.shape)
  return jnp.concatenate([rotated.astype(x_BTHK.dtype), x_BTHK[..., num_rot:]], axis=-1)
