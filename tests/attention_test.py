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


@pytest.mark.parametrize("backend, dtype, kv_length, expected", [
    ("gpu", jnp.bfloat16, 32768, "cudnn"),
    ("gpu", jnp.float16, 100, "cudnn"),
    ("gpu", jnp.float32, 32768, "chunked"),  # cuDNN needs half precision
    ("gpu", jnp.float32, 1024, "xla"),
    ("tpu", jnp.bfloat16, 32768, "chunked"),
    ("tpu", jnp.bfloat16, 2047, "xla"),
    ("cpu", jnp.bfloat16, 32768, "chunked"),
    ("cpu", jnp.float32, 4097, "chunked"),
    ("cpu", jnp.float32, 4096, "xla"),  # one chunk: the chunked kernel would gain nothing
])
def test_auto_impl_per_backend(backend, dtype, kv_length, expected):
  resolve = lambda requested: attention.resolve_impl(
      requested, backend=backend, dtype=dtype, kv_length=kv_length, chunk_size=4096,
      head_dim=64)
  assert resolve("auto") == expected
  # cudnn where it cannot run falls back to the backend's auto choice; others run as asked.
  assert resolve("cudnn") == expected
  assert resolve("xla") == "xla" and resolve("chunked") == "chunked"
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    resolve("flash")


@pytest.mark.parametrize("backend, dtype", [("gpu", jnp.bfloat16), ("tpu", jnp.bfloat16),
                                            ("cpu", jnp.float32)])
def test_auto_runs_a_decoder_step_with_plain_xla_on_every_backend(backend, dtype):
  resolve = lambda requested: attention.resolve_impl(
      requested, backend=backend, dtype=dtype, kv_length=32768, chunk_size=1024, call="step",
      num_queries=1, head_dim=64)
  assert resolve("auto") == "xla"  # one query: nothing to save, and no per-token cache copy
  assert resolve("splash") == "xla"
  assert resolve("chunked") == "chunked"  # an explicit kernel runs where it can


@pytest.fixture
def hopper_cudnn(monkeypatch):
  """jax's own cuDNN shape rules (check_is_flash_attention) runnable here, as on an H100 with
  cuDNN 9.10: the GPU queries they make are answered as such a machine would."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_rules  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(cudnn_rules, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(cudnn_rules, "check_compute_capability", lambda c: c <= "9.0")
  monkeypatch.setattr(cudnn_rules, "is_cuda_compute_capability_equal", lambda c: c == "9.0")
  monkeypatch.setattr(attention, "_cudnn_max_head_dim", lambda: 256)
  return cudnn_rules


def _jax_accepts(cudnn_rules, *, dtype, head_dim, num_queries, kv_length, training):
  q = jax.ShapeDtypeStruct((2, num_queries, 4, head_dim), dtype)
  kv = jax.ShapeDtypeStruct((2, kv_length, 4, head_dim), dtype)
  try:
    cudnn_rules.check_is_flash_attention(q, kv, kv, cudnn_rules.AttentionLayout.BTNH.value,
                                         91000, True, training)
  except NotImplementedError:
    return False
  return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)  # its dtype check comes earlier


@pytest.mark.parametrize("num_queries, kv_length, head_dim, dtype", [
    (1024, 2047, 64, jnp.bfloat16),  # the short scale's window before it was padded
    (1024, 2048, 64, jnp.bfloat16),
    (1023, 32768, 64, jnp.bfloat16),
    (512, 1535, 64, jnp.float16),  # the decoder's reset over a short ring (inference)
    (1024, 32768, 60, jnp.bfloat16),  # head dim not a multiple of 8
    (1024, 32768, 256, jnp.bfloat16),
    (1024, 32768, 264, jnp.bfloat16),
    (1024, 32768, 64, jnp.float32),
])
def test_auto_gives_cudnn_only_calls_jax_cudnn_accepts(hopper_cudnn, num_queries, kv_length,
                                                       head_dim, dtype):
  for call, training in (("window", True), ("cached", False)):
    accepted = _jax_accepts(hopper_cudnn, dtype=dtype, head_dim=head_dim,
                            num_queries=num_queries, kv_length=kv_length, training=training)
    choice = attention.resolve_impl("auto", backend="gpu", dtype=dtype, kv_length=kv_length,
                                    chunk_size=1024, call=call, num_queries=num_queries,
                                    head_dim=head_dim)
    assert (choice == "cudnn") == accepted, (call, choice, accepted)
    # Asked for explicitly, cudnn still never runs where jax would refuse it.
    asked = attention.resolve_impl("cudnn", backend="gpu", dtype=dtype, kv_length=kv_length,
                                   chunk_size=1024, call=call, num_queries=num_queries,
                                   head_dim=head_dim)
    assert asked == choice


def test_paper_size_training_passes_jax_cudnn_rules_for_a_gpu(hopper_cudnn):
  """The paper model built for a GPU: tracing its training step's gradient runs jax's cuDNN
  checks on every window call (both cross-attention scales and the latent layers), as the
  first step on an H100 would. The short scale's 2,047 keys failed them ("Unsupported
  sequence length Q 1024, KV 2047")."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from perceivers_jax import config_base  # pylint: disable=g-import-not-at-top
  from perceivers_jax.model import perceivers  # pylint: disable=g-import-not-at-top
  cfg = config_base.base_config().model
  model = nnx.eval_shape(lambda: perceivers.PerceiverS(cfg, rngs=nnx.Rngs(0),
                                                       left_padded_windows=True, backend="gpu"))
  assert {layer.attention.window_impl for layer in model.cross_layers} == {"cudnn"}
  assert model.latent_layers.attention.window_impl == "cudnn"
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  batch = jax.ShapeDtypeStruct((2, cfg.max_length), jnp.int32)

  def loss(params, rest, inputs, positions):
    fresh = lambda state: jax.tree.map(lambda x: x, state)  # Variables of this trace
    model = nnx.merge(graphdef, fresh(params), fresh(rest))
    return model(inputs, positions, deterministic=False).sum()

  calls = []
  check = hopper_cudnn.check_is_flash_attention
  def counted(query, key, *args, **kwargs):
    calls.append((query.shape[1], key.shape[1]))
    return check(query, key, *args, **kwargs)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(hopper_cudnn, "check_is_flash_attention", counted)
    jax.eval_shape(jax.grad(loss), params, rest, batch, batch)
  assert {(1024, 32768), (1024, 2048), (1024, 1024)} <= set(calls)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
def test_cudnn_matches_xla_on_gpu():
  q, k, v, mask = _random_problem(length=64)
  q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
  xla = attention.dot_product_attention(q, k, v, mask, impl="xla").astype(jnp.float32)
  cudnn = attention.dot_product_attention(q, k, v, mask, impl="cudnn").astype(jnp.float32)
  np.testing.assert_allclose(cudnn, xla, atol=3e-2)
  np.testing.assert_array_equal(cudnn[1, :2], 0.0)


# Long enough that the short scale's key window, padded to whole kernel blocks, is shorter.
_WINDOWED_L = 320


def _windowed_and_full(**overrides):
  """The same parameters as a windowed model and a masked-full (windowed_scales=False) one."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from perceivers_jax.model import perceivers  # pylint: disable=g-import-not-at-top
  import tiny_model  # pylint: disable=g-import-not-at-top
  overrides = dict(max_length=_WINDOWED_L, **overrides)
  windowed = tiny_model.make_model(tiny_model.tiny_model_config(**overrides))
  full = perceivers.PerceiverS(tiny_model.tiny_model_config(windowed_scales=False, **overrides),
                               rngs=nnx.Rngs(1))
  nnx.update(full, nnx.state(windowed, nnx.Param))
  return windowed, full


def _mixed_windows():
  """Rows: a full window (positions from 300), left/right padded 40-token pieces, a 5-token
  piece (fewer than N) and a 20-token one (fewer than N + W - 1)."""
  import tiny_model  # pylint: disable=g-import-not-at-top
  long_piece = tiny_model.piece(_WINDOWED_L, seed=1)
  short = tiny_model.piece(40, seed=2)
  window = lambda *a, **k: tiny_model.window(*a, length=_WINDOWED_L, **k)
  return tiny_model.batch([window(long_piece, 300), window(short, 7, side="left"),
                           window(short, side="right"), window(short[:5], side="left"),
                           window(short[:20], 3, side="left")])


@pytest.mark.parametrize("combine", ["cascade", "sum"])
def test_windowed_sliding_scale_equals_masked_full_layer(combine):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import tiny_model  # pylint: disable=g-import-not-at-top
  windowed, full = _windowed_and_full(combine=combine, cross_attention_scales=(0, 6))
  # N + W - 1 = 21 keys, padded to one kernel block of 128 (the extra keys are masked).
  assert windowed.key_lengths == (_WINDOWED_L, attention.KEY_BLOCK)
  assert full.key_lengths == (_WINDOWED_L, _WINDOWED_L)
  inputs, positions = _mixed_windows()
  weights = jax.random.normal(jax.random.key(3), (inputs.shape[0], tiny_model.N, 391))

  def loss_and_grads(model):
    @nnx.jit
    def step(model):
      def loss(model):
        logits = model(inputs, positions)
        return jnp.sum(logits * weights), logits
      return nnx.value_and_grad(loss, has_aux=True)(model)
    (_, logits), grads = step(model)
    forward, state = tiny_model.jit_forward(model)
    flops = forward.lower(state, inputs, positions).compile().cost_analysis()["flops"]
    return logits, nnx.state(grads, nnx.Param), flops

  logits_w, grads_w, flops_w = loss_and_grads(windowed)
  logits_f, grads_f, flops_f = loss_and_grads(full)
  np.testing.assert_allclose(logits_w, logits_f, atol=1e-5)
  assert np.abs(np.asarray(logits_f)).max() > 0.1
  for (path, g_w), (_, g_f) in zip(nnx.to_flat_state(grads_w), nnx.to_flat_state(grads_f)):
    # float32 sums in another order: 1e-5 of the leaf's largest gradient.
    scale = max(1.0, float(np.abs(g_f.get_value()).max()))
    np.testing.assert_allclose(g_w.get_value(), g_f.get_value(), atol=1e-5 * scale,
                               err_msg=str(path))
  assert flops_w < 0.95 * flops_f  # the short scale's masked-away work is gone
