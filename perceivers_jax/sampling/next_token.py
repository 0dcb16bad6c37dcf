"""The next token from the model's logits: `SamplingConfig` (temperature, top-k / top-p /
min-p filters, music-time steering of the end) and the per-row sampling the decoder runs
each step (`sample_step`, one key per row)."""

import dataclasses

import jax
import jax.numpy as jnp

from perceivers_jax.data import tokens


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 = greedy; top_k 0, top_p 1.0 and min_p 0.0 = no filter.

  min_p keeps the tokens whose probability (after temperature) is at least min_p times the
  most likely token's. Music time (the sum of TIME_SHIFTs, prompt included) steers the end:
  max_seconds > 0 turns a shift that would pass it into EOS, so no piece lasts longer;
  end_seconds > 0 adds `end_eos_nats_per_second` x (seconds past end_seconds) to the EOS
  logit, so the piece is pushed, smoothly, to finish.
  """
  # Each field's `help` is its perceivers-sample flag's help (the flags are derived from here).
  temperature: float = dataclasses.field(
      default=1.0, metadata=dict(help="Softmax temperature; 0 = greedy."))
  top_k: int = dataclasses.field(
      default=0, metadata=dict(help="Keep the k most likely tokens (0 = off)."))
  top_p: float = dataclasses.field(
      default=1.0, metadata=dict(help="Nucleus sampling mass in (0, 1] (1 = off)."))
  min_p: float = dataclasses.field(
      default=0.0, metadata=dict(help="Keep tokens with p >= min_p * p_max (0 = off)."))
  max_seconds: float = dataclasses.field(
      default=0.0, metadata=dict(help="Stop each piece by this much music (primer included; "
                                      "0 = off)."))
  end_seconds: float = dataclasses.field(
      default=0.0, metadata=dict(help="After this much music, raise the EOS probability "
                                      "smoothly so the piece finishes (0 = off)."))
  end_eos_nats_per_second: float = dataclasses.field(
      default=2.0, metadata=dict(help="With --end_seconds: nats added to the EOS logit per "
                                      "second past it."))

  def __post_init__(self):
    """Messages start with `field=value` (the perceivers-sample flags share these names)."""
    checks = (("temperature", self.temperature >= 0, ">= 0 (0 = greedy)"),
              ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
              ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1] (1 = off)"),
              ("min_p", 0.0 <= self.min_p <= 1.0, "in [0, 1] (0 = off)"),
              ("max_seconds", self.max_seconds >= 0, ">= 0 (0 = off)"),
              ("end_seconds", self.end_seconds >= 0, ">= 0 (0 = off)"),
              ("end_eos_nats_per_second", self.end_eos_nats_per_second >= 0, ">= 0"))
    for field, ok, allowed in checks:
      if not ok:
        raise ValueError(f"{field}={getattr(self, field)}: must be {allowed}.")


def filter_logits(logits_BV: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """Temperature, then top-k, top-p (nucleus) and min-p filtering; PAD and SOS are never
  sampled."""
  logits_BV = logits_BV.astype(jnp.float32)
  logits_BV = logits_BV.at[:, tokens.PAD_ID].set(-jnp.inf).at[:, tokens.SOS_ID].set(-jnp.inf)
  if sampling.temperature > 0:
    logits_BV = logits_BV / sampling.temperature
  if sampling.top_k:
    kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if sampling.top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    cumulative_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
    keep_count_B = jnp.sum(cumulative_BV - jax.nn.softmax(sorted_BV, axis=-1) < sampling.top_p,
                           axis=-1)
    threshold_B1 = jnp.take_along_axis(sorted_BV, keep_count_B[:, None] - 1, axis=-1)
    logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
  if sampling.min_p > 0.0:
    # p >= min_p * p_max  <=>  logit >= max logit + log(min_p): no softmax needed.
    floor_B1 = jnp.max(logits_BV, axis=-1, keepdims=True) + jnp.log(sampling.min_p)
    logits_BV = jnp.where(logits_BV < floor_B1, -jnp.inf, logits_BV)
  return logits_BV


def sample(logits_BV: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """int32[B] next tokens."""
  logits_BV = filter_logits(logits_BV, sampling)
  if sampling.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def shift_steps(tokens_B: jax.Array) -> jax.Array:
  """Time steps (10 ms) each token advances the music: its shift for TIME_SHIFT, else 0."""
  is_shift = (tokens_B >= tokens.TIME_SHIFT_START) & (tokens_B < tokens.VELOCITY_START)
  return jnp.where(is_shift, tokens_B - tokens.TIME_SHIFT_START + 1, 0).astype(jnp.int32)


def sample_step(logits_BV: jax.Array, keys_B: jax.Array, elapsed_B: jax.Array,
                sampling: SamplingConfig) -> jax.Array:
  """Next token per row, each row with its own key, steered by music time `elapsed_B`
  (steps of 10 ms so far) as `sampling.max_seconds` / `end_seconds` say."""
  if sampling.end_seconds > 0:
    late_s_B = jnp.maximum(elapsed_B / tokens.STEPS_PER_SECOND - sampling.end_seconds, 0.0)
    logits_BV = logits_BV.at[:, tokens.EOS_ID].add(late_s_B * sampling.end_eos_nats_per_second)
  token_B = jax.vmap(lambda l_V, key: sample(l_V[None], key, sampling)[0])(logits_BV, keys_B)
  if sampling.max_seconds > 0:
    limit = round(sampling.max_seconds * tokens.STEPS_PER_SECOND)
    token_B = jnp.where(elapsed_B + shift_steps(token_B) > limit, tokens.EOS_ID, token_B)
  return token_B
