"""Splash attention (TPU kernel) in Pallas interpret mode equals the XLA path on left-padded
windows: cross-attention (full and sliding scale) and latent self-attention, forward and
gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceivers_jax.model import attention
from perceivers_jax.model import masks
from perceivers_jax.model import splash

B, H, K, N, T = 2, 2, 16, 128, 256


def _left_padded(num_kv: int, num_valid: tuple[int, ...], start: int = 40):
  """Key positions/validity of left-padded rows of contiguous positions; the queries are the
  last N slots."""
  kv_pos = np.full((B, num_kv), -1, np.int32)
  for row, valid in enumerate(num_valid):
    kv_pos[row, num_kv - valid:] = np.arange(start, start + valid)
  q_pos = kv_pos[:, -N:]
  return jnp.asarray(q_pos), jnp.asarray(kv_pos), jnp.asarray(kv_pos >= 0)


@pytest.mark.parametrize("num_kv, scale", [(T, 0), (T, 48), (N, 0)])
def test_splash_matches_xla_forward_and_gradients(num_kv, scale):
  # Row 0 is full; row 1 holds fewer valid inputs than latents (padding queries).
  q_pos, kv_pos, kv_valid = _left_padded(num_kv, (num_kv, N // 2 + 3))
  if num_kv == N:  # latent self-attention
    mask = masks.self_attention_mask(q_pos, kv_valid)
  else:
    mask = masks.cross_attention_mask(q_pos, kv_pos, kv_valid, scale=scale,
                                      scale_mask="sliding")
  rng = np.random.RandomState(num_kv + scale)
  q, k, v = (jnp.asarray(rng.randn(B, n, H, K), jnp.float32) for n in (N, num_kv, num_kv))
  q = q * K ** -0.5  # dot_product_attention scales q before any kernel

  def xla(q, k, v):
    return attention.dot_product_attention(q * K ** 0.5, k, v, mask, impl="xla")

  def pallas(q, k, v):
    return splash.splash_attention(q, k, v, q_pos >= 0, kv_valid, scale=scale, interpret=True)

  np.testing.assert_allclose(pallas(q, k, v), xla(q, k, v), atol=2e-5)
  np.testing.assert_array_equal(pallas(q, k, v)[1, :N // 2 - 3], 0.0)  # padding queries
  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))
  grads_xla = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
  grads_splash = jax.grad(loss(pallas), argnums=(0, 1, 2))(q, k, v)
  for g_x, g_s in zip(grads_xla, grads_splash):
    assert np.isfinite(np.asarray(g_s)).all()
    np.testing.assert_allclose(g_s, g_x, atol=1e-4)


def test_splash_masks_are_the_position_masks_on_left_padded_windows():
  q_pos, kv_pos, kv_valid = _left_padded(T, (T, 70))
  for scale in (0, 1, 48):
    slots = np.asarray(splash.splash_mask(N, T, 1, scale=scale).masks[0][:, :])
    dense = np.asarray(masks.cross_attention_mask(q_pos, kv_pos, kv_valid, scale=scale,
                                                  scale_mask="sliding").dense())
    # Where both query and key are valid, slots and positions agree.
    both = np.asarray(kv_valid)[:, None, :] & np.asarray(q_pos >= 0)[:, :, None]
    np.testing.assert_array_equal(slots[None] & both, dense)
