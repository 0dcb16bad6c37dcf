"""Memorisation check: how much of each generated piece is copied from the training pieces.

A piece becomes a string of note-to-note steps: for consecutive notes (onset order on the
tokens' 10 ms grid, ties by pitch) the pitch interval and the inter-onset time, the latter
in `IOI_QUANTUM_STEPS` (30 ms) bins up to `MAX_IOI_BINS` (2 s and longer share one bin).
Velocity and durations are ignored and a transposed copy gives the same steps. A run of
k shared steps is a run of k + 1 shared notes.

Per piece, with the matching statistics ms[i] (the longest prefix of the piece's steps
from i that occurs anywhere in the training pieces):
  longest_run: max ms + 1 notes, and where in which training piece it is;
  copied_share: the share of its notes inside shared runs of >= MIN_RUN_NOTES notes.
A continuation's primer was given, not generated: its notes (those of the first
`prompt_tokens` tokens of a `perceivers-sample` sidecar) are left out of both figures, so a
primer taken from a training piece is not counted as copied.
The held-out reference set gets the same figures, as the baseline of what chance and
common idioms (scales, repeated chords) give.

Search: one suffix array of all training steps (prefix doubling with numpy sorts, each
piece ended by its own sentinel so no run spans two pieces), then, for every position of
every generated piece at once, a binary search in it whose comparisons take the longest
common prefix from polynomial prefix hashes (mod 2**64). 1,000 pieces of 1,000 notes
against 5M training notes take about 2 minutes on one core (benchmarks/memorisation.py).
"""

from collections.abc import Mapping, Sequence
import dataclasses
import json
import os
import pathlib

import numpy as np

from perceivers_jax.data import tokens as tokens_lib
from perceivers_jax.evaluation import features as features_lib
from perceivers_jax.evaluation import piece_sets

IOI_QUANTUM_STEPS = 3  # 30 ms: chord spreads and tiny timing noise fall in one bin
MAX_IOI_BINS = 67  # 67 * 30 ms ~ 2 s
MIN_RUN_NOTES = 16
_NUM_INTERVALS = 2 * 127 + 1
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd, so invertible mod 2**64
_BASE_INVERSE = np.uint64(pow(int(_BASE), -1, 2**64))
_MIX = np.uint64(0xBF58476D1CE4E5B9)


def note_steps(starts_s: np.ndarray, pitches: np.ndarray) -> np.ndarray:
  """int64[num_notes - 1] step symbols (>= 0) of a piece's notes."""
  onsets = np.round(np.asarray(starts_s, np.float64) * tokens_lib.STEPS_PER_SECOND).astype(np.int64)
  pitches = np.asarray(pitches, np.int64)
  order = np.lexsort((pitches, onsets))
  onsets, pitches = onsets[order], pitches[order]
  ioi_bins = np.minimum(np.round(np.diff(onsets) / IOI_QUANTUM_STEPS), MAX_IOI_BINS)
  return (np.diff(pitches) + 127) * (MAX_IOI_BINS + 1) + ioi_bins.astype(np.int64)


def _powers(base: np.uint64, count: int) -> np.ndarray:
  out = np.full(count, base, np.uint64)
  out[0] = 1
  return np.cumprod(out, dtype=np.uint64)  # wraps mod 2**64


@dataclasses.dataclass
class _Text:
  """Pieces' steps joined, each followed by a sentinel (a negative id unique to it)."""
  symbols: np.ndarray  # int64[n]
  starts: np.ndarray  # int64[pieces]: offset of each piece's first step
  remaining: np.ndarray  # int64[n]: steps before the next sentinel
  prefix: np.ndarray  # uint64[n + 1]: sum_{t<k} x_t * BASE_INVERSE**t
  base_powers: np.ndarray  # uint64[n + 1]

  @classmethod
  def join(cls, pieces: Sequence[np.ndarray], first_sentinel: int) -> "_Text":
    lengths = np.array([len(p) + 1 for p in pieces], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    symbols = np.empty(int(lengths.sum()), np.int64)
    ends = starts + lengths - 1
    for piece, start in zip(pieces, starts):
      symbols[start:start + len(piece)] = piece
    symbols[ends] = first_sentinel - np.arange(len(pieces))
    piece_of = np.repeat(np.arange(len(pieces)), lengths)
    remaining = ends[piece_of] - np.arange(symbols.size)
    x = (symbols.astype(np.uint64) + np.uint64(1)) * _MIX
    prefix = np.zeros(symbols.size + 1, np.uint64)
    np.cumsum(x * _powers(_BASE_INVERSE, symbols.size), out=prefix[1:])
    return cls(symbols, starts, remaining, prefix, _powers(_BASE, symbols.size + 1))

  def hash(self, at: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Position-independent hash of symbols[at:at + length] (vectorised)."""
    return (self.prefix[at + length] - self.prefix[at]) * self.base_powers[at]


def suffix_array(symbols: np.ndarray) -> np.ndarray:
  """Start offsets of all suffixes in lexicographic order (prefix doubling, O(n log^2 n))."""
  n = symbols.size
  rank = np.unique(symbols, return_inverse=True)[1].astype(np.int64)
  h = 1
  while True:
    second = np.full(n, -1, np.int64)  # past the end: the empty suffix, smallest
    second[:max(n - h, 0)] = rank[h:]
    order = np.lexsort((second, rank))
    key_rank, key_second = rank[order], second[order]
    new = np.concatenate([[0], np.cumsum((key_rank[1:] != key_rank[:-1])
                                         | (key_second[1:] != key_second[:-1]))])
    rank = np.empty(n, np.int64)
    rank[order] = new
    if new[-1] == n - 1 or h >= n:
      return order
    h *= 2


def _common_prefix(query: _Text, q: np.ndarray, corpus: _Text, c: np.ndarray) -> np.ndarray:
  """Longest common prefix of query suffixes q and corpus suffixes c (sentinels excluded)."""
  lo = np.zeros(q.size, np.int64)
  hi = np.minimum(query.remaining[q], corpus.remaining[c])
  for _ in range(int(hi.max(initial=0)).bit_length()):
    mid = (lo + hi + 1) // 2
    same = query.hash(q, mid) == corpus.hash(c, mid)
    lo = np.where(same, mid, lo)
    hi = np.where(same, hi, mid - 1)
  return lo


class Corpus:
  """The training pieces' steps, indexed for matching statistics."""

  def __init__(self, pieces: Sequence[np.ndarray], names: Sequence[str]):
    if not pieces:
      raise ValueError("the training set is empty")
    self.names = list(names)
    self.text = _Text.join(pieces, first_sentinel=-1)
    self.order = suffix_array(self.text.symbols)
    self.num_notes = int(sum(len(p) + 1 for p in pieces))

  def matching_statistics(self, query: _Text) -> tuple[np.ndarray, np.ndarray]:
    """(ms, corpus offset of a longest match) for every query position."""
    positions = np.arange(query.symbols.size)
    lo, hi = np.zeros_like(positions), np.full_like(positions, self.order.size)
    for _ in range(int(self.order.size).bit_length()):
      active = lo < hi
      mid = np.minimum((lo + hi) // 2, self.order.size - 1)
      c = self.order[mid]
      common = _common_prefix(query, positions, self.text, c)
      greater = query.symbols[positions + common] > self.text.symbols[c + common]
      lo = np.where(active & greater, mid + 1, lo)
      hi = np.where(active & ~greater, mid, hi)
    best, where = np.zeros_like(positions), np.zeros_like(positions)
    for neighbour in (lo - 1, lo):  # the longest match is with a suffix next to the insertion point
      valid = (neighbour >= 0) & (neighbour < self.order.size)
      c = self.order[np.clip(neighbour, 0, self.order.size - 1)]
      common = np.where(valid, _common_prefix(query, positions, self.text, c), 0)
      better = common > best
      best, where = np.where(better, common, best), np.where(better, c, where)
    return best, where

  def check(self, pieces: Sequence[np.ndarray],
            primer_notes: Sequence[int] | None = None) -> list[dict]:
    """Per piece (as `note_steps`): longest shared run and share of notes in long runs,
    counting only notes from `primer_notes[i]` on (its first notes are a given primer)."""
    query = _Text.join(pieces, first_sentinel=-1 - len(self.names))
    ms, where = self.matching_statistics(query)
    results = []
    for i, (piece, start) in enumerate(zip(pieces, query.starts)):
      num_notes = len(piece) + 1
      first = primer_notes[i] if primer_notes else 0
      run, at = ms[start:start + len(piece)], where[start:start + len(piece)]
      # Notes after the primer in the run of notes i .. i + run[i].
      steps = np.arange(len(piece))
      generated = np.maximum(steps + run + 1 - np.maximum(steps, first), 0)
      covered = np.zeros(num_notes + 1, np.int64)
      long_runs = np.flatnonzero(generated >= MIN_RUN_NOTES)
      np.add.at(covered, long_runs, 1)
      np.add.at(covered, long_runs + run[long_runs] + 1, -1)
      best = int(np.argmax(generated)) if len(piece) else 0
      source = int(at[best]) if len(piece) else 0
      train_piece = int(np.searchsorted(self.text.starts, source, side="right") - 1)
      results.append({
          "num_notes": num_notes,
          "primer_notes": first,
          "longest_run": int(generated[best]) if len(piece) else int(first == 0),
          "copied_share": (float(np.mean((np.cumsum(covered)[:num_notes] > 0)[first:]))
                           if first < num_notes else 0.0),
          "longest_run_at_note": best,
          "training_piece": self.names[train_piece],
          "training_note": source - int(self.text.starts[train_piece]),
      })
    return results


def piece_steps(notes: Sequence[features_lib.Notes]) -> list[np.ndarray]:
  return [note_steps(n.starts, n.pitches) for n in notes]


def primer_notes(source: piece_sets.SetSource, piece_set: piece_sets.PieceSet) -> list[int]:
  """Per piece of a folder set, the notes of its primer: the NOTE_ONs among the first
  `prompt_tokens` tokens of the `perceivers-sample` sidecar beside it (x.json for x.npy or
  x.mid); 0 without one (an unconditional sample, a real piece)."""
  folder = pathlib.Path(source) if isinstance(source, (str, os.PathLike)) else None
  counts = []
  for name, token_ids in zip(piece_set.piece_names, piece_set.tokens):
    sidecar = (folder / name).with_suffix(".json") if folder else None
    prompt_tokens = 0
    if sidecar and sidecar.is_file():
      try:
        prompt_tokens = int(json.loads(sidecar.read_text(encoding="utf-8"))["prompt_tokens"])
      except (ValueError, KeyError, TypeError):
        prompt_tokens = 0  # not a sample's sidecar
    counts.append(count_notes(np.asarray(token_ids)[:prompt_tokens]))
  return counts


def count_notes(token_ids: np.ndarray) -> int:
  """The notes (NOTE_ON tokens) among `token_ids`: a primer's, left out of the figures."""
  token_ids = np.asarray(token_ids)
  return int(np.sum((token_ids >= tokens_lib.NOTE_ON_START)
                    & (token_ids < tokens_lib.NOTE_OFF_START)))


def _summary(results: list[dict]) -> dict:
  longest = np.array([r["longest_run"] for r in results])
  shares = np.array([r["copied_share"] for r in results])
  return {"num_pieces": len(results), "longest_run_median": float(np.median(longest)),
          "longest_run_max": int(longest.max()), "copied_share_mean": float(shares.mean()),
          f"pieces_with_runs_of_{MIN_RUN_NOTES}": int((longest >= MIN_RUN_NOTES).sum())}


def evaluate_memorisation(train: piece_sets.SetSource,
                          sets: Mapping[str, piece_sets.SetSource],
                          output_dir: str | os.PathLike, *, data_dir: str | None = None,
                          max_pieces: int | None = None) -> dict:
  """Checks each set against the training pieces; writes memorisation.json and .md.

  `sets` should hold the held-out reference set too (the baseline); sources as
  `piece_sets.load_set` reads them.
  """
  load = dict(data_dir=data_dir, max_pieces=max_pieces)
  train_set = piece_sets.load_set("train", train, **load)
  corpus = Corpus(piece_steps(train_set.notes), train_set.piece_names)
  result = {"train": {"source": train_set.source, "num_pieces": len(train_set.notes),
                      "num_notes": corpus.num_notes},
            "config": {"ioi_quantum_ms": IOI_QUANTUM_STEPS * 1000 // tokens_lib.STEPS_PER_SECOND,
                       "min_run_notes": MIN_RUN_NOTES}, "sets": {}}
  for name, source in sets.items():
    piece_set = piece_sets.load_set(name, source, **load)
    pieces = corpus.check(piece_steps(piece_set.notes), primer_notes(source, piece_set))
    for piece_name, notes, entry in zip(piece_set.piece_names, piece_set.notes, pieces):
      entry["piece"] = piece_name
      if not len(notes):  # no notes, no steps: nothing shared
        entry.update(num_notes=0, longest_run=0, copied_share=0.0)
    result["sets"][name] = {"source": piece_set.source, **_summary(pieces), "pieces": pieces}
  output_dir = pathlib.Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  (output_dir / "memorisation.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
  lines = ["# Memorisation check", "",
           f"Training set: `{train_set.source}` ({len(train_set.notes)} pieces, "
           f"{corpus.num_notes} notes). Notes compared by pitch interval and inter-onset time "
           f"({result['config']['ioi_quantum_ms']} ms bins; transpositions count, velocity "
           f"ignored). Copied share: notes inside runs of >= {MIN_RUN_NOTES} notes shared "
           "with a training piece. A continuation's primer notes are not counted.", "",
           f"| Set | pieces | median longest run | max longest run | mean copied share | "
           f"pieces with a run >= {MIN_RUN_NOTES} |", "|---|---|---|---|---|---|"]
  for name, entry in result["sets"].items():
    lines.append(f"| {name} | {entry['num_pieces']} | {entry['longest_run_median']:g} | "
                 f"{entry['longest_run_max']} | {entry['copied_share_mean']:.3f} | "
                 f"{entry[f'pieces_with_runs_of_{MIN_RUN_NOTES}']} |")
  (output_dir / "memorisation.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
  return result
