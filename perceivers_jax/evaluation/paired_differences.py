"""Paired differences between two models over seeds: a 95% t interval, and the effect size the
design could have detected.

Two models trained with the same seeds (the same data order and held-out pieces per seed) give
one difference d_s = a_s - b_s per seed. The interval is mean(d) +- t(0.975, n-1) sd(d)/sqrt(n).
A difference is *resolved* only when that interval excludes 0. When it does not, the minimum
detectable effect says how large a true difference this design (n seeds, this spread) would
have found with 80% power: (t(0.975, n-1) + t(0.8, n-1)) sd(d)/sqrt(n), the usual
approximation for a paired t test.
"""

from collections.abc import Sequence
import math
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
POWER = 0.8


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
  """a - b per seed, with its mean, 95% interval, whether it is resolved, and the minimum
  detectable effect (interval and effect are None with fewer than two seeds)."""
  if len(a) != len(b) or not len(a):
    raise ValueError(f"paired values need the same seeds, got {len(a)} and {len(b)}")
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  n = d.size
  out = {"mean": float(d.mean()), "per_seed": [float(x) for x in d], "seeds": n,
         "low": None, "high": None, "resolved": False, "minimum_detectable": None}
  if n < 2:
    return out
  standard_error = float(d.std(ddof=1)) / math.sqrt(n)
  t_interval = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1))
  out["low"] = out["mean"] - t_interval * standard_error
  out["high"] = out["mean"] + t_interval * standard_error
  out["resolved"] = out["low"] > 0 or out["high"] < 0
  out["minimum_detectable"] = (t_interval + float(stats.t.ppf(POWER, n - 1))) * standard_error
  return out
