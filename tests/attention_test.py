"""Rotary encoding, masks and attention kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceivers_jax.model import attention
from perceivers_jax.model import masks
from perceivers_jax.model import rotary


def test_rotary_leaves_unrotated_channels_and_is_shift_invariant():
  rng = np.random.RandomState(0)
  q = jnp.asarray(rng.randn(2, 5, 3, 16), jnp.float32)
  k = jnp.asarray(rng.randn(2, 7, 3, 16), jnp.float32)
  q_pos = jnp.asarray(rng.randint(0, 1000, (2, 5)))
  k_pos = jnp.asarray(rng.randint(0, 1000, (2, 7)))
  rot = lambda x, p: rotary.apply_rotary(x, p, fraction=0.5, max_wavelength=64)
  q_rot = rot(q, q_pos)
  np.testing.assert_array_equal(q_rot[..., 8:], q[..., 8:])
  assert not np.allclose(q_rot[..., :8], q[..., :8])
  # Each interleaved pair (2i, 2i+1) is rotated: its norm is kept.
  pair_norm = lambda x: jnp.linalg.norm(x[..., :8].reshape(x.shape[:-1] + (4, 2)), axis=-1)
  np.testing.assert_allclose(pair_norm(q_rot), pair_norm(q), rtol=1e-5)
  scores = lambda shift: jnp.einsum("bnhk,bmhk->bhnm", rot(q, q_pos + shift), rot(k, k_pos + shift))
  np.testing.assert_allclose(scores(0), scores(12345), atol=2e-3)
  assert rotary.wavelengths(4, 64)[0] == 1 and np.isclose(rotary.wavelengths(4, 64)[-1], 64)


def test_latent_block_start_left_right_and_empty_rows():
  inputs = np.zeros((4, 10), np.int32)
  inputs[0, 3:] = 5  # left padded, 7 valid
  inputs[1, :7] = 5  # right padded, 7 valid
  inputs[2, :] = 5  # full
  np.testing.assert_array_equal(masks.latent_block_start(jnp.asarray(inputs), 4), [6, 3, 6, 0])
  np.testing.assert_array_equal(masks.latent_block_start(jnp.asarray(inputs), 8), [2, 0, 2, 0])


def _brute_force_visible(q_pos, kv_pos, kv_valid, scale, style):
  b, n = q_pos.shape
  visible = np.zeros((b, n, kv_pos.shape[1]), bool)
  for r in range(b):
    last = kv_pos[r][kv_valid[r]].max()
    for i in range(n):
      for j in range(kv_pos.shape[1]):
        ok = kv_valid[r, j] and 0 <= kv_pos[r, j] <= q_pos[r, i]
        if scale and style == "sliding":
          ok &= kv_pos[r, j] > q_pos[r, i] - scale
        if scale and style == "final_block":
          ok &= kv_pos[r, j] > last - scale  # only the last `scale` positions of the window
        visible[r, i, j] = ok
  return visible


@pytest.mark.parametrize("style", ["sliding", "final_block"])
def test_cross_attention_mask_matches_definition_for_both_padding_sides(style):
  # Row 0 left padded, row 1 right padded, same positions 100..111.
  kv_pos = np.full((2, 16), -1)
  kv_pos[0, 4:] = np.arange(100, 112)
  kv_pos[1, :12] = np.arange(100, 112)
  kv_valid = kv_pos >= 0
  q_pos = np.stack([kv_pos[0, 10:16], kv_pos[1, 6:12]])
  for scale in (0, 3, 50):
    mask = masks.cross_attention_mask(jnp.asarray(q_pos), jnp.asarray(kv_pos),
                                      jnp.asarray(kv_valid), scale=scale, scale_mask=style)
    dense = np.asarray(mask.dense())
    np.testing.assert_array_equal(dense, _brute_force_visible(q_pos, kv_pos, kv_valid, scale,
                                                              style))
    np.testing.assert_array_equal(dense[0][:, 4:], dense[1][:, :12])  # padding side is irrelevant
  # Scale 3: the last query (position 111) sees 109..111 either way; the query at 106 sees
  # 104..106 with `sliding` and nothing with `final_block` (all its keys precede 109).
  mask = masks.cross_attention_mask(jnp.asarray(q_pos), jnp.asarray(kv_pos),
                                    jnp.asarray(kv_valid), scale=3, scale_mask=style)
  np.testing.assert_array_equal(kv_pos[0][np.asarray(mask.dense())[0, -1]], [109, 110, 111])
  early = np.asarray(mask.dense())[0, 0]
  expected_early = [] if style == "final_block" else [104, 105, 106]
  np.testing.assert_array_equal(kv_pos[0][early], expected_early)


def _random_problem(seed=0, n=6, length=37):
  rng = np.random.RandomState(seed)
  q = jnp.asarray(rng.randn(2, n, 2, 8), jnp.float32)
  k = jnp.asarray(rng.randn(2, length, 2, 8), jnp.float32)
  v = jnp.asarray(rng.randn(2, length, 2, 8), jnp.float32)
  kv_pos = np.tile(np.arange(length), (2, 1))
  kv_valid = np.ones((2, length), bool)
  kv_valid[1, :20] = False  # left padding on row 1
  q_pos = np.stack([np.arange(length - n, length)] * 2)
  q_pos[1, :2] = -1  # padding latents: see nothing
  mask = masks.cross_attention_mask(jnp.asarray(q_pos), jnp.asarray(kv_pos),
                                    jnp.asarray(kv_valid), scale=9, scale_mask="sliding")
  return q, k, v, mask


def test_xla_and_chunked_agree_and_padding_queries_are_zero():
  q, k, v, mask = _random_problem()
  xla = attention.dot_product_attention(q, k, v, mask, impl="xla")
  chunked = attention.dot_product_attention(q, k, v, mask, impl="chunked", chunk_size=8)
  np.testing.assert_allclose(chunked, xla, atol=1e-5)
  assert np.isfinite(np.asarray(xla)).all()
  np.testing.assert_array_equal(xla[1, :2], 0.0)
  np.testing.assert_array_equal(chunked[1, :2], 0.0)
  # Reference softmax over the visible keys only.
  dense = np.asarray(mask.dense())
  s = np.einsum("nhk,lhk->hnl", q[0], k[0]) / np.sqrt(8)
  s = np.where(dense[0][None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(xla[0], np.einsum("hnl,lhk->nhk", p, v[0]), atol=1e-5)

  def loss(impl, q, k, v):
    out = attention.dot_product_attention(q, k, v, mask, impl=impl, chunk_size=8)
    return jnp.sum(out * jnp.sin(out))
  grads_xla = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
  grads_chunked = jax.grad(lambda *a: loss("chunked", *a), argnums=(0, 1, 2))(q, k, v)
  for g_x, g_c in zip(grads_xla, grads_chunked):
    assert np.isfinite(np.asarray(g_x)).all()
    np.testing.assert_allclose(g_c, g_x, atol=1e-5)


def test_cudnn_off_gpu_is_a_clear_config_error():
  if jax.default_backend() == "gpu":
    pytest.skip("cudnn is available here")
  with pytest.raises(ValueError, match="attention_impl='cudnn' needs an NVIDIA GPU"):
    attention.check_impl("cudnn", jnp.bfloat16)
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    attention.check_impl("flash", jnp.float32)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
def test_cudnn_matches_xla_on_gpu():
  q, k, v, mask = _random_problem(length=64)
  q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
  xla = attention.dot_product_attention(q, k, v, mask, impl="xla").astype(jnp.float32)
  cudnn = attention.dot_product_attention(q, k, v, mask, impl="cudnn").astype(jnp.float32)
  np.testing.assert_allclose(cudnn, xla, atol=3e-2)
  np.testing.assert_array_equal(cudnn[1, :2], 0.0)
