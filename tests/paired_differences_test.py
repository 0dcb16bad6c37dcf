"""Paired differences over seeds: the t interval, the resolved rule and the minimum detectable
effect, against values worked out by hand."""

import pytest

from perceivers_jax.evaluation import paired_differences


def test_separated_seed_ranges_are_not_enough_to_resolve_a_difference():
  # Every seed of a is above every seed of b (the old "seed ranges do not overlap" rule, which
  # chance meets 10% of the time with 3 seeds), but the paired differences vary too much.
  a, b = [3.0, 3.1, 3.2], [2.9, 2.0, 1.0]
  assert min(a) > max(b)
  d = paired_differences.paired_difference(a, b)
  assert d["per_seed"] == pytest.approx([0.1, 1.1, 2.2])
  assert d["low"] < 0 < d["high"] and not d["resolved"]


def test_interval_and_detectable_effect_by_hand():
  d = paired_differences.paired_difference([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])  # d = 1, 2, 3
  # mean 2, sd 1, se 1/sqrt(3); t(0.975, 2) = 4.3027, t(0.8, 2) = 1.0607.
  assert d["mean"] == pytest.approx(2.0)
  assert (d["low"], d["high"]) == pytest.approx((2 - 2.4841, 2 + 2.4841), abs=1e-4)
  assert d["minimum_detectable"] == pytest.approx((4.3027 + 1.0607) / 3**0.5, abs=1e-4)
  assert not d["resolved"]
  steady = paired_differences.paired_difference([1.0, 1.1, 1.2], [0.5, 0.6, 0.72])
  assert steady["low"] > 0 and steady["resolved"]


def test_one_seed_gives_no_interval():
  d = paired_differences.paired_difference([1.0], [0.5])
  assert d == {"mean": 0.5, "per_seed": [0.5], "seeds": 1, "low": None, "high": None,
               "resolved": False, "minimum_detectable": None}
  with pytest.raises(ValueError, match="same seeds"):
    paired_differences.paired_difference([1.0, 2.0], [1.0])
