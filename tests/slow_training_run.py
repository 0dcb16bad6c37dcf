"""A training run in a subprocess, on real pieces read slowly so a signal lands mid-run.

`script(settings)` is the program for `python -c`: argv is (perceivers_jax/configs/tiny.py,
pieces.npz, workdir, extra...); it trains that config, changed by the `settings` lines (Python over
the config `c`, which may also patch modules before the run), on the first two pieces of the
.npz (0.1 s per read) and evaluates on 300 tokens of its last piece. `losses(workdir)` reads
back the (step, train loss) pairs it logged; `save_pieces` writes the .npz it reads. Used by
train_test and faults_test.
"""

import json
import pathlib

import numpy as np

from perceivers_jax.data import tokens

_HEAD = r"""
import importlib.util, os, sys, time
import numpy as np
from perceivers_jax.training import train
spec = importlib.util.spec_from_file_location("tiny", sys.argv[1])
tiny = importlib.util.module_from_spec(spec); spec.loader.exec_module(tiny)
arrays = list(np.load(sys.argv[2]).values())
c = tiny.get_config()
c.log_every_steps = 1
c.eval.every_steps, c.eval.max_batches = 1000, 1
"""

_TAIL = r"""

class SlowSource:
  # Reads take 0.1 s, so a signal reliably lands mid-run; the tokens are unchanged.
  def __len__(self):
    return 2

  def __getitem__(self, index):
    time.sleep(0.1)
    return {"tokens": arrays[index]}


train.train_and_evaluate(c, sys.argv[3], train_source=SlowSource(),
                         eval_source=[{"tokens": arrays[-1][:300]}])
"""


def script(settings: str) -> str:
  return _HEAD + settings + _TAIL


def losses(workdir: pathlib.Path) -> list[tuple[int, float]]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [(r["step"], r["train/loss"]) for r in map(json.loads, path.read_text().splitlines())
          if "train/loss" in r]


def save_pieces(midi_paths, directory: pathlib.Path) -> tuple[list[np.ndarray], pathlib.Path]:
  """(token arrays of `midi_paths`, the pieces.npz under `directory` holding them)."""
  arrays = [tokens.midi_file_to_tokens(p) for p in midi_paths]
  path = pathlib.Path(directory) / "pieces.npz"
  np.savez(path, *arrays)
  return arrays, path
