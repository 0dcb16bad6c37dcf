"""Fault injection on the tiny config (CPU): SIGKILL mid-checkpoint, Ctrl-C, a diverging rate,
a loss spike, checkpoints with exploded parameters or of an older layout.

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
c.train.loss_spike_window = 4  # the loss-spike check runs from step 3 on.
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


def _train_records(workdir):
  """{step: its train/ record}."""
  records = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
  return {r["step"]: r for r in records if "train/loss" in r}


def _guard_records(workdir):
  """(step, loss, largest loss z, largest update ratio) of every train record."""
  return [(step, r["train/loss"], r["train/max_loss_z"], r["train/max_update_ratio"])
          for step, r in _train_records(workdir).items()]


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
  # Each step once (the redone 3 and 4 replace the killed run's records), bitwise equal; so
  # are the loss-spike statistics, computed from the restored window of accepted losses.
  assert _guard_records(killed) == _guard_records(straight)
  assert any(z != 0 for _, _, z, _ in _guard_records(straight)[2:])


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


def _tiny_config():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("tiny", ROOT / "perceivers_jax/configs/tiny.py")
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  config = tiny.get_config()
  config.model.max_length, config.model.num_latents, config.model.num_latent_layers = 128, 16, 1
  config.train.warmup_steps = 0
  config.checkpoint.every_steps = config.log_every_steps = 1
  config.checkpoint.keep = 20
  config.eval.every_steps = 1000
  return config


def _saved_params(config, workdir):
  """{step: params} of every checkpoint in `workdir`."""
  from perceivers_jax.state import checkpointing  # pylint: disable=g-import-not-at-top
  from perceivers_jax.training import train  # pylint: disable=g-import-not-at-top
  trainer = train.build_trainer_for(config)
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(str(workdir)), config.checkpoint,
                                    with_data_iter=False)
  saved = {s: jax.device_get(ckpt.restore(s, trainer.abstract_state)) for s in ckpt.all_steps()}
  ckpt.close()
  return saved


def _largest(tree):
  return max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(tree))


def _skipped(workdir):
  return {step: r["train/skipped_updates"] for step, r in _train_records(workdir).items()}


def test_a_diverging_rate_with_clipping_is_skipped_then_a_sane_rate_resumes(pieces_path,
                                                                            tmp_path):
  """on_bad_update=skip, learning rate 1e30 with gradient clipping: every update is finite but
  moves the parameters by ~1e30; each is rejected and counted, no checkpoint holds |x| > 1e6,
  and a sane rate resumes from the kept state."""
  from perceivers_jax.training import train  # pylint: disable=g-import-not-at-top
  arrays, _ = pieces_path
  config = _tiny_config()
  assert config.train.grad_clip_norm == 1.0
  sources = dict(train_source=[{"tokens": arrays[0]}], eval_source=[{"tokens": arrays[0][:200]}])

  def run(num_steps, learning_rate, on_bad_update="stop"):
    config.train.num_steps, config.train.learning_rate = num_steps, learning_rate
    config.train.on_bad_update = on_bad_update
    train.train_and_evaluate(config, str(tmp_path), **sources)

  run(2, 2e-3)
  run(5, 1e30, "skip")
  assert _skipped(tmp_path) == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1}
  saved = _saved_params(config, tmp_path)
  assert sorted(saved) == [1, 2, 3, 4, 5]
  for step in (3, 4, 5):  # the state of step 2, kept.
    jax.tree.map(np.testing.assert_array_equal, saved[step]["params"], saved[2]["params"])
  assert max(_largest(state["params"]) for state in saved.values()) < 1e6

  run(8, 2e-3)  # resumes from step 5 with a sane rate and trains on.
  losses = dict(_losses(tmp_path))
  assert sorted(losses) == list(range(1, 9)) and all(np.isfinite(list(losses.values())))
  final = _saved_params(config, tmp_path)[8]["params"]
  assert _largest(final) < 1e6
  assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(final),
                                                      jax.tree.leaves(saved[5]["params"])))


SPIKE_AT = 10


def test_a_loss_spike_is_skipped_and_a_checkpoint_to_resume_is_checked(pieces_path, tmp_path,
                                                                        monkeypatch):
  """Batch 10 holds only a token the pieces never contain (NOTE_ON of MIDI pitch 0): its loss
  jumps ~9 standard deviations above the window's. on_bad_update=skip rejects that update
  alone and leaves its loss out of the window. Then: a checkpoint written before the window
  existed resumes; one with exploded parameters, or with a window of another size, is refused
  in one line."""
  from perceivers_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from perceivers_jax.state import checkpointing  # pylint: disable=g-import-not-at-top
  from perceivers_jax.training import config_validation  # pylint: disable=g-import-not-at-top
  from perceivers_jax.training import train  # pylint: disable=g-import-not-at-top
  from perceivers_jax.training import update_guard  # pylint: disable=g-import-not-at-top
  arrays, _ = pieces_path
  config = _tiny_config()
  config.train.num_steps, config.train.loss_spike_window = 12, 8
  config.train.on_bad_update = "skip"
  sources = dict(train_source=[{"tokens": a} for a in arrays],
                 eval_source=[{"tokens": arrays[0][:200]}])
  batches = [0]
  to_global_arrays = input_pipeline.to_global_arrays

  def corrupt_one_batch(batch, sharding):
    batches[0] += 1
    if batches[0] == SPIKE_AT:
      batch = dict(batch, inputs=np.where(batch["positions"] >= 0, 3, 0).astype(np.int32),
                   targets=np.where(batch["targets"] > 0, 3, 0).astype(np.int32))
    return to_global_arrays(batch, sharding)

  monkeypatch.setattr(input_pipeline, "to_global_arrays", corrupt_one_batch)
  train.train_and_evaluate(config, str(tmp_path), **sources)
  monkeypatch.undo()
  records = {step: (r["train/max_loss_z"], r["train/skipped_updates"])
             for step, r in _train_records(tmp_path).items()}
  assert sorted(records) == list(range(1, 13))
  assert records[SPIKE_AT][0] > 6 and records[SPIKE_AT][1] == 1, records
  assert all(z < 6 and skipped == 0 for step, (z, skipped) in records.items()
             if step != SPIKE_AT), records
  saved = _saved_params(config, tmp_path)
  jax.tree.map(np.testing.assert_array_equal, saved[SPIKE_AT], dict(
      saved[SPIKE_AT - 1], step=SPIKE_AT))  # parameters, optimizer state and loss window kept.
  assert int(saved[12]["loss_window"]["count"]) == 11  # every accepted step but no spike.
  assert max(_largest(state["params"]) for state in saved.values()) < 1e6

  def rewrite_12_as(step, change):
    trainer = train.build_trainer_for(config)
    train_iter = input_pipeline.make_train_iterator(config, sources["train_source"],
                                                    seed=config.seed)
    ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(str(tmp_path)),
                                      config.checkpoint)
    state = ckpt.restore(12, trainer.abstract_state, train_iter)
    ckpt.save(step, change(dict(state, step=np.int32(step))), train_iter, force=True)
    ckpt.close()

  config.train.loss_spike_window = 16  # not the checkpoint's window: refused before restoring.
  with pytest.raises(config_validation.ConfigError, match=(
      r"config.train.loss_spike_window=16: checkpoint step 12 in .* holds a window of 8 ")):
    train.train_and_evaluate(config, str(tmp_path), **sources)
  config.train.loss_spike_window = 8

  # The state layout before the loss window: resumes (with an empty window).
  rewrite_12_as(13, lambda state: {k: v for k, v in state.items() if k != "loss_window"})
  config.train.num_steps = 13
  train.train_and_evaluate(config, str(tmp_path), **sources)

  rewrite_12_as(14, lambda state: dict(state, params=jax.tree.map(lambda x: x * 1e30,
                                                                   state["params"])))
  config.train.num_steps = 15
  with pytest.raises(update_guard.RejectedUpdateError, match=(
      r"Checkpoint step 14 in .* holds parameters with \|x\| up to .*e\+\d\d, beyond "
      r"\+-1e\+06 .*: delete that step's folder")):
    train.train_and_evaluate(config, str(tmp_path), **sources)
