"""How a set of pieces plays its notes: notes per second, how long they are held, how many
only the decoder's cap ends, and how many events decode to nothing.

A sampled NOTE_ON whose NOTE_OFF never comes sounds until `max_note_seconds` cuts it (README
"Tokens"); a NOTE_OFF of a silent pitch, or a NOTE_ON of a pitch already sounding, is an
event that decodes to nothing (the tokeniser never writes one). Real MAESTRO pieces have
neither: these figures tell samples that sound like piano playing from dense smears of
held notes.
"""

from collections.abc import Sequence

import numpy as np

from perceivers_jax.data import tokens
from perceivers_jax.evaluation import repetition


def events_decoding_to_nothing(token_ids: np.ndarray) -> int:
  """NOTE_OFFs of silent pitches plus NOTE_ONs of sounding ones, in order."""
  sounding = np.zeros(tokens.NUM_PITCHES, bool)
  count = 0
  for token in repetition.event_tokens(token_ids).tolist():
    if tokens.NOTE_ON_START <= token < tokens.NOTE_OFF_START:
      pitch, starts = token - tokens.NOTE_ON_START, True
    elif tokens.NOTE_OFF_START <= token < tokens.TIME_SHIFT_START:
      pitch, starts = token - tokens.NOTE_OFF_START, False
    else:
      continue
    count += bool(sounding[pitch] == starts)
    sounding[pitch] = starts
  return count


def note_lengths(token_ids: np.ndarray,
                 max_note_seconds: float = tokens.DEFAULT_MAX_NOTE_SECONDS
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(seconds each decoded note lasts, whether the `max_note_seconds` cap ended it)."""
  capped = tokens.tokens_to_note_sequence(token_ids, max_note_seconds).notes
  free = tokens.tokens_to_note_sequence(token_ids, 0).notes  # the same notes, in order
  lengths_s = np.array([n.end_time - n.start_time for n in capped])
  was_cut = np.array([a.end_time != b.end_time for a, b in zip(capped, free)], bool)
  return lengths_s, was_cut


def summary(pieces: Sequence[np.ndarray],
            max_note_seconds: float = tokens.DEFAULT_MAX_NOTE_SECONDS) -> dict[str, float]:
  """Notes per second of music, median and 90th-percentile note length (s), the share of
  notes the cap ended, and events decoding to nothing per 100 events, over `pieces`."""
  lengths, cut = zip(*(note_lengths(p, max_note_seconds) for p in pieces))
  lengths_s, was_cut = np.concatenate(lengths), np.concatenate(cut)
  seconds = sum(tokens.tokens_duration_seconds(p) for p in pieces)
  events = sum(len(repetition.event_tokens(p)) for p in pieces)
  empty = lengths_s.size == 0
  return {
      "notes": int(lengths_s.size),
      "notes_per_second": lengths_s.size / seconds if seconds else float("nan"),
      "median_note_seconds": float("nan") if empty else float(np.median(lengths_s)),
      "p90_note_seconds": float("nan") if empty else float(np.percentile(lengths_s, 90)),
      "capped_share": float("nan") if empty else float(was_cut.mean()),
      "dead_events_per_100": (100 * sum(events_decoding_to_nothing(p) for p in pieces) / events
                              if events else float("nan")),
  }
