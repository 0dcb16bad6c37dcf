"""Times the objective evaluation of 100 generated pieces against 100 reference pieces.

  python benchmarks/evaluation.py [--num_pieces=100] [--json_out=PATH]

Pieces come from the 10 real MAESTRO performances (`make fetch-data`), tokenised once:
reference piece i is performance i % 10 transposed by (i // 10) - 5 semitones; generated
piece i is performance i % 10 cut to 50..100% of its tokens and transposed by
(i // 10) - 4. BLAS/OpenMP threads are pinned to one, so timings are for one core.
Prints a table and writes the timings to benchmarks/evaluation.json.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_var, "1")

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import pathlib
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from data_prep import fetch_maestro_samples
from perceivers_jax.data import tokens as tokens_lib
from perceivers_jax.evaluation import distances
from perceivers_jax.evaluation import features
from perceivers_jax.evaluation import piece_sets
from perceivers_jax.evaluation import repetition
from perceivers_jax.evaluation import report

_NUM_PIECES = flags.DEFINE_integer("num_pieces", 100, "Pieces per set.")
_JSON_OUT = flags.DEFINE_string("json_out", str(pathlib.Path(__file__).with_suffix(".json")),
                                "Where the timings go.")


def _transpose(token_ids: np.ndarray, semitones: int) -> np.ndarray:
  """Shifts NOTE_ON/NOTE_OFF ids (MAESTRO's 21..108 stays inside 0..127 for |shift| <= 19)."""
  out = token_ids.copy()
  notes = (out >= tokens_lib.NOTE_ON_START) & (out < tokens_lib.TIME_SHIFT_START)
  out[notes] += semitones
  return out


def _crop(token_ids: np.ndarray, fraction: float) -> np.ndarray:
  keep = max(2, int(fraction * (token_ids.size - 1)))
  return np.append(token_ids[:keep], tokens_lib.EOS_ID).astype(np.int32)


def _timed(fn, *args, **kwargs):
  """(result, (wall seconds, CPU seconds of this process)); CPU time is robust to a busy host."""
  wall, cpu = time.perf_counter(), time.process_time()
  result = fn(*args, **kwargs)
  return result, (time.perf_counter() - wall, time.process_time() - cpu)


def main(argv: list[str]) -> None:
  del argv
  n = _NUM_PIECES.value
  paths = fetch_maestro_samples.sample_paths()
  missing = [p for p in paths if not p.exists()]
  if missing:
    raise app.UsageError(f"{missing[0]} missing: run `make fetch-data` first")
  rows = []

  base, seconds = _timed(lambda: [tokens_lib.midi_file_to_tokens(p) for p in paths])
  rows.append(("MIDI -> notes + tokens (sustain folded)", len(paths), seconds))
  rng = np.random.default_rng(0)
  reference = [_transpose(base[i % 10], i // 10 - 5) for i in range(n)]
  generated = [_transpose(_crop(base[i % 10], rng.uniform(0.5, 1.0)), i // 10 - 4)
               for i in range(n)]

  ref_set, seconds = _timed(piece_sets.load_set, "reference", reference)
  gen_set, seconds_gen = _timed(piece_sets.load_set, "generated", generated)
  rows.append(("tokens -> notes (both sets)", 2 * n,
               tuple(a + b for a, b in zip(seconds, seconds_gen))))
  notes = ref_set.notes + gen_set.notes
  per_piece, seconds = _timed(lambda: [features.extract_features(x) for x in notes])
  rows.append(("features (13 per piece)", 2 * n, seconds))
  ref_features = features.stack_features(per_piece[:n])
  gen_features = features.stack_features(per_piece[n:])
  for mode in distances.KLD_MODES:
    _, seconds = _timed(distances.compare_sets, ref_features, gen_features, mode)
    rows.append((f"compare sets, 13 features, kld={mode}", n, seconds))

  def _repetition():
    for x, t in zip(notes, ref_set.tokens + gen_set.tokens):
      repetition.repetition_density(x)
      repetition.token_autocorrelation(t)
  _, seconds = _timed(_repetition)
  rows.append(("repetition density + rho(1..128)", 2 * n, seconds))
  with tempfile.TemporaryDirectory() as out:
    _, seconds = _timed(report.evaluate_sets, reference, {"generated": generated}, out)
    report_bytes = sum(f.stat().st_size for f in pathlib.Path(out).iterdir())
  rows.append(("evaluate_sets end to end (tokens in, report + plots out)", 2 * n, seconds))

  print(f"\nEvaluation, {n} generated vs {n} reference pieces, one core "
        f"(mean piece {np.mean([len(x) for x in notes]):.0f} notes):")
  print(f"| {'stage':58s} | pieces | wall s | CPU s | CPU ms/piece |")
  print(f"|{'-' * 60}|--------|--------|-------|--------------|")
  for stage, count, (wall, cpu) in rows:
    print(f"| {stage:58s} | {count:6d} | {wall:6.2f} | {cpu:5.2f} | {1e3 * cpu / count:12.1f} |")
  result = {"num_pieces_per_set": n,
            "mean_notes_per_piece": float(np.mean([len(x) for x in notes])),
            "report_bytes": report_bytes,
            "stages": [{"stage": s, "pieces": c, "wall_seconds": w, "cpu_seconds": t}
                       for s, c, (w, t) in rows]}
  out_path = pathlib.Path(_JSON_OUT.value)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_text(json.dumps(result, indent=1))
  print(f"wrote {out_path}")


if __name__ == "__main__":
  app.run(main)
