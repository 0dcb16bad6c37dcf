"""A training run in a subprocess, on real pieces read slowly so a signal lands mid-run.

`script(settings)` is the program for `python -c`: argv is (perceivers_jax/configs/tiny.py,
pieces.npz, workdir, extra...); it trains that config, changed by the `settings` lines (Python over
the config `c`, which may also patch modules before the run), on the first two pieces of the
.npz (0.1 s per read) and evaluates on 300 tokens of its last piece, with the music evaluator
when c.eval.music asks for it. `losses(workdir)` reads back the (step, train loss) pairs it
logged; `save_pieces` writes the .npz it reads. Used by train_test and faults_test.

`straight_and_interrupted` runs RESUMED_RUN twice: straight through, and stopped by SIGTERM
after three steps then rerun to the end (the `resumed_runs` fixture of conftest.py, which
train_test and watch_test read).
"""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np

from perceivers_jax.data import tokens

_HEAD = r"""
import importlib.util, os, sys, time
import numpy as np
from perceivers_jax.training import train
from perceivers_jax.watch import music
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


sources = dict(train_source=SlowSource(), eval_source=[{"tokens": arrays[-1][:300]}])
train.train_and_evaluate(c, sys.argv[3], evaluators=music.evaluators(c, sys.argv[3], **sources),
                         **sources)
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


# 20 steps at L=256 with dropout, validation every 10 steps, and what watch_test checks: the
# music evaluator at every validation, a profile of steps 15-16, and one compilation cache
# beside the workdirs, holding every program (jax writes only those compiling for 1 s or
# more by default): the straight run starts it, the interrupted run's two starts read it.
RESUMED_RUN = script("""
c.model.max_length, c.model.num_latents, c.model.num_latent_layers = 256, 32, 1
c.model.dropout_rate = 0.1  # resumed dropout masks must match too
c.train.num_steps = 20
c.checkpoint.every_steps = 1000  # only the preemption save and the final one
c.eval.every_steps = 10
c.eval.music.update(dict(every_evals=1, num_unconditional=2, num_continuations=2,
                         primer_tokens=32, num_tokens=48, batch_size=2, num_reference=3))
c.profile.steps = (15, 16)
c.compilation_cache_dir = os.path.join(os.path.dirname(sys.argv[3]), "compilation_cache")
c.compilation_cache_min_compile_seconds = 0.0
""")


@dataclasses.dataclass
class Runs:
  """Two workdirs of RESUMED_RUN: `straight`, and `interrupted` (SIGTERM, then a rerun)."""
  straight: pathlib.Path
  interrupted: pathlib.Path
  sigterm_returncode: int
  sigterm_stderr: str
  saved_at_sigterm: list[int]  # the checkpoint steps the SIGTERM left
  losses_at_sigterm: list[tuple[int, float]]


def _run(command: list[str], env: dict[str, str]) -> None:
  result = subprocess.run(command, env=env, timeout=600, capture_output=True, text=True,
                          check=False)
  if result.returncode:
    raise AssertionError(f"the training run failed:\n{result.stderr[-3000:]}")


def straight_and_interrupted(pieces_path: pathlib.Path, directory: pathlib.Path,
                             tiny_config: pathlib.Path) -> Runs:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  command = lambda workdir: [sys.executable, "-c", RESUMED_RUN, str(tiny_config),
                             str(pieces_path), str(workdir)]
  straight, interrupted = directory / "straight", directory / "interrupted"
  _run(command(straight), env)

  process = subprocess.Popen(command(interrupted), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while len(losses(interrupted)) < 3 and time.time() < deadline and process.poll() is None:
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  saved = [int(s) for s in os.listdir(interrupted / "checkpoints")]
  at_sigterm = losses(interrupted)
  _run(command(interrupted), env)
  return Runs(straight, interrupted, process.returncode, stderr, saved, at_sigterm)
