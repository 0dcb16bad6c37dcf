"""Window arithmetic (README "Windows"): the one place that cuts pieces into model windows.

A piece is `x = [SOS, t_1, ..., EOS]` of length n. A window with exclusive end e holds
`x[max(0, e-L-1) : e]`: inputs `x[s : e-1]` at absolute positions s..e-2 and targets
`x[s+1 : e]`. The model predicts from its latent block, the last N inputs, so a window
ending at e can predict the tokens at positions max(s+1, e-N) .. e-1.

- baseline (Perceiver AR): start uniform in [0, n-L-1], i.e. end uniform in
  [min(n, L+1), n]: the first tokens of a long piece are never targets.
- effective random: end uniform in [min(n, N+1), n]: every target reachable.
- effective sequential: ends e_k = min(n, k*N + 1) until e_k = n; each window predicts
  only the positions its predecessor did not, so every target is predicted once.

Each window is a dict of int32 [L] arrays `inputs`, `positions` (-1 in padding) and
`targets` (PAD outside prediction slots), padded on the left (default) or the right.
"""

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np

from perceivers_jax.data import tokens as tokens_lib

WindowKind = Literal["effective", "baseline"]
PaddingSide = Literal["left", "right"]
WINDOW_KINDS = ("effective", "baseline")
PADDING_SIDES = ("left", "right")


def _check_lengths(max_length: int, num_latents: int) -> None:
  if not 0 < num_latents <= max_length:
    raise ValueError(f"need 0 < num_latents (N={num_latents}) <= max_length "
                     f"(L={max_length})")


def min_end(n: int, kind: WindowKind, *, max_length: int, num_latents: int) -> int:
  """Smallest exclusive end a random window of `kind` may have in a piece of length n."""
  if kind == "effective":
    return min(n, num_latents + 1)
  if kind == "baseline":
    return min(n, max_length + 1)
  raise ValueError(f"window kind must be one of {WINDOW_KINDS}, got {kind!r}")


def sample_end(rng: np.random.Generator, n: int, kind: WindowKind, *,
               max_length: int, num_latents: int) -> int:
  """An exclusive end drawn uniformly over the ends `kind` allows (see module doc)."""
  if n < 2:
    raise ValueError(f"a piece needs at least 2 tokens (SOS, EOS), got {n}")
  low = min_end(n, kind, max_length=max_length, num_latents=num_latents)
  return int(rng.integers(low, n + 1))


def sequential_ends(n: int, num_latents: int) -> list[tuple[int, int]]:
  """(end, first_target) of the sequential windows of a piece of length n.

  Ends are e_k = min(n, k*N + 1), k = 1, 2, ... until e_k = n; window k predicts the
  target positions [first_target, end) with first_target = e_{k-1} (1 for k = 1).
  """
  if n < 2:
    raise ValueError(f"a piece needs at least 2 tokens (SOS, EOS), got {n}")
  if num_latents < 1:
    raise ValueError(f"num_latents must be positive, got {num_latents}")
  pairs = []
  first_target = 1
  while first_target < n:
    end = min(n, first_target + num_latents)
    pairs.append((end, first_target))
    first_target = end
  return pairs


def make_window(piece: np.ndarray, end: int, *, max_length: int, num_latents: int,
                first_target: int = 0,
                padding_side: PaddingSide = "left") -> dict[str, np.ndarray]:
  """The window of `piece` with exclusive end `end`, padded to `max_length`.

  Prediction slots are the latent block's inputs whose target position is at least
  `first_target` (0: the whole latent block).
  """
  _check_lengths(max_length, num_latents)
  n = len(piece)
  if not 2 <= end <= n:
    raise ValueError(f"window end must lie in [2, {n}] for a piece of length {n}, got {end}")
  start = max(0, end - max_length - 1)
  length = end - 1 - start
  positions = np.arange(start, end - 1, dtype=np.int32)
  first_predicted = max(end - 1 - num_latents, start, first_target - 1)
  targets = np.where(positions >= first_predicted, piece[start + 1:end], tokens_lib.PAD_ID)

  window = empty_window(max_length)
  if padding_side == "left":
    valid = slice(max_length - length, max_length)
  elif padding_side == "right":
    valid = slice(0, length)
  else:
    raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
  window["inputs"][valid] = piece[start:end - 1]
  window["positions"][valid] = positions
  window["targets"][valid] = targets
  return window


def random_window(piece: np.ndarray, rng: np.random.Generator, kind: WindowKind, *,
                  max_length: int, num_latents: int,
                  padding_side: PaddingSide = "left") -> dict[str, np.ndarray]:
  """One random training window of `kind`; its whole latent block is predicted."""
  end = sample_end(rng, len(piece), kind, max_length=max_length, num_latents=num_latents)
  return make_window(piece, end, max_length=max_length, num_latents=num_latents,
                     padding_side=padding_side)


def sequential_windows(piece: np.ndarray, *, max_length: int, num_latents: int,
                       padding_side: PaddingSide = "left"
                       ) -> Iterator[dict[str, np.ndarray]]:
  """The effective sequential windows of a piece, each predicting only new targets."""
  for end, first_target in sequential_ends(len(piece), num_latents):
    yield make_window(piece, end, max_length=max_length, num_latents=num_latents,
                      first_target=first_target, padding_side=padding_side)


def empty_window(max_length: int) -> dict[str, np.ndarray]:
  """An all-PAD row (no inputs, no targets) that fills out fixed-shape eval batches."""
  return {
      "inputs": np.full(max_length, tokens_lib.PAD_ID, np.int32),
      "positions": np.full(max_length, -1, np.int32),
      "targets": np.full(max_length, tokens_lib.PAD_ID, np.int32),
  }


def num_sequential_windows(lengths: Sequence[int], num_latents: int) -> int:
  """How many sequential windows pieces of the given lengths make."""
  return sum(-(-(n - 1) // num_latents) for n in lengths)
