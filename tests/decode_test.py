"""Cached decoding equals the uncached model between resets; sampling filters; EOS stop."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_model
from perceivers_jax.data import tokens
from perceivers_jax.sampling import decode
from perceivers_jax.sampling import next_token
from tiny_model import L, N

PROMPT_LENGTHS = (5, 3)  # left-padded to 5: rows sit at different positions
STEPS = 100  # 105 tokens > L = 64: the window slides; resets every N - F + 1 = 9 steps.


def _keys(seed: int, rows: int) -> jax.Array:
  return jax.random.split(jax.random.key(seed), rows)


def _reset_rule(prompt_lengths, steps, reset_latents=N // 2):
  """(latent_start, horizon) [B, steps] of the latent block each token is sampled from.

  SPEC 4: the prompt starts with min(F, shortest prompt) latents; each token adds one; when N
  are cached the next token resets the block to its newest F inputs. A block starting at
  position s fills at s + N - 1: its horizon (keys must lie within L of it).
  """
  count = min(reset_latents, min(prompt_lengths))
  newest = np.asarray(prompt_lengths) - 1  # position of each row's newest input
  start = newest - count + 1
  starts = []
  for step in range(steps):
    if step:  # token step - 1 was appended
      newest = newest + 1
      count, start = ((reset_latents, newest - reset_latents + 1) if count == N
                      else (count + 1, start))
    starts.append(start)
  starts_BS = np.stack(starts, axis=1)
  return starts_BS, starts_BS + N - 1


def _uncached_logits(model, prompts, out, starts_BS=None, horizons_BS=None) -> np.ndarray:
  """The uncached reference [B, S, V] of every step of `out` (see the module docstring of
  decode): each step's window from its horizon, latents from its last reset (by default
  the decoder's own `horizon` and `latent_start`)."""
  starts_BS = out["latent_start"] if starts_BS is None else starts_BS
  horizons_BS = out["horizon"] if horizons_BS is None else horizons_BS
  rows, firsts = [], []
  for row, prompt_row in enumerate(prompts):
    sequence = np.concatenate([prompt_row, out["tokens"][row]])
    for step in range(int(out["num_steps"])):
      t = len(prompt_row) - 1 + step  # newest input when token `step` was sampled
      first = max(int(horizons_BS[row, step]) - L + 1, 0)  # oldest input in context
      rows.append(tiny_model.window(sequence[first:t + 1], first))
      firsts.append(starts_BS[row, step])
  inputs, positions = tiny_model.batch(rows)
  graphdef, state = nnx.split(model)

  @jax.jit
  def reference(state, inputs, positions, firsts):
    return nnx.merge(graphdef, state)(inputs, positions, first_latent_position_B=firsts)[:, -1]

  logits = np.asarray(reference(state, inputs, positions, jnp.asarray(firsts)))
  return logits.reshape(len(prompts), int(out["num_steps"]), -1)


@pytest.mark.parametrize("overrides", [
    dict(),  # scanned, cascade, scales (0, 8)
    dict(scan_layers=False, combine="sum", cross_attention_scales=(4, 0),
         remat_policy="nothing_saveable"),
])
def test_cached_logits_equal_uncached_forward_between_resets(overrides):
  model = tiny_model.make_model(tiny_model.tiny_model_config(**overrides))
  bias = model.head.bias  # no EOS: every row runs all steps (rows stop at EOS)
  bias.set_value(bias.get_value().at[1].set(-30.0))
  prompts = [tiny_model.piece(n, seed) for seed, n in enumerate(PROMPT_LENGTHS)]
  width = max(PROMPT_LENGTHS)
  prompt = np.stack([np.pad(p, (width - len(p), 0)) for p in prompts])
  out = decode.generate(model, prompt, num_steps=STEPS, keys_B=_keys(0, len(prompt)),
                        sampling=next_token.SamplingConfig(temperature=1.0,
                                                           note_grammar=False),
                        record_logits=True)
  out = jax.tree.map(np.asarray, out)
  assert out["num_steps"] == STEPS and (out["tokens"] > 2).all()
  # The reference's latent block and horizon come from the reset rule, not from the decoder.
  starts_BS, horizons_BS = _reset_rule(PROMPT_LENGTHS, STEPS)
  np.testing.assert_array_equal(out["latent_start"], starts_BS)
  np.testing.assert_array_equal(out["horizon"], horizons_BS)
  for row in range(len(PROMPT_LENGTHS)):
    assert len(np.unique(starts_BS[row])) == 11 and horizons_BS[row].max() > L

  expected = _uncached_logits(model, prompts, out, starts_BS, horizons_BS)
  np.testing.assert_allclose(out["logits"], expected, atol=1e-5)


def test_sampling_filters():
  logits = jnp.asarray([[0.0, 5.0, 9.0, 1.0, 2.0, 3.0, 4.0]])  # PAD=0, EOS=1, SOS=2
  greedy = next_token.SamplingConfig(temperature=0.0)
  assert int(next_token.sample(logits, jax.random.key(0), greedy)[0]) == 1  # SOS never sampled
  top2 = next_token.filter_logits(logits, next_token.SamplingConfig(top_k=2))
  np.testing.assert_array_equal(np.isfinite(top2[0]), [0, 1, 0, 0, 0, 0, 1])
  # Softmax over {5, 4, 3, 2, 1} (PAD/SOS removed): p(EOS) = 0.64, p(6) = 0.24, p(5) = 0.09.
  top_p = next_token.filter_logits(logits, next_token.SamplingConfig(top_p=0.8))
  np.testing.assert_array_equal(np.isfinite(top_p[0]), [0, 1, 0, 0, 0, 0, 1])
  only_best = next_token.filter_logits(logits, next_token.SamplingConfig(top_p=0.1))
  np.testing.assert_array_equal(np.isfinite(only_best[0]), [0, 1, 0, 0, 0, 0, 0])
  keys = jax.random.split(jax.random.key(1), 200)
  draws = jax.vmap(lambda k: next_token.sample(logits, k, next_token.SamplingConfig(top_k=2)))(keys)
  assert set(np.unique(draws)) == {1, 6}
  with pytest.raises(ValueError, match="top_p"):
    next_token.SamplingConfig(top_p=0.0)


@pytest.mark.parametrize("min_p,temperature", [(0.3, 1.0), (0.05, 1.0), (0.3, 0.5), (1.0, 1.0)])
def test_min_p_keeps_exactly_tokens_at_least_min_p_times_the_best(min_p, temperature):
  logits = jax.random.normal(jax.random.key(3), (4, 391)) * 3.0
  kept = next_token.filter_logits(logits, next_token.SamplingConfig(temperature=temperature,
                                                            min_p=min_p))
  reference = np.asarray(logits, np.float64) / temperature
  reference[:, [0, 2]] = -np.inf  # PAD and SOS are never sampled
  probs = np.exp(reference - reference.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  expected = probs >= min_p * probs.max(-1, keepdims=True) * (1 - 1e-6)
  np.testing.assert_array_equal(np.isfinite(kept), expected)
  assert expected.sum() >= 4  # at least the best token per row
  with pytest.raises(ValueError, match="min_p"):
    next_token.SamplingConfig(min_p=1.5)


def test_per_sequence_eos_stop():
  model = tiny_model.make_model(tiny_model.tiny_model_config())
  bias = model.head.bias
  bias.set_value(bias.get_value().at[1].set(4.0))  # EOS likely: rows end at different steps
  prompt = np.stack([tiny_model.piece(5, s) for s in range(4)])
  out = jax.tree.map(np.asarray, decode.generate(model, prompt, num_steps=STEPS,
                                                 keys_B=_keys(3, len(prompt))))
  ends = [int(np.argmax(row == 1)) for row in out["tokens"]]
  assert all((row == 1).any() for row in out["tokens"])
  assert len(set(ends)) > 1
  for row, end in zip(out["tokens"], ends):
    assert (row[end + 1:] == 0).all() and (row[:end] > 2).all()
  assert out["num_steps"] == max(ends) + 1  # the loop stops once every row has ended
  with pytest.raises(ValueError, match="left-padded"):
    decode.generate(model, np.asarray([[2, 5, 0]]), num_steps=2, keys_B=_keys(0, 1))
  with pytest.raises(ValueError, match="final_block"):
    decode.generate(tiny_model.make_model(tiny_model.tiny_model_config(
        scale_mask="final_block")), prompt, num_steps=2, keys_B=_keys(0, len(prompt)))


def _music_model():
  """A tiny model whose head prefers 0.5 s time shifts, notes and velocities, never EOS."""
  model = tiny_model.make_model(tiny_model.tiny_model_config())
  bias = np.full(model.head.bias.get_value().shape, -20.0, np.float32)
  bias[tokens.TIME_SHIFT_START + 49] = 0.0  # 50 steps = 0.5 s
  bias[tokens.NOTE_ON_START + 60] = 0.0
  bias[tokens.VELOCITY_START + 20] = 0.0
  model.head.bias.set_value(jnp.asarray(bias))
  return model


def test_max_seconds_bounds_the_music_time_prompt_included():
  model = _music_model()
  prompt = np.asarray([[tokens.SOS_ID, tokens.TIME_SHIFT_START + 99]])  # 1 s already
  sampling = next_token.SamplingConfig(max_seconds=3.0)
  out = jax.tree.map(np.asarray, decode.generate(model, prompt, num_steps=60, keys_B=_keys(0, 1),
                                                 sampling=sampling))
  row = out["tokens"][0][:out["num_steps"]]
  assert row[-1] == tokens.EOS_ID  # stopped by the limit, not by the model
  piece = np.concatenate([prompt[0], row])
  assert tokens.tokens_duration_seconds(piece) == pytest.approx(3.0)
  free = jax.tree.map(np.asarray, decode.generate(model, prompt, num_steps=60,
                                                  keys_B=_keys(0, 1)))
  assert tokens.tokens_duration_seconds(np.concatenate([prompt[0], free["tokens"][0]])) > 5.0


def test_end_seconds_raises_eos_smoothly_after_that_time():
  model = _music_model()
  prompt = np.full((16, 1), tokens.SOS_ID)
  sampling = next_token.SamplingConfig(end_seconds=2.0, end_eos_nats_per_second=4.0)
  out = jax.tree.map(np.asarray, decode.generate(model, prompt, num_steps=200,
                                                 keys_B=_keys(1, 16), sampling=sampling))
  durations = []
  for row in out["tokens"]:
    assert (row == tokens.EOS_ID).any()  # every piece was steered to finish
    end = int(np.argmax(row == tokens.EOS_ID))
    durations.append(tokens.tokens_duration_seconds(row[:end]))
  assert min(durations) >= 2.0  # no EOS push before end_seconds
  assert len(set(durations)) > 1  # a ramp, not a hard cut
  # EOS (logit -20) draws level with the three favoured tokens 20/4 = 5 s after end_seconds.
  assert max(durations) < 2.0 + 5.0 + 2.5


def test_a_rows_tokens_depend_on_its_key_only():
  model = tiny_model.make_model(tiny_model.tiny_model_config())
  keys = _keys(5, 3)
  prompt = np.full((3, 1), tokens.SOS_ID)
  together = np.asarray(decode.generate(model, prompt, num_steps=20, keys_B=keys)["tokens"])
  alone = np.asarray(decode.generate(model, prompt[:1], num_steps=20, keys_B=keys[2:])["tokens"])
  np.testing.assert_array_equal(together[2], alone[0])
  assert not np.array_equal(together[0], together[1])


def test_bfloat16_decoding_at_batch_4_past_two_resets_matches_float32():
  # XLA's CPU fallback matmul has no bf16 x bf16 -> f32 kernel: a value cache whose minor axis
  # is not the contracted one crashed here at the first reset.
  models = {dtype: tiny_model.make_model(tiny_model.tiny_model_config(dtype=dtype))
            for dtype in ("bfloat16", "float32")}  # same float32 parameters
  for model in models.values():
    model.head.bias.set_value(model.head.bias.get_value().at[1].set(-30.0))  # no EOS
  lengths = (5, 3, 4, 5)
  prompts = [tiny_model.piece(n, seed) for seed, n in enumerate(lengths)]
  prompt = np.stack([np.pad(p, (max(lengths) - len(p), 0)) for p in prompts])
  out = jax.tree.map(np.asarray, decode.generate(
      models["bfloat16"], prompt, num_steps=30, keys_B=_keys(4, len(prompt)),
      sampling=next_token.SamplingConfig(note_grammar=False), record_logits=True))
  assert out["num_steps"] == 30
  # 3 latents after the prefill (shortest prompt), full after 13 steps, then every 9 steps.
  assert len(np.unique(out["latent_start"][0])) == 3  # prefill + two resets
  expected = _uncached_logits(models["float32"], prompts, out)
  np.testing.assert_allclose(out["logits"], expected, atol=0.1, rtol=0.02)  # max 0.08 seen
  assert np.abs(out["logits"] - expected).mean() < 0.02  # 0.009 seen


def _hlo_copies():
  """benchmarks/hlo_copies.py (the copy counter behind the sampling benchmark)."""
  path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "hlo_copies.py"
  spec = importlib.util.spec_from_file_location("hlo_copies", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("impl", ["xla", "auto"])  # auto: the chunked kernel at resets (L > chunk)
def test_compiled_decode_loop_copies_no_cache_per_step(batch, impl):
  model = tiny_model.make_model(tiny_model.tiny_model_config(cross_attention_scales=(0,),
                                                             attention_impl=impl))
  graphdef, state = nnx.split(model)
  compiled = decode._generate.lower(  # pylint: disable=protected-access
      graphdef, state, np.full((batch, 1), tokens.SOS_ID, np.int32), np.ones(batch, np.int32),
      _keys(0, batch), np.zeros(batch, np.int32), num_steps=40,
      sampling=next_token.SamplingConfig(), num_reset_latents=N // 2, min_prompt_length=1,
      record_logits=False).compile()
  latent_cache_bytes = batch * model.num_heads * N * model.head_dim * 4
  copies = _hlo_copies().cache_copies(compiled.as_text(), latent_cache_bytes)
  assert copies["per_step"] == []
  # The counter sees copies: every reset attends F queries over transposed scores.
  assert copies["per_reset"]


def _note_model():
  """A tiny model whose head prefers NOTE_ON 60, NOTE_OFF 60 and NOTE_OFF 61, never EOS."""
  model = tiny_model.make_model(tiny_model.tiny_model_config())
  bias = np.full(model.head.bias.get_value().shape, -40.0, np.float32)
  for token in (tokens.NOTE_ON_START + 60, tokens.NOTE_OFF_START + 60,
                tokens.NOTE_OFF_START + 61):
    bias[token] = 0.0
  model.head.bias.set_value(jnp.asarray(bias))
  return model


def test_note_grammar_per_row_across_latent_resets():
  """Rows 0 and 3's primer leaves pitch 60 sounding, rows 1 and 2's does not: with the
  grammar each row alternates NOTE_OFF 60 / NOTE_ON 60 from its own state, through 10 latent
  resets, and the silent pitch 61 is never ended, though the model favours all three."""
  model = _note_model()
  on, off = tokens.NOTE_ON_START + 60, tokens.NOTE_OFF_START + 60
  shift = tokens.TIME_SHIFT_START + 9
  sounding, silent = [tokens.SOS_ID, on, shift, off, on], [tokens.SOS_ID, on, shift, off, shift]
  # 4 rows of 5 tokens, default sampling (grammar on): test_per_sequence_eos_stop's program.
  prompt = np.asarray([sounding, silent, silent, sounding])
  grammar = jax.tree.map(np.asarray, decode.generate(model, prompt, num_steps=STEPS,
                                                     keys_B=_keys(0, 4)))
  assert grammar["num_steps"] == STEPS
  assert len(np.unique(grammar["latent_start"][0])) == 11  # the prefill's block + 10 resets
  sounding_first, silent_first = [off, on] * (STEPS // 2), [on, off] * (STEPS // 2)
  np.testing.assert_array_equal(grammar["tokens"],
                                [sounding_first, silent_first, silent_first, sounding_first])


def test_prompt_onsets_are_the_notes_a_real_piece_leaves_sounding(maestro_paths):
  piece = tokens.midi_file_to_tokens(maestro_paths[2])
  cuts = (1, 40, 333, 1000, 2500)
  width = max(cuts)
  prompt = np.stack([np.pad(piece[:cut], (width - cut, 0)) for cut in cuts])
  onsets = np.asarray(next_token.prompt_onsets(jnp.asarray(prompt)))
  for cut, onsets_P in zip(cuts, onsets):
    hanging = tokens._hanging_notes(piece[1:cut])  # pylint: disable=protected-access
    expected = np.full(tokens.NUM_PITCHES, next_token.SILENT)
    for pitch, onset in hanging:
      expected[pitch] = onset
    np.testing.assert_array_equal(onsets_P, expected)
  np.testing.assert_array_equal((onsets != next_token.SILENT).sum(axis=1), [0, 2, 1, 2, 1])


def test_note_steering_changes_only_the_logits_it_names(maestro_paths):
  """Grammar: the masked logits equal the model's on every allowed token and are -inf on the
  events that decode to nothing. Prior: a sounding note's NOTE_OFF rises by rate x seconds
  past note_off_after_seconds, nothing else moves."""
  piece = tokens.midi_file_to_tokens(maestro_paths[2])
  prompt = np.stack([piece[:2500], piece[500:3000]])
  onsets_BP = next_token.prompt_onsets(jnp.asarray(prompt))
  elapsed_B = jnp.asarray([round(tokens.tokens_duration_seconds(row) * 100) for row in prompt])
  sounding_BP = np.asarray(onsets_BP) != next_token.SILENT
  logits_BV = jax.random.normal(jax.random.key(0), (2, tokens.VOCAB_SIZE)) * 3.0
  masked = np.asarray(next_token.steer_notes(
      logits_BV, onsets_BP, elapsed_B, next_token.SamplingConfig(note_grammar=True)))
  allowed_BV = np.ones(masked.shape, bool)
  allowed_BV[:, tokens.NOTE_ON_START:tokens.NOTE_OFF_START] = ~sounding_BP
  allowed_BV[:, tokens.NOTE_OFF_START:tokens.TIME_SHIFT_START] = sounding_BP
  np.testing.assert_array_equal(masked[allowed_BV], np.asarray(logits_BV)[allowed_BV])
  assert np.isneginf(masked[~allowed_BV]).all() and 0 < sounding_BP.sum() < 20

  prior = next_token.SamplingConfig(note_grammar=False, note_off_after_seconds=0.5,
                                    note_off_nats_per_second=3.0)
  later_B = elapsed_B + jnp.asarray([30, 120])  # 0.3 and 1.2 s after the cuts
  raised = np.asarray(next_token.steer_notes(logits_BV, onsets_BP, later_B, prior))
  held_s_BP = (np.asarray(later_B)[:, None] - np.asarray(onsets_BP)) / 100
  expected = np.asarray(logits_BV).copy()
  expected[:, tokens.NOTE_OFF_START:tokens.TIME_SHIFT_START] += np.where(
      sounding_BP, 3.0 * np.maximum(held_s_BP - 0.5, 0), 0)
  np.testing.assert_allclose(raised, expected, rtol=1e-6)
  assert (raised != np.asarray(logits_BV)).any()
