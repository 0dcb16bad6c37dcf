"""The bar a trained model's NLL must clear: what knowing only token frequencies scores."""

import numpy as np

from perceivers_jax.data import tokens


def frequency_only_nll(train_pieces: list[np.ndarray], eval_pieces: list[np.ndarray]) -> float:
  """min(unigram entropy of the training tokens, NLL of that unigram on the evaluated targets).

  A model that learned only the training tokens' frequencies scores the second; the issue's
  bar is the first. Below both means the model uses context. Targets are every token after
  each piece's SOS (only the first is never predicted).
  """
  counts_V = np.bincount(np.concatenate(train_pieces), minlength=tokens.VOCAB_SIZE)
  p_V = counts_V / counts_V.sum()
  entropy = -float(np.sum(p_V[p_V > 0] * np.log(p_V[p_V > 0])))
  targets = np.concatenate([piece[1:] for piece in eval_pieces])
  with np.errstate(divide="ignore"):
    cross_entropy = -float(np.mean(np.log(p_V[targets])))
  return min(entropy, cross_entropy)
