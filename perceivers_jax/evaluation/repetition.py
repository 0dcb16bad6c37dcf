"""Repetition measures: repetitive-note density (the paper's Figure 5) and token autocorrelation.

Repetitive note: notes are read in onset order (ties by pitch); a note is repetitive if
the pitch n-gram ending at it (its pitch and the NGRAM - 1 pitches before it) also ended
at an earlier note whose onset lies at most WINDOW_S seconds before its own. Occurrences
may overlap, so a note repeated NGRAM + 1 times in a row is repetitive. Density: the
repetitive notes starting in each BIN_S-second time bin of the piece, divided by BIN_S
(the last, partial bin too), i.e. repetitive notes per second along the piece.

Token autocorrelation (chance corrected, after the paper's eq. for rho):
  rho(k) = (r(k) - sum_v p_v^2) / (1 - sum_v p_v^2),
r(k) = share of positions t with x_t = x_{t+k}, p_v = share of token v in the sequence.
PAD, SOS and EOS are dropped first (only the events of a piece count). rho is 0 for a
sequence whose repeats are at chance level and 1 for one that repeats exactly at lag k;
a constant sequence (sum p_v^2 = 1) gives rho = 1 at every lag.
"""

import numpy as np

from perceivers_jax.data import tokens as tokens_lib
from perceivers_jax.evaluation import features as features_lib

NGRAM = 4
WINDOW_S = 4.0
BIN_S = 10.0
MAX_LAG = 128


def repetitive_notes(notes: features_lib.Notes, ngram: int = NGRAM,
                     window_s: float = WINDOW_S) -> np.ndarray:
  """bool [n]: whether each note ends a pitch n-gram seen within the previous window_s."""
  n = len(notes)
  if n < ngram:
    return np.zeros(n, bool)
  # Each n-gram as one int64 key: pitches are 0..127, 7 bits each.
  keys = np.zeros(n - ngram + 1, np.int64)
  for offset in range(ngram):
    keys = keys * 128 + notes.pitches[offset:n - ngram + 1 + offset]
  # Stable sort groups equal keys in note order: each one's predecessor in its group is
  # its most recent earlier occurrence, the one closest in time.
  order = np.argsort(keys, kind="stable")
  same_as_previous = keys[order[1:]] == keys[order[:-1]]
  current, previous = order[1:][same_as_previous], order[:-1][same_as_previous]
  ends = ngram - 1  # key i ends at note i + ngram - 1
  gap = notes.starts[current + ends] - notes.starts[previous + ends]
  mask = np.zeros(n, bool)
  mask[current[gap <= window_s] + ends] = True
  return mask


def repetition_density(notes: features_lib.Notes, bin_s: float = BIN_S, ngram: int = NGRAM,
                       window_s: float = WINDOW_S) -> tuple[np.ndarray, np.ndarray]:
  """Repetitive notes per second in consecutive bin_s-second bins.

  Returns:
    (bin start times in seconds, density per bin), both float64 [num_bins], covering
    [0, end of the last note); empty for an empty piece.
  """
  num_bins = int(np.ceil(notes.duration / bin_s))
  mask = repetitive_notes(notes, ngram, window_s)
  bins = np.minimum((notes.starts[mask] / bin_s).astype(np.int64), max(num_bins - 1, 0))
  counts = np.bincount(bins, minlength=num_bins)
  return np.arange(num_bins) * bin_s, counts / bin_s


def repetition_summary(notes: features_lib.Notes, ngram: int = NGRAM,
                       window_s: float = WINDOW_S) -> dict[str, float]:
  """Whole-piece figures: share of repetitive notes and repetitive notes per second."""
  mask = repetitive_notes(notes, ngram, window_s)
  return {"repetitive_share": float(mask.mean()) if mask.size else 0.0,
          "repetitive_per_second": float(mask.sum() / max(notes.duration, 1e-9))}


def event_tokens(token_ids: np.ndarray) -> np.ndarray:
  """The event ids of a token sequence: PAD, SOS and EOS removed."""
  token_ids = np.asarray(token_ids).reshape(-1)
  reserved = (tokens_lib.PAD_ID, tokens_lib.SOS_ID, tokens_lib.EOS_ID)
  return token_ids[~np.isin(token_ids, reserved)]


def token_autocorrelation(token_ids: np.ndarray, max_lag: int = MAX_LAG) -> np.ndarray:
  """Chance-corrected autocorrelation rho(k) for k = 1..max_lag: float64 [max_lag].

  Lags at or beyond the sequence length have no pairs and give NaN.
  """
  x = event_tokens(token_ids)
  rho = np.full(max_lag, np.nan)
  if not x.size:
    return rho
  _, counts = np.unique(x, return_counts=True)
  chance = float(np.sum((counts / x.size) ** 2))
  for k in range(1, min(max_lag, x.size - 1) + 1):
    r = float(np.mean(x[:-k] == x[k:]))
    rho[k - 1] = 1.0 if chance >= 1.0 else (r - chance) / (1.0 - chance)
  return rho
