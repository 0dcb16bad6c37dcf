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


@pytest.mark.parametrize("call, num_queries, kv_length, expected", [
    ("window", 1024, 32768, "splash"),  # the paper's full scale
    ("window", 1024, 2048, "splash"),  # its windowed short scale (2,047 keys, padded)
    ("window", 1024, 1024, "splash"),  # its latent self-attention
    ("window", 16, 32768, "chunked"),  # N does not fill splash's blocks
    ("cached", 1024, 32768, "chunked"),  # the decoder's ring-buffer caches: never splash
    ("cached", 1, 1024, "xla"),
    ("step", 1, 32768, "xla"),  # the decoder's plain step
])
def test_auto_on_tpu_runs_splash_for_window_forwards_only(call, num_queries, kv_length,
                                                          expected):
  resolve = lambda requested, backend="tpu": attention.resolve_impl(
      requested, backend=backend, dtype=jnp.bfloat16, kv_length=kv_length, chunk_size=1024,
      call=call, num_queries=num_queries, head_dim=64)
  assert resolve("auto") == expected
  assert resolve("splash") == expected  # asked for, splash still only runs where it is exact
  # Off a TPU only an explicit request runs splash (in interpret mode).
  assert resolve("auto", "cpu") == ("xla" if kv_length <= 1024 or call == "step" else "chunked")
  assert resolve("splash", "cpu") == ("splash" if expected == "splash" else resolve("auto", "cpu"))


# --- the whole model: a tiny PerceiverS whose N fills one splash block ------------------------

import functools  # noqa: E402

from flax import nnx  # noqa: E402

import tiny_model  # noqa: E402
from perceivers_jax.data import tokens  # noqa: E402
from perceivers_jax.data import windows  # noqa: E402
from perceivers_jax.sampling import decode  # noqa: E402
from perceivers_jax.sampling import next_token  # noqa: E402

# Scales [full, 48]: the windowed short scale keys N + W - 1 = 175 inputs and the full one
# L = 320, both left-padded to whole blocks (256, 384) inside the splash call.
_MODEL = dict(max_length=320, num_latents=128, cross_attention_scales=(0, 48))


def _models():
  """(splash model, xla model) with the same parameters."""
  splash_model = tiny_model.make_model(tiny_model.tiny_model_config(attention_impl="splash",
                                                                    **_MODEL),
                                       left_padded_windows=True)
  xla_model = tiny_model.make_model(tiny_model.tiny_model_config(attention_impl="xla", **_MODEL))
  return splash_model, xla_model


@functools.lru_cache(maxsize=1)
def _pieces(paths: tuple) -> list[np.ndarray]:
  return [np.asarray(tokens.midi_file_to_tokens(p), np.int32) for p in paths]


def _real_windows(maestro_paths) -> dict[str, np.ndarray]:
  """Left-padded windows of real pieces: one full, one whose latent block is part padding."""
  pieces = _pieces(tuple(maestro_paths[:2]))
  rows = [windows.make_window(pieces[0], 1500, max_length=320, num_latents=128),
          windows.make_window(pieces[1], 90, max_length=320, num_latents=128)]
  return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


def test_splash_model_equals_xla_model_logits_and_gradients(maestro_paths):
  splash_model, xla_model = _models()
  # Window forwards run splash; cached calls keep the CPU's choice (chunks of 24 keys).
  latent_layers = ([splash_model.latent_layers] if splash_model.scan_layers
                   else list(splash_model.latent_layers))
  for layer in list(splash_model.cross_layers) + latent_layers:
    assert (layer.attention.window_impl, layer.attention.impl) == ("splash", "chunked")
  batch = _real_windows(maestro_paths)
  targets = jnp.asarray(batch["targets"][:, -128:])

  @nnx.jit
  def loss_and_logits(model):
    def loss(model):
      logits = model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]))
      nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
      predicted = targets != tokens.PAD_ID  # the mean NLL, as training's loss
      return jnp.sum(jnp.where(predicted, nll, 0.0)) / predicted.sum(), logits
    return nnx.grad(loss, has_aux=True)(model)

  grads_splash, logits_splash = loss_and_logits(splash_model)
  grads_xla, logits_xla = loss_and_logits(xla_model)
  np.testing.assert_allclose(logits_splash, logits_xla, atol=2e-5)
  for (path, g_s), (_, g_x) in zip(nnx.to_flat_state(grads_splash),
                                   nnx.to_flat_state(grads_xla)):
    assert np.isfinite(np.asarray(g_s.get_value())).all(), path
    np.testing.assert_allclose(g_s.get_value(), g_x.get_value(), atol=1e-4, err_msg=str(path))


def test_splash_model_decodes_with_the_cached_kernel_and_matches_its_forward(maestro_paths):
  splash_model, _ = _models()
  prompt = _pieces(tuple(maestro_paths[:1]))[0][None, :200]
  out = jax.tree.map(np.asarray, decode.generate(
      splash_model, prompt, num_steps=3, keys_B=jax.random.split(jax.random.key(0), 1),
      sampling=next_token.SamplingConfig(), record_logits=True))
  # Uncached reference: the splash model's own forward (splash kernels) over each window.
  rows, firsts = [], []
  for step in range(3):
    sequence = np.concatenate([prompt[0], out["tokens"][0]])
    t = prompt.shape[1] - 1 + step
    first = max(int(out["horizon"][0, step]) - 320 + 1, 0)
    rows.append(tiny_model.window(sequence[first:t + 1], first, length=320))
    firsts.append(out["latent_start"][0, step])
  inputs, positions = tiny_model.batch(rows)
  graphdef, state = nnx.split(splash_model)
  expected = jax.jit(lambda state, i, p, f: nnx.merge(graphdef, state)(
      i, p, first_latent_position_B=f)[:, -1])(state, inputs, positions, jnp.asarray(firsts))
  np.testing.assert_allclose(out["logits"][0], expected, atol=1e-5)
