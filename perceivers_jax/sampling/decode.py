"""Cached autoregressive sampling (README "Sampling"), the whole loop in one jitted program.

Caches:
  * per cross-attention layer, the keys/values of the inputs its latents can see, in a ring
    buffer written in turn by all rows together (a slot's stored position says what it
    holds, so nothing rolls): L slots for a full scale, W + F - 1 for a sliding scale W
    (`ring_sizes`), which is all that layer stores and reads;
  * per latent layer, the keys/values of up to N latents.
Caches are head-major, in the model dtype: keys [B, H, L, K], values [B, H, K, L], so both
cached matmuls contract the cache's minor axis (XLA's CPU fallback matmul, which [B, H, L, K]
values reached, has no bf16 x bf16 -> f32 kernel: bf16 decoding crashed at batch >= 2). A
step writes only its new slots. The attention takes [B, L, H, K]: transposed views, which XLA
folds into its matmuls (storing [B, L, H, K] made every step copy every cache).
Rows may hold prompts of different lengths (left-padded) and so sit at different positions;
their latent counts move together, so resets happen at the same step for all rows.
Each new token appends its cross keys/values and one latent, which attends to the cached
inputs and (per latent layer) to the cached latents. When N latents are cached, the latent
caches are reset: the last F tokens (default N/2) become the new latent block and run
through the latent layers together; the input cache is kept.

The loop: an inner `lax.while_loop` of plain steps while the latent caches have room, in an
outer loop whose body is one reset step. No step sits in a `lax.cond` (whose branches return,
so copy, the whole cache): the caches stay in the carries, updated in place.

Exactness: between resets, the logits of a cached step equal those of the uncached model
(`PerceiverS.__call__` with `first_latent_position_B` = the reset's first latent) on the
window of inputs with position > horizon - L, where horizon = the position at which the
latent cache will be full. Bounding every latent's keys by that fixed horizon (instead of
its own L-token window) is what makes cached latents reusable after the window slides; it
costs at most N - F of the oldest inputs of context. Only `sliding` scale masks are
supported (a `final_block` window moves with the last token, so cached latents would be
stale).

Layers are used through their steps (`CrossAttentionLayer.key_value`, the model's
`cross_attend_cached`, `over_latent_layers` with `LatentLayer.project` / `finish`): the
decoder runs the forward's combination of scales and its scan over the latent layers
rather than copies of them.
"""

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from perceivers_jax.data import tokens
from perceivers_jax.model import masks
from perceivers_jax.model import perceivers as model_lib
from perceivers_jax.sampling import next_token


@flax.struct.dataclass
class Cache:
  """Decoder state. Rows may be at different positions; their latent counts move together."""
  last_position_B: jax.Array  # int32[B]: position of each row's newest input
  num_inputs: jax.Array  # int32[]: inputs written per row; the next goes to slot num_inputs % L
  input_tokens_BL: jax.Array  # ring buffer of tokens
  # Per cross layer, its ring of R slots (`ring_sizes`): keys [B, H, R, K], values [B, H, K, R]
  # (unit B or H left out: _unit_axes_dropped) and the position [B, R] held by each slot, -1
  # if empty.
  cross_keys: tuple[jax.Array, ...]
  cross_values: tuple[jax.Array, ...]
  cross_positions: tuple[jax.Array, ...]
  latent_keys: jax.Array  # [layers, B, H, N, K]
  latent_values: jax.Array  # [layers, B, H, K, N]
  latent_positions_BN: jax.Array  # -1 for empty latent slots
  num_latents: jax.Array  # int32[]: latent slots in use (same for every row)
  horizon_B: jax.Array  # int32[B]: keys need position > horizon - L
  latent_start_B: jax.Array  # int32[B]: first latent's position since the last reset


def ring_sizes(model: model_lib.PerceiverS, num_reset_latents: int) -> tuple[int, ...]:
  """Slots of each cross layer's ring: L for a full scale; for a sliding scale W the newest
  W + F - 1 inputs (at most L), since no step adds more than F latents and the oldest of them
  sees only the W - 1 inputs before it."""
  length = model.max_length
  return tuple(min(scale + num_reset_latents - 1, length) if scale else length
               for scale in model.scales)


def init_cache(model: model_lib.PerceiverS, batch_size: int, num_reset_latents: int) -> Cache:
  """An empty cache for `model`, resets keeping `num_reset_latents` latents (F)."""
  length, n = model.max_length, model.num_latents
  rings = ring_sizes(model, num_reset_latents)
  heads, head_dim = model.num_heads, model.head_dim
  layers = model.num_latent_layers
  kv = lambda *shape: jnp.zeros(shape, model.dtype)
  zeros_B = jnp.zeros((batch_size,), jnp.int32)
  return Cache(
      last_position_B=zeros_B - 1, num_inputs=jnp.int32(0),
      input_tokens_BL=jnp.zeros((batch_size, length), jnp.int32),
      cross_keys=tuple(kv(*_unit_axes_dropped(batch_size, heads), ring, head_dim)
                       for ring in rings),
      cross_values=tuple(kv(*_unit_axes_dropped(batch_size, heads), head_dim, ring)
                         for ring in rings),
      cross_positions=tuple(jnp.full((batch_size, ring), -1, jnp.int32) for ring in rings),
      latent_keys=kv(layers, batch_size, heads, n, head_dim),
      latent_values=kv(layers, batch_size, heads, head_dim, n),
      latent_positions_BN=jnp.full((batch_size, n), -1, jnp.int32),
      num_latents=jnp.int32(0), horizon_B=zeros_B, latent_start_B=zeros_B)


def _newest_positions(cache: Cache, count: int) -> jax.Array:
  """Positions [B, count] of each row's newest `count` inputs."""
  return cache.last_position_B[:, None] - count + 1 + jnp.arange(count, dtype=jnp.int32)


# Key and value caches: [B, H, T, K] and [B, H, K, T] <-> the attention's [B, T, H, K] (views
# of the caches whose transposes XLA folds into its matmuls).
_KEY_AXES, _VALUE_AXES = (0, 2, 1, 3), (0, 2, 3, 1)
_KEY_VIEW, _VALUE_VIEW = (0, 2, 1, 3), (0, 3, 1, 2)


def _unit_axes_dropped(batch: int, heads: int) -> tuple[int, ...]:
  """The cross caches' leading axes: B and H less any of size 1. XLA drops unit axes from the
  matmuls; kept in the cache, XLA writes a second, squeezed cache for the matmul and copies
  the cache to keep both (at batch 1, four copies per cache per step)."""
  return tuple(d for d in (batch, heads) if d > 1)


def _ring_write(ring_x: jax.Array, new_x: jax.Array, first: jax.Array, axis: int) -> jax.Array:
  """`ring_x` with the entries of `new_x` (slot axis `axis`, leading axes reshaped to the
  ring's) written in turn from slot `first` % R. At most R entries: R fill the whole ring
  (rolled into place: the prompt's), fewer must not wrap past its end (T = 1, or the first
  write), so a step is one dynamic_update_slice, in place."""
  ring, count = ring_x.shape[axis], new_x.shape[axis]
  new_x = new_x.reshape(ring_x.shape[:-2] + new_x.shape[-2:]).astype(ring_x.dtype)
  start = [0] * ring_x.ndim
  if count == ring:
    new_x = jnp.roll(new_x, first % ring, axis=axis)
  else:
    start[axis] = first % ring
  return jax.lax.dynamic_update_slice(ring_x, new_x, tuple(start))


def _cache_views(k_BHTK: jax.Array, v_BHKT: jax.Array, batch: int,
                 heads: int) -> tuple[jax.Array, jax.Array]:
  """The [B, T, H, K] keys and values the attention takes, viewing the caches."""
  k_BHTK, v_BHKT = (x.reshape((batch, heads) + x.shape[-2:]) for x in (k_BHTK, v_BHKT))
  return jnp.transpose(k_BHTK, _KEY_VIEW), jnp.transpose(v_BHKT, _VALUE_VIEW)


def append_inputs(model: model_lib.PerceiverS, cache: Cache, tokens_BT: jax.Array) -> Cache:
  """Writes T new inputs per row (T <= L): tokens and, into each cross layer's ring, the
  keys/values of the newest T (at most R) of them.

  Every row writes the same ring slots, the next ones after `cache.num_inputs` (a slot's
  stored position says what it holds), so the write is one dynamic_update_slice, in place,
  not a per-row scatter (`_ring_write`: T = 1, or the first write). PAD tokens (a shorter
  prompt's left padding) are written as empty slots.
  """
  count, written = tokens_BT.shape[1], cache.num_inputs
  cache = cache.replace(last_position_B=cache.last_position_B + count,
                        num_inputs=written + count)
  positions_BT = _newest_positions(cache, count)
  embedded_BTD = model.embed_inputs(tokens_BT)
  stored_BT = jnp.where(tokens_BT != tokens.PAD_ID, positions_BT, -1)
  keys, values, positions = [], [], []
  for layer, k_cache, v_cache, p_cache in zip(model.cross_layers, cache.cross_keys,
                                              cache.cross_values, cache.cross_positions):
    keep = min(count, p_cache.shape[1])  # a short ring keeps only the newest inputs
    first = written + count - keep
    k_BTHK, v_BTHK = layer.key_value(embedded_BTD[:, -keep:], positions_BT[:, -keep:])
    keys.append(_ring_write(k_cache, jnp.transpose(k_BTHK, _KEY_AXES), first, -2))
    values.append(_ring_write(v_cache, jnp.transpose(v_BTHK, _VALUE_AXES), first, -1))
    positions.append(_ring_write(p_cache, stored_BT[:, -keep:], first, 1))
  return cache.replace(input_tokens_BL=_ring_write(cache.input_tokens_BL, tokens_BT, written, 1),
                       cross_keys=tuple(keys), cross_values=tuple(values),
                       cross_positions=tuple(positions))


def _latent_layers_step(model, cache: Cache, x_BTD, positions_BT):
  """New latents through the latent layers, appending their keys/values to the caches."""
  start = cache.num_latents
  latent_positions_BN = jax.lax.dynamic_update_slice_in_dim(cache.latent_positions_BN,
                                                            positions_BT, start, axis=1)
  n = model.num_latents
  valid_BN = jnp.broadcast_to(jnp.arange(n) < start + positions_BT.shape[1],
                              latent_positions_BN.shape)
  mask = masks.causal_mask(positions_BT, latent_positions_BN, valid_BN)

  def layer_step(layer, index, carry):
    x, keys, values = carry
    # The stacked caches are carried whole and written at one layer's new slots, in place
    # (scanning over them as xs/ys would rebuild both stacks every step).
    q, k, v = layer.project(x, positions_BT)
    keys = jax.lax.dynamic_update_slice(
        keys, jnp.transpose(k, _KEY_AXES).astype(keys.dtype)[None], (index, 0, 0, start, 0))
    values = jax.lax.dynamic_update_slice(
        values, jnp.transpose(v, _VALUE_AXES).astype(values.dtype)[None], (index, 0, 0, 0, start))
    x = layer.finish(x, q, *_cache_views(keys[index], values[index], *keys.shape[1:3]), mask,
                     deterministic=True)
    return x, keys, values

  # Through a model of fresh Variables made at this trace level: nnx.scan writes the layers'
  # state back, which NNX refuses for Variables made outside the decoder's lax loops.
  graphdef, state = nnx.split(model)
  model = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
  x_BTD, keys, values = model.over_latent_layers(
      layer_step, (x_BTD, cache.latent_keys, cache.latent_values), remat=False)
  cache = cache.replace(latent_keys=keys, latent_values=values,
                        latent_positions_BN=latent_positions_BN,
                        num_latents=start + positions_BT.shape[1])
  return x_BTD, cache


def add_latents(model: model_lib.PerceiverS, cache: Cache, count: int, *,
                reset: bool) -> tuple[jax.Array, Cache]:
  """Makes each row's newest `count` inputs latents; returns the newest latent's logits [B, V].

  With `reset`, the latent caches start over with these latents (and a new horizon).
  """
  if reset:
    cache = cache.replace(
        num_latents=jnp.int32(0),
        latent_positions_BN=jnp.full_like(cache.latent_positions_BN, -1),
        horizon_B=cache.last_position_B + model.num_latents - count,
        latent_start_B=cache.last_position_B - count + 1)
  positions_BT = _newest_positions(cache, count)
  batch = positions_BT.shape[0]
  tokens_BT = cache.input_tokens_BL[:, (cache.num_inputs - count + jnp.arange(count))
                                    % model.max_length]
  x_BTD = model.initial_latents(model.embed_inputs(tokens_BT))
  x_BTD = model.cross_attend_cached(
      x_BTD, positions_BT, tuple(_cache_views(k, v, batch, model.num_heads)
                                 for k, v in zip(cache.cross_keys, cache.cross_values)),
      cache.cross_positions, cache.horizon_B - model.max_length)
  x_BTD, cache = _latent_layers_step(model, cache, x_BTD, positions_BT)
  return model.logits(x_BTD[:, -1:])[:, 0], cache


def _check_model(model: model_lib.PerceiverS) -> None:
  if model.scale_mask != "sliding" and any(model.scales):
    raise ValueError("Cached decoding needs config.model.scale_mask='sliding' (a final_block "
                     "window moves with every token, so cached latents would go stale).")


def prefill(model: model_lib.PerceiverS, prompt_BP: jax.Array, prompt_lengths_B: jax.Array,
            num_reset_latents: int, min_prompt_length: int) -> tuple[jax.Array, Cache]:
  """Caches left-padded prompts (each row's last L tokens) and returns the next logits.

  Every row starts with min(F, min_prompt_length) latents, so latent counts stay in step.
  """
  _check_model(model)
  batch, width = prompt_BP.shape
  kept = prompt_BP[:, -model.max_length:]
  cache = init_cache(model, batch, num_reset_latents)
  # Row b's kept columns hold positions prompt_length_b - kept_width .. prompt_length_b - 1.
  cache = cache.replace(last_position_B=prompt_lengths_B.astype(jnp.int32) - kept.shape[1] - 1)
  cache = append_inputs(model, cache, kept)
  return add_latents(model, cache, min(num_reset_latents, min_prompt_length, kept.shape[1]),
                     reset=True)


def decode_step(model: model_lib.PerceiverS, cache: Cache, tokens_B: jax.Array, *,
                reset_latents: int = 0) -> tuple[jax.Array, Cache]:
  """Appends one token per row and returns the next logits. Plain step (`reset_latents` 0):
  the token becomes one more cached latent (the latent caches must have room). Reset step:
  the latent caches start over with the newest `reset_latents` tokens."""
  cache = append_inputs(model, cache, tokens_B[:, None])
  return add_latents(model, cache, reset_latents or 1, reset=bool(reset_latents))


@functools.partial(jax.jit, static_argnames=("graphdef", "num_steps", "sampling",
                                             "num_reset_latents", "min_prompt_length",
                                             "record_logits"))
def _generate(graphdef, state, prompt_BP, prompt_lengths_B, keys_B, elapsed_B, *, num_steps,
              sampling, num_reset_latents, min_prompt_length, record_logits):
  model = nnx.merge(graphdef, state)
  batch = prompt_BP.shape[0]
  logits_BV, cache = prefill(model, prompt_BP, prompt_lengths_B, num_reset_latents,
                             min_prompt_length)
  # The sounding notes are the music's, not the caches': latent resets leave them alone.
  onsets_BP = next_token.prompt_onsets(prompt_BP)
  out = dict(
      tokens=jnp.zeros((batch, num_steps), jnp.int32),
      latent_start=jnp.zeros((batch, num_steps), jnp.int32),
      horizon=jnp.zeros((batch, num_steps), jnp.int32))
  if record_logits:
    out["logits"] = jnp.zeros((batch, num_steps, logits_BV.shape[-1]), jnp.float32)
  done_B = jnp.zeros((batch,), bool)

  def running(carry):
    step, _, _, _, _, done_B, _ = carry
    return (step < num_steps) & ~done_B.all()

  def step(carry, reset_latents):
    """Samples each row's next token from the carried logits, records it, feeds it in."""
    step, logits_BV, cache, elapsed_B, onsets_BP, done_B, out = carry
    step_keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, step)
    token_B = next_token.sample_step(logits_BV, step_keys_B, elapsed_B, onsets_BP, sampling)
    token_B = jnp.where(done_B, tokens.PAD_ID, token_B)
    out = dict(out, tokens=out["tokens"].at[:, step].set(token_B),
               latent_start=out["latent_start"].at[:, step].set(cache.latent_start_B),
               horizon=out["horizon"].at[:, step].set(cache.horizon_B))
    if record_logits:
      out["logits"] = out["logits"].at[:, step].set(logits_BV)
    done_B = done_B | (token_B == tokens.EOS_ID)
    onsets_BP = next_token.update_onsets(onsets_BP, token_B, elapsed_B)
    elapsed_B = elapsed_B + next_token.shift_steps(token_B)
    logits_BV, cache = decode_step(model, cache, token_B, reset_latents=reset_latents)
    return step + 1, logits_BV, cache, elapsed_B, onsets_BP, done_B, out

  def plain_steps(carry):
    """Plain steps until the latent caches are full (or the samples end)."""
    has_room = lambda carry: running(carry) & (carry[2].num_latents < model.num_latents)
    return jax.lax.while_loop(has_room, lambda carry: step(carry, 0), carry)

  # Full latent caches are what ends `plain_steps` while running: reset, then plain steps again.
  carry = plain_steps((jnp.int32(0), logits_BV, cache, elapsed_B, onsets_BP, done_B, out))
  carry = jax.lax.while_loop(running, lambda carry: plain_steps(step(carry, num_reset_latents)),
                             carry)
  out = carry[-1]
  out["num_steps"] = carry[0]
  return out


def lower_generate(model: model_lib.PerceiverS, *, batch_size: int, prompt_length: int,
                   num_steps: int, sampling: next_token.SamplingConfig,
                   mesh: jax.sharding.Mesh, num_reset_latents: int | None = None,
                   batch_axis: str = "data") -> jax.stages.Lowered:
  """`generate`'s program for `batch_size` prompts of `prompt_length` tokens, rows split over
  `mesh`'s `batch_axis`, lowered from shapes alone (`model` may hold ShapeDtypeStructs):
  what the sampler's dry run compiles."""
  n = model.num_latents
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axis))
  row = lambda *shape, dtype=jnp.int32: jax.ShapeDtypeStruct((batch_size,) + shape, dtype,
                                                             sharding=rows)
  prompt_BP, lengths_B, keys_B, elapsed_B = (row(prompt_length), row(),
                                              row(dtype=jax.random.key(0).dtype), row())
  graphdef, state = nnx.split(model)
  return _generate.lower(
      graphdef, state, prompt_BP, lengths_B, keys_B, elapsed_B, num_steps=num_steps,
      sampling=sampling, min_prompt_length=prompt_length, record_logits=False,
      num_reset_latents=n // 2 if num_reset_latents is None else num_reset_latents)


def generate(model: model_lib.PerceiverS, prompt_BP: jax.Array, *, num_steps: int,
             keys_B: jax.Array, sampling: next_token.SamplingConfig = next_token.SamplingConfig(),
             num_reset_latents: int | None = None, record_logits: bool = False,
             mesh: jax.sharding.Mesh | None = None, batch_axis: str = "data") -> dict:
  """Samples `num_steps` tokens after each prompt row (e.g. [[SOS]] for unconditional).

  Row b draws step t with `fold_in(keys_B[b], t)`: a row's tokens depend on its key alone,
  not on the batch it runs in.

  `prompt_BP`: int tokens, rows of different lengths left-padded with PAD (positions count from
  each row's first token). Returns tokens [B, num_steps] (PAD after a row's EOS; the loop stops
  early once every row has ended), num_steps (steps run), and per row and step the
  latent_start and horizon used (the uncached reference: see module docstring); with
  `record_logits`, the logits [B, S, V] each token was sampled from. `num_reset_latents` is F
  (default N // 2). With `mesh`, rows are split over its `batch_axis` (B must divide).
  """
  n = model.num_latents
  num_reset_latents = n // 2 if num_reset_latents is None else num_reset_latents
  if not 1 <= num_reset_latents < n:
    raise ValueError(f"num_reset_latents={num_reset_latents} must be in [1, N={n}) "
                     "(F latents are kept at a reset; N/2 is the reference).")
  prompt_BP = np.asarray(prompt_BP, np.int32)
  valid_BP = prompt_BP != tokens.PAD_ID
  if prompt_BP.ndim != 2 or not valid_BP.any(axis=1).all():
    raise ValueError(f"prompt of shape {prompt_BP.shape}: need [B, P] with at least one token "
                     "per row (e.g. [[SOS]]).")
  lengths_B = valid_BP.sum(axis=1)
  left_padded_BP = np.arange(prompt_BP.shape[1]) >= prompt_BP.shape[1] - lengths_B[:, None]
  if (valid_BP != left_padded_BP).any():
    raise ValueError("prompt rows must be left-padded with PAD (0) and hold no PAD inside.")
  if keys_B.shape[:1] != prompt_BP.shape[:1]:
    raise ValueError(f"keys_B holds {keys_B.shape[0]} keys for {prompt_BP.shape[0]} rows.")
  elapsed_B = np.asarray([round(tokens.tokens_duration_seconds(row[row != tokens.PAD_ID])
                                * tokens.STEPS_PER_SECOND) for row in prompt_BP], np.int32)
  rows = (prompt_BP, lengths_B.astype(np.int32), keys_B, elapsed_B)
  if mesh is not None:
    rows = tuple(jax.device_put(x, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(batch_axis, *(None,) * (x.ndim - 1)))) for x in rows)
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, *rows, num_steps=num_steps, sampling=sampling,
                   num_reset_latents=num_reset_latents, min_prompt_length=int(lengths_B.min()),
                   record_logits=record_logits)
