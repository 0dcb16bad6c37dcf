"""Window arithmetic (README "Windows"): baseline, effective random and effective sequential."""

import collections

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest
from scipy import stats

from perceivers_jax.data import tokens
from perceivers_jax.data import windows


def _piece(n):
  # Distinct non-PAD values: a token's value tells its position (value - 3).
  return np.arange(n, dtype=np.int32) + 3


def _valid_triples(window):
  """Multiset of (position, input, target) over the non-padding slots."""
  valid = window["positions"] >= 0
  return collections.Counter(zip(window["positions"][valid].tolist(),
                                 window["inputs"][valid].tolist(),
                                 window["targets"][valid].tolist()))


def _check_window(window, piece, max_length, num_latents):
  """Contract checks shared by every window kind; returns the predicted positions."""
  for key in ("inputs", "positions", "targets"):
    assert window[key].shape == (max_length,) and window[key].dtype == np.int32
  pos, inputs, targets = window["positions"], window["inputs"], window["targets"]
  valid = pos >= 0
  assert np.all(inputs[~valid] == tokens.PAD_ID) and np.all(targets[~valid] == tokens.PAD_ID)
  # Absolute, consecutive positions; inputs and targets are the piece's tokens there.
  np.testing.assert_array_equal(pos[valid], np.arange(pos[valid][0], pos[valid][0] + valid.sum()))
  np.testing.assert_array_equal(inputs[valid], piece[pos[valid]])
  predicted = targets != tokens.PAD_ID
  np.testing.assert_array_equal(targets[predicted], piece[pos[predicted] + 1])
  # Prediction slots lie in the latent block: the last N valid inputs.
  valid_idx = np.flatnonzero(valid)
  block = valid_idx[-num_latents:]
  assert set(np.flatnonzero(predicted)) <= set(block)
  return pos[predicted] + 1


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(n=st.integers(2, 120), num_latents=st.integers(1, 12),
                  extra=st.integers(0, 30), padding_side=st.sampled_from(windows.PADDING_SIDES))
def test_sequential_windows_predict_every_target_exactly_once(n, num_latents, extra,
                                                             padding_side):
  max_length = num_latents + extra
  piece = _piece(n)
  counts = np.zeros(n, np.int64)
  pairs = windows.sequential_ends(n, num_latents)
  assert [e for e, _ in pairs] == [min(n, k * num_latents + 1) for k in range(1, len(pairs) + 1)]
  assert pairs[-1][0] == n
  assert len(pairs) == windows.num_sequential_windows([n], num_latents)
  for window in windows.sequential_windows(piece, max_length=max_length,
                                           num_latents=num_latents, padding_side=padding_side):
    np.add.at(counts, _check_window(window, piece, max_length, num_latents), 1)
  assert counts[0] == 0 and np.all(counts[1:] == 1)


def test_sequential_windows_grow_then_slide():
  piece = _piece(40)
  ws = list(windows.sequential_windows(piece, max_length=12, num_latents=4))
  valid_lengths = [int((w["positions"] >= 0).sum()) for w in ws]
  firsts = [int(w["positions"][w["positions"] >= 0][0]) for w in ws]
  # Ends 5, 9, 13, 17, ... 37, 40: prefixes until L+1 = 13 tokens, then slide by N.
  assert valid_lengths == [4, 8, 12, 12, 12, 12, 12, 12, 12, 12]
  assert firsts == [0, 0, 0, 4, 8, 12, 16, 20, 24, 27]
  # The last window slides by 3 only; it predicts only the 3 targets not yet predicted.
  assert (ws[-1]["targets"] != tokens.PAD_ID).sum() == 3


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(n=st.integers(2, 80), num_latents=st.integers(1, 10), extra=st.integers(0, 20),
                  kind=st.sampled_from(windows.WINDOW_KINDS), seed=st.integers(0, 2**31))
def test_left_and_right_padding_hold_the_same_slots(n, num_latents, extra, kind, seed):
  max_length = num_latents + extra
  piece = _piece(n)
  left, right = (
      windows.random_window(piece, np.random.default_rng(seed), kind, max_length=max_length,
                            num_latents=num_latents, padding_side=side)
      for side in windows.PADDING_SIDES)
  assert _valid_triples(left) == _valid_triples(right)
  for window in (left, right):
    predicted = _check_window(window, piece, max_length, num_latents)
    # Random windows predict their whole latent block.
    assert len(predicted) == min(num_latents, int((window["positions"] >= 0).sum()))
  valid = left["positions"] >= 0
  assert np.all(valid[np.argmax(valid):])  # left padding: padding first
  assert np.all(right["positions"][:valid.sum()] >= 0)


def test_effective_random_ends_are_uniform():
  n, num_latents, max_length = 60, 8, 16
  rng = np.random.default_rng(0)
  ends = [windows.sample_end(rng, n, "effective", max_length=max_length,
                             num_latents=num_latents) for _ in range(20_000)]
  counts = np.bincount(ends, minlength=n + 1)
  assert counts[:num_latents + 1].sum() == 0
  observed = counts[num_latents + 1:]  # ends N+1 .. n
  assert len(observed) == n - num_latents and observed.min() > 0
  assert stats.chisquare(observed).pvalue > 1e-3
  # A piece shorter than N+1 is taken whole.
  assert windows.sample_end(rng, 5, "effective", max_length=16, num_latents=8) == 5


def test_effective_random_reaches_every_target_baseline_does_not():
  n, num_latents, max_length = 100, 8, 32
  piece = _piece(n)
  rng = np.random.default_rng(1)
  reached = {kind: np.zeros(n, bool) for kind in windows.WINDOW_KINDS}
  for kind in windows.WINDOW_KINDS:
    for _ in range(2000):
      window = windows.random_window(piece, rng, kind, max_length=max_length,
                                     num_latents=num_latents)
      reached[kind][_check_window(window, piece, max_length, num_latents)] = True
  assert reached["effective"][1:].all()
  # Baseline windows end at >= L+1, so targets before position L+1-N are never seen.
  first_baseline = max_length + 1 - num_latents
  assert not reached["baseline"][:first_baseline].any()
  assert reached["baseline"][first_baseline:].all()


def test_baseline_window_of_a_short_piece_is_the_whole_piece():
  piece = _piece(10)
  window = windows.random_window(piece, np.random.default_rng(0), "baseline", max_length=16,
                                 num_latents=4)
  np.testing.assert_array_equal(window["positions"][-9:], np.arange(9))
  assert window["inputs"][-9] == piece[0]


def test_bad_arguments_are_named():
  piece = _piece(10)
  with pytest.raises(ValueError, match="num_latents"):
    windows.make_window(piece, 5, max_length=4, num_latents=8)
  with pytest.raises(ValueError, match="padding_side"):
    windows.make_window(piece, 5, max_length=8, num_latents=4, padding_side="middle")
  with pytest.raises(ValueError, match="window kind"):
    windows.sample_end(np.random.default_rng(0), 10, "random", max_length=8, num_latents=4)
  with pytest.raises(ValueError, match="window end"):
    windows.make_window(piece, 11, max_length=8, num_latents=4)
