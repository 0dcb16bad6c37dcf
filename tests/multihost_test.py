"""Multi-host code paths on one machine: two `perceivers-train` processes joined by
jax.distributed on loopback, 4 simulated CPU devices each (a 2x2x2 mesh over 8 devices).

The processes compile without XLA's costly CPU optimisations (half the time of a run): these
tests are about code paths and equal losses between runs that all compile the same way. A
persistent compilation cache would not help: only process 0 writes it (process 1 found none
of its entries here), and a process 0 that skips compiling can wait for process 1 in its first
collective past gloo's 30 s set-up limit.

The uninterrupted run also plays music (validation and the music evaluator after steps 6 and
12); its losses are still those of the runs without. A process 0 that measured and wrote on
its training thread would hold the other host in the next step's collective, which, once
set up, waited a minute here without failing (gloo's 30 s limit is the set-up's), so the
test reads that off process 0's time account.
"""

import csv
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from typing import NamedTuple

import jax
import numpy as np
import pytest

from data_prep.maestro_performance import maestro_performance_dataset_builder as builder_lib
from perceivers_jax.parallel import mesh as mesh_lib
from perceivers_jax.sampling import sampling
from perceivers_jax.training import metrics_writer
from perceivers_jax.watch import music

REPO = pathlib.Path(__file__).resolve().parent.parent
HEARTBEAT_TIMEOUT_S = 30
STEPS = 12  # of the uninterrupted run; the interrupted ones stop and resume within them.
MUSIC_STEPS = (6, 12)  # the uninterrupted run's: two pieces from SOS, one row per host.
MUSIC_FLAGS = (f"--config.eval.every_steps={MUSIC_STEPS[0]}", "--config.eval.max_batches=1",
               "--config.eval.music.every_evals=1", "--config.eval.music.num_unconditional=2",
               "--config.eval.music.num_continuations=0", "--config.eval.music.num_tokens=24",
               "--config.eval.music.batch_size=2", "--config.eval.music.num_reference=2")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, maestro_paths):
  """maestro_performance/full over three real pieces: two train, one validation."""
  root = tmp_path_factory.mktemp("multihost")
  manual = root / "maestro"
  (manual / "2018").mkdir(parents=True)
  rows = []
  for path, split in zip((maestro_paths[0], maestro_paths[2], maestro_paths[9]),
                         ("train", "train", "validation")):
    (manual / "2018" / path.name).symlink_to(path)
    rows.append({"canonical_composer": "c", "canonical_title": path.stem, "split": split,
                 "year": 2018, "midi_filename": f"2018/{path.name}", "audio_filename": "",
                 "duration": 0})
  with open(manual / builder_lib.MAESTRO_CSV, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=builder_lib.MAESTRO_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  builder_lib.build(manual, root / "tfds", "full", num_workers=1)
  return root / "tfds"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_two_processes(workdir: pathlib.Path, data_dir: pathlib.Path, num_steps: int,
                         checkpoint_every: int = 2, *extra: str) -> list[subprocess.Popen]:
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
      "--xla_llvm_disable_expensive_passes=true"))
  command = [
      sys.executable, "-m", "perceivers_jax.cli.train", "--config=perceivers_jax/configs/tiny.py",
      f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
      f"--config.data.data_dir={data_dir}", "--config.model.max_length=128",
      "--config.model.num_latents=32", "--config.model.cross_attention_scales=(0,16)",
      f"--config.train.num_steps={num_steps}", "--config.train.batch_size=8",
      "--config.eval.every_steps=1000", "--config.eval.max_batches=2",
      f"--config.checkpoint.every_steps={checkpoint_every}", "--config.log_every_steps=1",
      "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
      f"--heartbeat_timeout_s={HEARTBEAT_TIMEOUT_S}", *extra]
  return [subprocess.Popen(command + [f"--process_id={i}"], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(2)]


def _finish(processes: list[subprocess.Popen]) -> list[str]:
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  for i, (p, out) in enumerate(zip(processes, outputs)):
    assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
  return outputs


def _train_steps(workdir: pathlib.Path) -> list[int]:
  return [step for step, _ in _losses(workdir)]


def _losses(workdir: pathlib.Path) -> list[tuple[int, float]]:
  """(step, train loss) of every train record (only process 0 writes metrics)."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  records = map(json.loads, path.read_text().splitlines())
  return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def _saved_steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _wait_for_steps(processes, workdir: pathlib.Path, count: int) -> None:
  deadline = time.time() + 400
  while (time.time() < deadline and all(p.poll() is None for p in processes)
         and len(_train_steps(workdir)) < count):
    time.sleep(0.05)
  if len(_train_steps(workdir)) < count:
    for p in processes:
      p.kill()
    outputs = [p.communicate()[0][-3000:] for p in processes]
    pytest.fail(f"fewer than {count} steps; exit statuses {[p.returncode for p in processes]}:\n"
                + "\n".join(outputs))


class Run(NamedTuple):
  workdir: pathlib.Path
  outputs: list[str]  # each process's stdout and stderr


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir) -> Run:
  """A 2-process run of STEPS steps with music (MUSIC_FLAGS), never interrupted."""
  workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
  return Run(workdir, _finish(_start_two_processes(workdir, data_dir, STEPS, 2, *MUSIC_FLAGS)))


def test_two_processes_train_and_checkpoint(uninterrupted):
  assert _saved_steps(uninterrupted.workdir) == [STEPS - 2, STEPS]  # every 2 steps, keep 2.
  assert _train_steps(uninterrupted.workdir) == list(range(1, STEPS + 1))


def test_music_is_written_once_by_process_0_with_the_pieces_of_one_device(uninterrupted,
                                                                           tmp_path):
  """Both hosts sample, process 0 alone measures and writes (in the background, while both
  go on training): each step's pages and scalars come once, with the pieces one process on
  one device samples from the same parameters and seeds."""
  # evaluation/report.py logs each report it writes.
  assert [output.count("evaluation/report.md") for output in uninterrupted.outputs] == [2, 0]
  folder = uninterrupted.workdir / music.NAME
  assert sorted(map(int, json.loads((folder / music.MANIFEST).read_text()))) == [*MUSIC_STEPS]
  assert all((folder / str(step) / "index.html").exists() for step in MUSIC_STEPS)
  records = [json.loads(line) for line in
             (uninterrupted.workdir / "metrics.jsonl").read_text().splitlines()]
  scalars = [r for r in records if "music/oa_mean/unconditional" in r]
  assert [r["step"] for r in scalars] == [*MUSIC_STEPS]
  # Process 0's time account after each evaluation and at the end: between the two
  # evaluations its music time grew by the second one's sampling (compiled at the first), not
  # by any writing, which went on in the background (the other host never waited for it).
  accounts = [r for r in records if "time/music_seconds" in r]
  assert [r["step"] for r in accounts] == [*MUSIC_STEPS, STEPS]
  grown = accounts[1]["time/music_seconds"] - accounts[0]["time/music_seconds"]
  assert grown < scalars[1]["music/sampling_seconds"] + scalars[1]["music/writing_seconds"] / 2

  model, config, step = sampling.load_model(uninterrupted.workdir, step=STEPS,
                                            mesh=mesh_lib.data_mesh(jax.devices()[:1]))
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  evaluator = music.MusicEvaluator(config, str(tmp_path))
  evaluator.run(step, model)
  evaluator.log_finished(writer, wait=True)
  writer.close()
  for piece in ("sample_0000.npy", "sample_0001.npy"):
    np.testing.assert_array_equal(
        np.load(folder / str(STEPS) / "unconditional" / piece),
        np.load(tmp_path / music.NAME / str(STEPS) / "unconditional" / piece))


def test_resumed_after_sigterm_to_both_and_sigkill_of_one_equals_uninterrupted(
    tmp_path, data_dir, uninterrupted):
  """A preemption (SIGTERM to both processes) saves and exits; the rerun resumes; then one
  process is killed (SIGKILL): the other exits at once with one line saying what to do; the
  next rerun resumes from the last checkpoint and finishes. Every step's loss equals the
  uninterrupted run's bit for bit."""
  workdir = tmp_path / "run"
  processes = _start_two_processes(workdir, data_dir, STEPS)
  _wait_for_steps(processes, workdir, 2)
  for process in processes:
    process.send_signal(signal.SIGTERM)
  outputs = _finish(processes)
  preempted = _saved_steps(workdir)[-1]
  assert 2 <= preempted < STEPS - 4, preempted
  assert all(f"Preempted: saved step {preempted}" in output for output in outputs)

  processes = _start_two_processes(workdir, data_dir, STEPS)
  _wait_for_steps(processes, workdir, preempted + 3)
  processes[1].kill()
  killed_at = time.time()
  output = processes[0].communicate(timeout=HEARTBEAT_TIMEOUT_S + 120)[0]
  assert processes[0].returncode == 1, output[-4000:]
  assert time.time() - killed_at < HEARTBEAT_TIMEOUT_S + 60
  assert f"Resuming from step {preempted}" in output
  assert ("error: process 0 of 2 stopped: " in output and "rerun the same command on every "
          "host to resume from the last checkpoint." in output.splitlines()[-1]), output[-4000:]
  processes[1].communicate()
  last_saved = _saved_steps(workdir)[-1]
  assert preempted <= last_saved < STEPS, _saved_steps(workdir)

  outputs = _finish(_start_two_processes(workdir, data_dir, STEPS))
  assert f"Resuming from step {last_saved}" in outputs[0]
  assert _losses(workdir) == _losses(uninterrupted.workdir)


def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(tmp_path, data_dir):
  """The preemption notice reaches every host (reached_preemption_sync_point): both save the
  same step and exit 0, though only process 1 got the signal."""
  workdir = tmp_path / "run"
  processes = _start_two_processes(workdir, data_dir, num_steps=500, checkpoint_every=1000)
  _wait_for_steps(processes, workdir, 2)
  processes[1].send_signal(signal.SIGTERM)
  outputs = _finish(processes)
  saved = _saved_steps(workdir)
  assert len(saved) == 1 and 2 <= saved[0] < 500, saved
  for output in outputs:
    assert f"Preempted: saved step {saved[0]}" in output, output[-3000:]
  assert _train_steps(workdir) == list(range(1, saved[0] + 1))

