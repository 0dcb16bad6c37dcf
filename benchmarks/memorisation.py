"""Times the memorisation check at MAESTRO scale: 1,000 generated pieces vs ~5M training notes.

  python benchmarks/memorisation.py [--train_pieces=962] [--train_notes=5200]
      [--generated_pieces=1000] [--generated_notes=1000] [--json_out=PATH]

Synthetic notes (MAESTRO's training split has 962 pieces and ~5M notes): pitches a random
walk of skewed intervals (small steps common), inter-onset times drawn from a skewed set
(chords, 16ths .. half notes at several tempi), so short runs recur by chance as in real
music. Every 10th generated piece carries a copied 200-note passage of a training piece,
transposed; the check must find each of them (asserted). BLAS/OpenMP threads are pinned
to one, so timings are for one core. Prints a table and writes benchmarks/memorisation.json.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_var, "1")

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import pathlib
import time

from absl import app
from absl import flags
import numpy as np

from perceivers_jax.evaluation import memorisation

_TRAIN_PIECES = flags.DEFINE_integer("train_pieces", 962, "Training pieces.")
_TRAIN_NOTES = flags.DEFINE_integer("train_notes", 5200, "Notes per training piece.")
_GENERATED_PIECES = flags.DEFINE_integer("generated_pieces", 1000, "Generated pieces.")
_GENERATED_NOTES = flags.DEFINE_integer("generated_notes", 1000, "Notes per generated piece.")
_JSON_OUT = flags.DEFINE_string("json_out", str(pathlib.Path(__file__).with_suffix(".json")),
                                "Where the timings go.")
COPY_NOTES = 200
_INTERVALS = np.arange(-12, 13)
_INTERVAL_P = np.exp(-np.abs(_INTERVALS) / 3.0) / np.exp(-np.abs(_INTERVALS) / 3.0).sum()
_IOI_STEPS = np.array([0, 0, 1, 12, 13, 18, 25, 30, 38, 50, 75, 100])  # 10 ms token steps


def _piece(rng: np.random.Generator, num_notes: int) -> tuple[np.ndarray, np.ndarray]:
  """(onsets in seconds, pitches) of a synthetic piece."""
  pitches = 60 + np.cumsum(rng.choice(_INTERVALS, num_notes, p=_INTERVAL_P))
  pitches = 21 + np.abs((pitches - 21) % 174 - 87)  # reflect into the 88 keys
  onsets = np.cumsum(rng.choice(_IOI_STEPS, num_notes)) / 100  # on the tokens' grid
  order = np.lexsort((pitches, onsets))  # onset order, chords bottom-up, as note_steps reads
  return onsets[order], pitches[order]


def main(argv: list[str]) -> None:
  del argv
  rng = np.random.default_rng(0)
  train = [_piece(rng, _TRAIN_NOTES.value) for _ in range(_TRAIN_PIECES.value)]
  generated, copied = [], {}
  for i in range(_GENERATED_PIECES.value):
    onsets, pitches = _piece(rng, _GENERATED_NOTES.value)
    if i % 10 == 0:
      source = int(rng.integers(len(train)))
      at = int(rng.integers(_TRAIN_NOTES.value - COPY_NOTES))
      into = int(rng.integers(_GENERATED_NOTES.value - COPY_NOTES))
      t_onsets, t_pitches = train[source]
      # 2 s gaps around the copy keep its notes apart from the piece's own chords.
      onsets[into:] += 2.0
      onsets[into:into + COPY_NOTES] = (t_onsets[at:at + COPY_NOTES] - t_onsets[at]
                                        + onsets[into])
      onsets[into + COPY_NOTES:] += onsets[into + COPY_NOTES - 1] - onsets[into + COPY_NOTES] + 2.0
      pitches[into:into + COPY_NOTES] = t_pitches[at:at + COPY_NOTES] + (i % 7 - 3)
      copied[i] = source
    generated.append((onsets, pitches))

  timings = {}
  start = time.perf_counter()
  train_steps = [memorisation.note_steps(*p) for p in train]
  generated_steps = [memorisation.note_steps(*p) for p in generated]
  timings["note steps (all pieces)"] = time.perf_counter() - start
  start = time.perf_counter()
  corpus = memorisation.Corpus(train_steps, [f"train_{i}" for i in range(len(train))])
  timings["suffix array of the training notes"] = time.perf_counter() - start
  start = time.perf_counter()
  results = corpus.check(generated_steps)
  timings["check of the generated pieces"] = time.perf_counter() - start

  found = sum(results[i]["longest_run"] >= COPY_NOTES
              and results[i]["training_piece"] == f"train_{source}" for i, source in copied.items())
  assert found == len(copied), f"found {found} of {len(copied)} copied passages"
  chance = [r["longest_run"] for i, r in enumerate(results) if i not in copied]
  total = sum(timings.values())
  print(f"{corpus.num_notes:,} training notes in {len(train)} pieces; "
        f"{len(generated)} generated pieces x {_GENERATED_NOTES.value} notes (one core)")
  print("| stage | seconds |\n|---|---|")
  for name, seconds in timings.items():
    print(f"| {name} | {seconds:.1f} |")
  print(f"| **total** | {total:.1f} |")
  print(f"copied passages found: {found}/{len(copied)}; longest chance run in the others: "
        f"median {np.median(chance):g}, max {max(chance)} notes")
  record = {"train_pieces": len(train), "train_notes": corpus.num_notes,
            "generated_pieces": len(generated), "generated_notes": _GENERATED_NOTES.value,
            "seconds": timings, "total_seconds": total, "copied_found": found,
            "copied": len(copied), "chance_longest_run_median": float(np.median(chance)),
            "chance_longest_run_max": int(max(chance))}
  pathlib.Path(_JSON_OUT.value).write_text(json.dumps(record, indent=1), encoding="utf-8")


if __name__ == "__main__":
  app.run(main)
