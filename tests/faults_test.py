"""Fault injection on the tiny config (CPU): SIGKILL mid-checkpoint, Ctrl-C, a NaN-producing rate.

The subprocess runs train on two real MAESTRO pieces. A test-only hook (env HANG_SAVE_AT=S) makes
the save of any step >= S stop inside Orbax's write, after the data-iterator item is written
into the step's temporary folder, so the faults land mid-write every time.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

import slow_training_run

ROOT = pathlib.Path(__file__).resolve().parents[1]
HANG_MARKER = "HANGING-IN-SAVE"

_RUN = slow_training_run.script("""
from absl import logging
import grain
from perceivers_jax.state import checkpointing
c.model.max_length, c.model.num_latents, c.model.num_latent_layers = 128, 16, 1
c.train.num_steps = 8
c.checkpoint.every_steps, c.checkpoint.keep = int(sys.argv[4]), 10
logging.set_verbosity(logging.INFO)  # the resume and Ctrl-C lines, on stderr.
logging.use_absl_handler()

hang_at = int(os.environ.get("HANG_SAVE_AT", "0"))
saving = [0]
save, write_iter = checkpointing.Checkpointer.save, grain.checkpoint.CheckpointHandler.save

def noting_save(self, step, *args, **kwargs):
  saving[0] = step
  return save(self, step, *args, **kwargs)

def hanging_write(self, directory, *args, **kwargs):
  write_iter(self, directory, *args, **kwargs)
  if hang_at and saving[0] >= hang_at:
    print("HANGING-IN-SAVE", saving[0], directory, file=sys.stderr, flush=True)
    time.sleep(600)

checkpointing.Checkpointer.save = noting_save
grain.checkpoint.CheckpointHandler.save = hanging_write
""")


@pytest.fixture(scope="module")
def pieces_path(maestro_paths, tmp_path_factory):
  return slow_training_run.save_pieces(maestro_paths[:2], tmp_path_factory.mktemp("faults"))


class _Run:
  """The training subprocess; its stderr is collected by a thread so it can be waited on."""

  def __init__(self, pieces, workdir, every_steps, hang_save_at=0):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HANG_SAVE_AT=str(hang_save_at))
    self.process = subprocess.Popen(
        [sys.executable, "-c", _RUN, str(ROOT / "perceivers_jax/configs/tiny.py"), str(pieces),
         str(workdir), str(every_steps)], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    self.lines = []
    self._reader = threading.Thread(target=lambda: self.lines.extend(self.process.stderr))
    self._reader.start()

  def wait_for(self, condition, timeout=400):
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline and self.process.poll() is None:
      time.sleep(0.02)
    assert condition(), "".join(self.lines)[-3000:]

  def finish(self, timeout=400):
    self.process.wait(timeout=timeout)
    self._reader.join()
    return self.process.returncode, "".join(self.lines)

  def saw(self, text):
    return lambda: any(text in line for line in self.lines)


_losses = slow_training_run.losses


def _checkpoints(workdir):
  names = os.listdir(workdir / "checkpoints")
  return sorted(int(n) for n in names if n.isdigit()), [n for n in names if "tmp" in n]


def test_sigkill_during_a_checkpoint_write_then_restart_equals_uninterrupted(pieces_path,
                                                                             tmp_path):
  _, pieces = pieces_path
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  assert _Run(pieces, straight, every_steps=2).finish()[0] == 0

  run = _Run(pieces, killed, every_steps=2, hang_save_at=4)
  run.wait_for(run.saw(HANG_MARKER))
  run.process.kill()
  assert run.finish()[0] == -signal.SIGKILL
  steps, partial = _checkpoints(killed)
  assert steps == [2] and partial, (steps, partial)  # killed inside the write of step 4.
  assert [s for s, _ in _losses(killed)][:4] == [1, 2, 3, 4]

  returncode, log = _Run(pieces, killed, every_steps=2).finish()
  assert returncode == 0, log[-3000:]
  assert "Resuming from step 2" in log
  steps, partial = _checkpoints(killed)
  assert steps == [2, 4, 6, 8] and not partial  # the half-written folder was cleaned.
  # Each step once (the redone 3 and 4 replace the killed run's records), bitwise equal.
  assert _losses(killed) == _losses(straight)


def test_ctrl_c_saves_and_a_second_ctrl_c_exits_at_once(pieces_path, tmp_path):
  _, pieces = pieces_path
  run = _Run(pieces, tmp_path, every_steps=1000)
  run.wait_for(lambda: len(_losses(tmp_path)) >= 2)
  run.process.send_signal(signal.SIGINT)
  returncode, log = run.finish()
  assert returncode == 0, log[-3000:]
  steps, _ = _checkpoints(tmp_path)
  assert len(steps) == 1 and 2 <= steps[0] < 8, steps
  assert [s for s, _ in _losses(tmp_path)] == list(range(1, steps[0] + 1))

  # Resumed; Ctrl-C starts a save that hangs; the second Ctrl-C ends the process at once.
  run = _Run(pieces, tmp_path, every_steps=1000, hang_save_at=1)
  run.wait_for(lambda: len(_losses(tmp_path)) > steps[0])
  run.process.send_signal(signal.SIGINT)
  run.wait_for(run.saw(HANG_MARKER))
  run.process.send_signal(signal.SIGINT)
  returncode, log = run.finish(timeout=60)
  assert returncode == 130, log[-3000:]
  assert "press Ctrl-C again to exit at once" in log and "Second Ctrl-C: exiting at once" in log
  assert _checkpoints(tmp_path)[0] == steps  # the interrupted save never completed.


def test_nan_producing_rate_skips_updates_then_resumes_with_a_sane_rate(pieces_path, tmp_path):
  """on_nonfinite=skip: the updates of a rate that is inf in float32 are all rejected and
  counted; the checkpoints keep the last finite parameters, and a sane rate resumes from them."""
  from perceivers_jax.state import checkpointing  # pylint: disable=g-import-not-at-top
  from perceivers_jax.training import train  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("tiny", ROOT / "perceivers_jax/configs/tiny.py")
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  arrays, _ = pieces_path
  config = tiny.get_config()
  config.model.max_length, config.model.num_latents, config.model.num_latent_layers = 128, 16, 1
  config.train.warmup_steps = 0
  config.checkpoint.every_steps = config.log_every_steps = 1
  config.checkpoint.keep = 10
  config.eval.every_steps = 1000
  sources = dict(train_source=[{"tokens": arrays[0]}], eval_source=[{"tokens": arrays[0][:200]}])

  def run(num_steps, learning_rate, on_nonfinite="stop"):
    config.train.num_steps, config.train.learning_rate = num_steps, learning_rate
    config.train.on_nonfinite = on_nonfinite
    train.train_and_evaluate(config, str(tmp_path), **sources)

  def saved():
    trainer = train.build_trainer_for(config)
    ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(str(tmp_path)),
                                      config.checkpoint, with_data_iter=False)
    out = {s: jax.device_get(ckpt.restore(s, trainer.abstract_state)["params"])
           for s in ckpt.all_steps()}
    ckpt.close()
    return out

  run(2, 2e-3)
  run(5, 1e39, "skip")  # inf in float32: every update is non-finite.
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  skipped = {r["step"]: r["train/skipped_updates"] for r in records if "train/loss" in r}
  assert skipped == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1}
  params = saved()
  assert sorted(params) == [1, 2, 3, 4, 5]
  for step in (3, 4, 5):  # the state of step 2, kept.
    jax.tree.map(np.testing.assert_array_equal, params[step], params[2])
  assert all(np.isfinite(leaf).all() for p in params.values() for leaf in jax.tree.leaves(p))

  run(8, 2e-3)  # resumes from step 5 with a sane rate and trains on.
  losses = dict(_losses(tmp_path))
  assert sorted(losses) == list(range(1, 9))
  assert all(np.isfinite(v) for v in losses.values())
  final = saved()[8]
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(final))
  assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(final),
                                                      jax.tree.leaves(params[5])))
