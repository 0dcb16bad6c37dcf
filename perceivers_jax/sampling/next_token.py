"""The next token from the model's logits: `SamplingConfig` (temperature, top-k / top-p /
min-p filters, music-time steering of the end, the note grammar and note-length prior) and
the per-row sampling the decoder runs each step (`sample_step`, one key per row).

Performance events describe notes: a pitch sounds from its NOTE_ON to its NOTE_OFF. The
decoder carries each row's sounding notes as their onsets, int32 [B, 128] (the music time of
the NOTE_ON in 10 ms steps, `SILENT` for a pitch that does not sound), built from the prompt
(`prompt_onsets`) and updated by every sampled token (`update_onsets`).
"""

import dataclasses

import jax
import jax.numpy as jnp

from perceivers_jax.data import tokens


# 90% of the notes of the 10 real MAESTRO pieces (sustain folded in, 101,901 notes) are
# shorter than 1.09 s (median 0.25 s, 99% 3.7 s): a note held longer is likely one the model
# forgot to end. With 8 nats/s past it, the demo model's samples came closest to the held-out
# music's note lengths and Table I NLH/NLTM (benchmarks/RESULTS.md, "Note grammar").
NOTE_OFF_AFTER_SECONDS = 1.1


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 = greedy; top_k 0, top_p 1.0 and min_p 0.0 = no filter.

  min_p keeps the tokens whose probability (after temperature) is at least min_p times the
  most likely token's. Music time (the sum of TIME_SHIFTs, prompt included) steers the end:
  max_seconds > 0 turns a shift that would pass it into EOS, so no piece lasts longer;
  end_seconds > 0 adds `end_eos_nats_per_second` x (seconds past end_seconds) to the EOS
  logit, so the piece is pushed, smoothly, to finish.

  note_grammar never samples an event that decodes to nothing: the NOTE_OFF of a pitch that
  does not sound, the NOTE_ON of one that does (a repeated note is NOTE_OFF then NOTE_ON, as
  the tokeniser writes it). note_off_after_seconds > 0 adds `note_off_nats_per_second` x
  (seconds past note_off_after_seconds) to a sounding note's NOTE_OFF logit, so notes the
  model forgets to end do end (`NOTE_OFF_AFTER_SECONDS`). Both leave every other logit as the
  model gave it.
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
  note_grammar: bool = dataclasses.field(
      default=True, metadata=dict(help="Never sample a NOTE_OFF of a silent pitch or a NOTE_ON "
                                       "of a sounding one (events that decode to nothing)."))
  note_off_after_seconds: float = dataclasses.field(
      default=NOTE_OFF_AFTER_SECONDS, metadata=dict(
          help="Raise a sounding note's NOTE_OFF logit once it has lasted this long (0 = off; "
               "default: 90% of real MAESTRO notes are shorter)."))
  note_off_nats_per_second: float = dataclasses.field(
      default=8.0, metadata=dict(help="With --note_off_after_seconds: nats added to the "
                                      "NOTE_OFF logit per second past it."))

  def __post_init__(self):
    """Messages start with `field=value` (the perceivers-sample flags share these names)."""
    checks = (("temperature", self.temperature >= 0, ">= 0 (0 = greedy)"),
              ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
              ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1] (1 = off)"),
              ("min_p", 0.0 <= self.min_p <= 1.0, "in [0, 1] (0 = off)"),
              ("max_seconds", self.max_seconds >= 0, ">= 0 (0 = off)"),
              ("end_seconds", self.end_seconds >= 0, ">= 0 (0 = off)"),
              ("end_eos_nats_per_second", self.end_eos_nats_per_second >= 0, ">= 0"),
              ("note_off_after_seconds", self.note_off_after_seconds >= 0, ">= 0 (0 = off)"),
              ("note_off_nats_per_second", self.note_off_nats_per_second >= 0, ">= 0"))
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


SILENT = -1  # the onset of a pitch that does not sound


def update_onsets(onsets_BP: jax.Array, tokens_B: jax.Array, elapsed_B: jax.Array) -> jax.Array:
  """Each row's sounding notes after its token: NOTE_ON p (re)starts p at `elapsed_B`,
  NOTE_OFF p silences it, other tokens change nothing."""
  is_on_B = (tokens_B >= tokens.NOTE_ON_START) & (tokens_B < tokens.NOTE_OFF_START)
  is_off_B = (tokens_B >= tokens.NOTE_OFF_START) & (tokens_B < tokens.TIME_SHIFT_START)
  pitch_B = jnp.where(is_on_B, tokens_B - tokens.NOTE_ON_START, tokens_B - tokens.NOTE_OFF_START)
  hit_BP = jnp.arange(tokens.NUM_PITCHES) == pitch_B[:, None]
  onsets_BP = jnp.where(hit_BP & is_on_B[:, None], elapsed_B[:, None], onsets_BP)
  return jnp.where(hit_BP & is_off_B[:, None], SILENT, onsets_BP)


def prompt_onsets(prompt_BT: jax.Array) -> jax.Array:
  """The sounding notes int32 [B, 128] after each row's prompt (left padding changes
  nothing): `update_onsets` token by token, with the prompt's own music time."""
  batch = prompt_BT.shape[0]

  def step(carry, tokens_B):
    onsets_BP, elapsed_B = carry
    return (update_onsets(onsets_BP, tokens_B, elapsed_B), elapsed_B + shift_steps(tokens_B)), None

  start = (jnp.full((batch, tokens.NUM_PITCHES), SILENT, jnp.int32), jnp.zeros(batch, jnp.int32))
  (onsets_BP, _), _ = jax.lax.scan(step, start, prompt_BT.T)
  return onsets_BP


def steer_notes(logits_BV: jax.Array, onsets_BP: jax.Array, elapsed_B: jax.Array,
                sampling: SamplingConfig) -> jax.Array:
  """The note grammar and the note-length prior (`SamplingConfig`); NOTE_ON and NOTE_OFF
  logits are changed only where they say, every other token's never."""
  sounding_BP = onsets_BP != SILENT
  on_BP = logits_BV[:, tokens.NOTE_ON_START:tokens.NOTE_OFF_START]
  off_BP = logits_BV[:, tokens.NOTE_OFF_START:tokens.TIME_SHIFT_START]
  if sampling.note_off_after_seconds > 0:
    held_s_BP = (elapsed_B[:, None] - onsets_BP) / tokens.STEPS_PER_SECOND
    late_s_BP = jnp.maximum(held_s_BP - sampling.note_off_after_seconds, 0.0)
    off_BP = off_BP + jnp.where(sounding_BP, late_s_BP * sampling.note_off_nats_per_second, 0.0)
  if sampling.note_grammar:
    on_BP = jnp.where(sounding_BP, -jnp.inf, on_BP)
    off_BP = jnp.where(sounding_BP, off_BP, -jnp.inf)
  return jnp.concatenate([logits_BV[:, :tokens.NOTE_ON_START], on_BP, off_BP,
                          logits_BV[:, tokens.TIME_SHIFT_START:]], axis=-1)


def sample_step(logits_BV: jax.Array, keys_B: jax.Array, elapsed_B: jax.Array,
                onsets_BP: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """Next token per row, each row with its own key, steered by music time `elapsed_B`
  (steps of 10 ms so far) as `sampling.max_seconds` / `end_seconds` say, and by its sounding
  notes `onsets_BP` as `sampling.note_grammar` / `note_off_after_seconds` say."""
  if sampling.note_grammar or sampling.note_off_after_seconds > 0:
    logits_BV = steer_notes(logits_BV.astype(jnp.float32), onsets_BP, elapsed_B, sampling)
  if sampling.end_seconds > 0:
    late_s_B = jnp.maximum(elapsed_B / tokens.STEPS_PER_SECOND - sampling.end_seconds, 0.0)
    logits_BV = logits_BV.at[:, tokens.EOS_ID].add(late_s_B * sampling.end_eos_nats_per_second)
  token_B = jax.vmap(lambda l_V, key: sample(l_V[None], key, sampling)[0])(logits_BV, keys_B)
  if sampling.max_seconds > 0:
    limit = round(sampling.max_seconds * tokens.STEPS_PER_SECOND)
    token_B = jnp.where(elapsed_B + shift_steps(token_B) > limit, tokens.EOS_ID, token_B)
  return token_B
