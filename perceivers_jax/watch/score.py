"""Whole-piece surprisal (perceivers-score): the model's NLL of every token of pieces of any
length, each token scored once, with the most context that fits.

The windows are the validation pass's (`training/validation.py` token_nll over the
sequential effective windows of `data/windows.py` sequential_ends): window k predicts the
positions [e_(k-1), e_k) from the up to L inputs before them. A piece's total NLL is so exactly
what the validation pass sums for it.

Per piece, OUTPUT_DIR/NAME.json:
  checkpoint, step, num_tokens, seconds, total_bits, bits_per_token, bits_per_second (the
  total over the piece's duration);
  tokens: columns over the scored tokens (positions 1 .. n-1): position, id, event, bits;
  notes: columns over the notes: position (of the note's NOTE_ON token), pitch, start_s,
  end_s, velocity, bits: the surprisal of its NOTE_ON token, how unexpected that note was
  at that moment given all before it;
and NAME.png, the piano roll coloured by each note's bits (dark: expected, yellow: surprising;
the top of the scale is the piece's 95th percentile). With a second checkpoint (`compare`), the
JSON gets "compare": its step and totals and per note its bits and the difference (compare
minus first), and NAME_difference.png is coloured by it (blue: the second checkpoint is less
surprised, red: more). Files are written whole or not at all.
"""

import collections
import dataclasses
import json
import os
import pathlib
from typing import Any, Sequence

from flax import nnx
import ml_collections
import numpy as np

from perceivers_jax import config_base
from perceivers_jax.data import input_pipeline
from perceivers_jax.data import piano_roll
from perceivers_jax.data import tokens
from perceivers_jax.parallel import partitioning
from perceivers_jax.sampling import job
from perceivers_jax.sampling import sampling
from perceivers_jax.state import model_state
from perceivers_jax.state import run_dir
from perceivers_jax.training import config_validation
from perceivers_jax.training import validation

BITS_PER_NAT = 1 / np.log(2)
SCALE_PERCENTILE = 95


class ScoreError(config_base.InputError, ValueError):
  """A piece or checkpoint that cannot be scored; the message names it."""


def read_piece(path: str | os.PathLike) -> np.ndarray:
  """The tokens of a .mid/.midi file or a .npy token file starting with SOS."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ScoreError(f"{path}: no such file.")
  if path.suffix.lower() in (".mid", ".midi"):
    return tokens.midi_file_to_tokens(path)
  if path.suffix.lower() != ".npy":
    raise ScoreError(f"{path}: pass a .mid/.midi file or a .npy token file.")
  piece = np.load(path)
  if piece.ndim != 1 or not np.issubdtype(piece.dtype, np.integer) or len(piece) < 2:
    raise ScoreError(f"{path}: expected a 1-D integer token array of 2 or more tokens, got "
                     f"{piece.dtype} {piece.shape}.")
  if piece[0] != tokens.SOS_ID:
    raise ScoreError(f"{path}: a piece starts with SOS ({tokens.SOS_ID}), this one with "
                     f"{piece[0]}; prepend it.")
  return piece.astype(np.int32)


def event_name(token_id: int) -> str:
  """"NOTE_ON 60", "TIME_SHIFT 0.25s", "VELOCITY 17", "EOS", ... of a token id."""
  ranges = (("NOTE_ON", tokens.NOTE_ON_START, tokens.NOTE_OFF_START, 0),
            ("NOTE_OFF", tokens.NOTE_OFF_START, tokens.TIME_SHIFT_START, 0),
            ("TIME_SHIFT", tokens.TIME_SHIFT_START, tokens.VELOCITY_START, 1),
            ("VELOCITY", tokens.VELOCITY_START, tokens.VOCAB_SIZE, 1))
  for name, start, end, first in ranges:
    if start <= token_id < end:
      value = token_id - start + first
      if name == "TIME_SHIFT":
        return f"{name} {value / tokens.STEPS_PER_SECOND:g}s"
      return f"{name} {value}"
  return {tokens.PAD_ID: "PAD", tokens.EOS_ID: "EOS", tokens.SOS_ID: "SOS"}.get(token_id, "?")


@dataclasses.dataclass
class Scorer:
  """A checkpoint's model and the validation pass's per-token step."""
  path: str
  step: int
  config: ml_collections.ConfigDict
  model: model_state.ModelState
  params: Any
  rest: nnx.State
  token_nll_step: validation.EvalStep

  @classmethod
  def load(cls, path: str, step: int | None = None, batch_size: int | None = None) -> "Scorer":
    """The model of a training workdir, one of its checkpoints/STEP or an export, laid out
    as the validation pass lays it out (windows per batch: `batch_size`, default the
    config's eval.batch_size)."""
    workdir, step = run_dir.resolve_path(path, step)
    config = run_dir.read_config(workdir)
    with config.unlocked():
      config.eval.max_batches = 0  # every window of the piece.
      if batch_size:
        config.eval.batch_size = batch_size
    step = run_dir.checkpoint_step(workdir, config, step)
    model = model_state.build(config, config_validation.job_mesh(config),
                              left_padded_windows=model_state.windows_are_left_padded(config))
    params = run_dir.restore_params(workdir, step, model.abstract_params)
    return cls(workdir, step, config, model, params, model.init_rest(),
               validation.make_token_nll_step(model, partitioning.batch_sharding(model.mesh)))

  def token_nll(self, piece: np.ndarray) -> np.ndarray:
    """NLL (nats) of tokens 1 .. n-1 of `piece`, each predicted once."""
    batches = input_pipeline.make_eval_batches(self.config, [{"tokens": piece}],
                                               process_index=0, process_count=1)
    positions_T, nll_T = validation.token_nll(
        self.token_nll_step, partitioning.batch_sharding(self.model.mesh), self.params,
        self.rest, batches)
    if not np.array_equal(positions_T, np.arange(1, len(piece))):
      raise AssertionError(f"scored positions {positions_T} are not 1 .. {len(piece) - 1}")
    return nll_T.astype(np.float64)


def _note_positions(piece: np.ndarray, ns) -> list[int | None]:
  """The position of the NOTE_ON token of each note of ns.notes (matched by onset step and
  pitch; None for a note no token starts)."""
  shift = np.where((piece >= tokens.TIME_SHIFT_START) & (piece < tokens.VELOCITY_START),
                   piece - tokens.TIME_SHIFT_START + 1, 0)
  onset_steps = np.cumsum(shift) - shift  # the time each token is read at
  starts = collections.defaultdict(list)
  for position in np.flatnonzero((piece >= tokens.NOTE_ON_START)
                                 & (piece < tokens.NOTE_OFF_START)):
    starts[(int(onset_steps[position]), int(piece[position] - tokens.NOTE_ON_START))].append(
        int(position))
  return [(starts[(round(n.start_time * tokens.STEPS_PER_SECOND), n.pitch)] or [None]).pop(0)
          for n in ns.notes]


def _scale(values: np.ndarray) -> float:
  values = np.abs(values[np.isfinite(values)])
  return float(np.percentile(values, SCALE_PERCENTILE)) if values.size else 1.0


def _atomic_text(path: pathlib.Path, text: str) -> None:
  job.atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _atomic_roll(path: pathlib.Path, ns, title: str, colours) -> None:
  job.atomic_write(path, lambda tmp: piano_roll.write(ns, tmp, title=title, colours=colours))


def score_piece(name: str, piece: np.ndarray, scorers: Sequence[Scorer],
                output_dir: pathlib.Path) -> dict[str, Any]:
  """Scores `piece` with one or two checkpoints; writes NAME.json and the roll(s)."""
  bits = [scorer.token_nll(piece) * BITS_PER_NAT for scorer in scorers]
  seconds = tokens.tokens_duration_seconds(piece)
  ns = tokens.tokens_to_note_sequence(piece)
  note_positions = _note_positions(piece, ns)
  kept = [i for i, p in enumerate(note_positions) if p is not None]
  note_bits = [np.array([b[note_positions[i] - 1] for i in kept]) for b in bits]

  def totals(scorer: Scorer, token_bits: np.ndarray) -> dict[str, Any]:
    return {"checkpoint": scorer.path, "step": scorer.step,
            "total_bits": float(token_bits.sum()),
            "bits_per_token": float(token_bits.mean()),
            "bits_per_second": float(token_bits.sum() / seconds) if seconds else None}

  notes = [ns.notes[i] for i in kept]
  result = {
      "piece": name, "num_tokens": int(len(piece)), "seconds": seconds,
      **totals(scorers[0], bits[0]),
      "tokens": {"position": list(range(1, len(piece))), "id": piece[1:].tolist(),
                 "event": [event_name(int(t)) for t in piece[1:]], "bits": bits[0].tolist()},
      "notes": {"position": [note_positions[i] for i in kept],
                "pitch": [n.pitch for n in notes], "start_s": [n.start_time for n in notes],
                "end_s": [n.end_time for n in notes], "velocity": [n.velocity for n in notes],
                "bits": note_bits[0].tolist()}}
  top = _scale(note_bits[0])
  colours = [(200, 200, 200)] * len(ns.notes)
  for i, b in zip(kept, note_bits[0]):
    colours[i] = piano_roll.ramp_colour(b / top)
  _atomic_roll(output_dir / f"{name}.png", ns, f"{name}: surprisal at step {scorers[0].step} "
               f"(dark 0 bits, yellow >= {top:.1f} bits per note)", colours)
  if len(scorers) > 1:
    difference = note_bits[1] - note_bits[0]
    result["compare"] = {**totals(scorers[1], bits[1]), "note_bits": note_bits[1].tolist(),
                         "note_bits_difference": difference.tolist()}
    top = _scale(difference)
    colours = [(200, 200, 200)] * len(ns.notes)
    for i, d in zip(kept, difference):
      colours[i] = piano_roll.diverging_colour(d / top if top else 0.0)
    _atomic_roll(output_dir / f"{name}_difference.png", ns,
                 f"{name}: step {scorers[1].step} minus step {scorers[0].step} (blue: less "
                 f"surprised, red: more; +-{top:.1f} bits)", colours)
  _atomic_text(output_dir / f"{name}.json", json.dumps(result))
  return result


def score_files(paths: Sequence[str], output_dir: str, checkpoint: str, *,
                step: int | None = None, compare: str | None = None,
                compare_step: int | None = None,
                batch_size: int | None = None) -> list[dict[str, Any]]:
  """Scores each piece file; every piece is read (and a bad one named) before any model."""
  if not paths:
    raise ScoreError("no pieces given: pass .mid/.midi or .npy files after the flags.")
  names = [pathlib.Path(p).stem for p in paths]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ScoreError(f"two pieces are named {repeated[0]}: their outputs would collide; "
                     "rename one.")
  pieces = [read_piece(p) for p in paths]
  scorers = [Scorer.load(checkpoint, step, batch_size)]
  if compare:
    scorers.append(Scorer.load(compare, compare_step, batch_size))
  out = pathlib.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  return [score_piece(name, piece, scorers, out) for name, piece in zip(names, pieces)]


def score_opening(checkpoint: str, piece: str | os.PathLike, seconds: float, output_dir: str |
                  os.PathLike, name: str) -> dict[str, Any]:
  """Scores the first `seconds` of a MIDI piece (cut as the sampler cuts a primer) as NAME."""
  opening = sampling.primer_prompt(piece, seconds)
  out = pathlib.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  return score_piece(name, opening, [Scorer.load(checkpoint)], out)
