"""A tiny PerceiverS config and batch helpers shared by the model, attention and decode tests."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from perceivers_jax import config_base
from perceivers_jax.model import perceivers as model_lib
from perceivers_jax.parallel import partitioning

L, N = 64, 16


def tiny_model_config(**overrides) -> ml_collections.ConfigDict:
  """L=64, N=16, width 32, 2 heads x 16, 2 latent layers, scales (0, 8), float32, xla."""
  cfg = config_base.base_config().model
  cfg.update(dict(max_length=L, num_latents=N, embed_dim=32, num_heads=2, head_dim=16,
                  num_latent_layers=2, cross_attention_scales=(0, 8), dtype="float32",
                  attention_impl="xla", attention_chunk_size=24, remat_policy="none"))
  cfg.update(overrides)
  return cfg


def make_model(cfg: ml_collections.ConfigDict, seed: int = 0, *,
               left_padded_windows: bool = False) -> model_lib.PerceiverS:
  """A model whose zero-initialised head is replaced by a random one (so logits vary)."""
  model = model_lib.PerceiverS(cfg, rngs=nnx.Rngs(seed), left_padded_windows=left_padded_windows)
  kernel = model.head.kernel
  shape = kernel.get_value().shape  # [D, V]; scaled so logits are O(1)
  kernel.set_value(jax.random.normal(jax.random.key(seed + 1), shape) * shape[0] ** -0.5)
  return model


def jit_forward(model: model_lib.PerceiverS):
  """(jitted f(state, inputs, positions) -> logits, state): one compilation per model."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, inputs_BL, positions_BL):
    return nnx.merge(graphdef, state)(inputs_BL, positions_BL)

  return forward, state


def logits_of(model: model_lib.PerceiverS, inputs_BL, positions_BL) -> np.ndarray:
  """Deterministic logits of `model` (compiles once per call)."""
  forward, state = jit_forward(model)
  return np.asarray(forward(state, inputs_BL, positions_BL))


def piece(length: int, seed: int = 0) -> np.ndarray:
  """A random token sequence starting with SOS."""
  rng = np.random.RandomState(seed)
  return np.concatenate([[2], rng.randint(3, 391, length - 1)]).astype(np.int32)


def window(tokens: np.ndarray, start_position: int = 0, *, side: str = "left",
           length: int = L) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, positions) of one row holding `tokens` (positions from start_position), padded."""
  n = len(tokens)
  inputs = np.zeros(length, np.int32)
  positions = np.full(length, -1, np.int32)
  sl = slice(length - n, length) if side == "left" else slice(0, n)
  inputs[sl] = tokens
  positions[sl] = np.arange(start_position, start_position + n)
  return inputs, positions


def batch(rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[jax.Array, jax.Array]:
  return (jnp.asarray(np.stack([r[0] for r in rows])),
          jnp.asarray(np.stack([r[1] for r in rows])))


def create_sharded(model_fn, mesh: jax.sharding.Mesh, rules) -> nnx.Module:
  """Builds `model_fn()` directly sharded over `mesh`, never materialised on one device."""
  abstract = nnx.eval_shape(model_fn)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = partitioning.state_shardings(abstract_state, mesh, rules)

  def init():
    return nnx.state(model_fn())

  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)
