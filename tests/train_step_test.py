"""The train step's parts on real MAESTRO windows: microbatch accumulation and dropout keys."""

import functools

import jax
import numpy as np
import pytest

from perceivers_jax.configs import tiny
from perceivers_jax.data import tokens
from perceivers_jax.data import windows
from perceivers_jax.state import model_state
from perceivers_jax.training import train_step

L, N = 64, 16


@pytest.fixture(scope="module")
def batch(maestro_paths):
  """Four random effective windows of a real piece."""
  piece = tokens.midi_file_to_tokens(maestro_paths[0])
  rng = np.random.default_rng(0)
  rows = [windows.random_window(piece, rng, "effective", max_length=L, num_latents=N)
          for _ in range(4)]
  return {k: np.stack([r[k] for r in rows]) for k in train_step.BATCH_KEYS}


def _model_and_params(dropout_rate: float):
  """A small model whose zero-initialised head is made random, so every layer gets gradients."""
  config = tiny.get_config()
  config.model.max_length, config.model.num_latents, config.model.num_latent_layers = L, N, 1
  config.model.embed_dim, config.model.num_heads, config.model.head_dim = 32, 2, 16
  config.model.cross_attention_scales = (0, 16)
  config.model.dropout_rate = dropout_rate
  model = model_state.build_local(config)
  params, rest = model.init()
  kernel = params["head"]["kernel"]
  params["head"]["kernel"] = jax.random.normal(jax.random.key(1), kernel.shape) * 0.1
  return model, params, rest


def _grad_fn(model):
  return jax.grad(functools.partial(train_step.loss_fn, model=model, z_loss=1e-4), has_aux=True)


def test_microbatches_add_up_to_the_whole_batch(batch):
  """Without dropout, the gradient and loss sums over 2 interleaved microbatches are those of
  the batch in one piece (the step divides both by the same global target count)."""
  model, params, rest = _model_and_params(0.0)
  grad_fn = _grad_fn(model)
  key = train_step.dropout_key(1, 0)

  def sums_of(num_microbatches):
    return jax.device_get(jax.jit(lambda p, r, b: train_step.accumulated_grads(
        grad_fn, model, p, r, b, key, num_microbatches))(params, rest, batch))

  (whole, whole_sums), (micro, micro_sums) = sums_of(1), sums_of(2)
  assert micro_sums["count"] == whole_sums["count"] == 4 * N
  for name in ("nll", "z_loss", "correct"):
    assert micro_sums[name] == pytest.approx(whole_sums[name], rel=1e-5), name
  nonzero = 0
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(micro)):
    # Sums in another order: equal up to float32 rounding of the largest element.
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())
    nonzero += bool(np.abs(a).max() > 0)
  assert nonzero == len(jax.tree.leaves(whole))  # every parameter's gradient was compared.


def test_dropout_depends_only_on_the_key(batch):
  """`reseeded` RNG streams give the same dropout from any earlier stream state, and another
  step's key (`dropout_key`) gives other masks."""
  model, params, rest = _model_and_params(0.1)
  grad_fn = _grad_fn(model)
  loss = jax.jit(lambda r, key: grad_fn(params, train_step.reseeded(model, params, r, key),
                                        batch)[1]["nll"])
  advanced = train_step.reseeded(model, params, rest, train_step.dropout_key(7, 3))
  step_5 = train_step.dropout_key(1, 5)
  assert float(loss(rest, step_5)) == float(loss(advanced, step_5))
  assert float(loss(rest, step_5)) != float(loss(rest, train_step.dropout_key(1, 6)))
