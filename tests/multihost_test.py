"""Multi-host code paths on one machine: two `perceivers-train` processes joined by
jax.distributed on loopback, 4 simulated CPU devices each (a 2x2x2 mesh over 8 devices)."""

import csv
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from data_prep.maestro_performance import maestro_performance_dataset_builder as builder_lib

REPO = pathlib.Path(__file__).resolve().parent.parent


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
                         checkpoint_every: int = 2) -> list[subprocess.Popen]:
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  command = [
      sys.executable, "-m", "perceivers_jax.cli.train", "--config=perceivers_jax/configs/tiny.py",
      f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
      f"--config.data.data_dir={data_dir}", "--config.model.max_length=128",
      "--config.model.num_latents=32", "--config.model.cross_attention_scales=(0,16)",
      f"--config.train.num_steps={num_steps}", "--config.train.batch_size=8",
      "--config.eval.every_steps=1000", "--config.eval.max_batches=2",
      f"--config.checkpoint.every_steps={checkpoint_every}", "--config.log_every_steps=1",
      "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
  return [subprocess.Popen(command + [f"--process_id={i}"], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(2)]


def _finish(processes: list[subprocess.Popen]) -> list[str]:
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  for i, (p, out) in enumerate(zip(processes, outputs)):
    assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
  return outputs


def _train_on_two_processes(workdir: pathlib.Path, data_dir: pathlib.Path, num_steps: int):
  return _finish(_start_two_processes(workdir, data_dir, num_steps))


def _train_steps(workdir: pathlib.Path) -> list[int]:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [r["step"] for r in map(json.loads, lines) if "train/loss" in r]


def test_two_processes_train_checkpoint_and_resume(tmp_path, data_dir):
  workdir = tmp_path / "run"
  _train_on_two_processes(workdir, data_dir, num_steps=4)
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == [2, 4]
  assert _train_steps(workdir) == [1, 2, 3, 4]  # only process 0 writes metrics

  outputs = _train_on_two_processes(workdir, data_dir, num_steps=6)
  assert "Resuming from step 4" in outputs[0]
  assert _train_steps(workdir) == [1, 2, 3, 4, 5, 6]


def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(tmp_path, data_dir):
  """The preemption notice reaches every host (reached_preemption_sync_point): both save the
  same step and exit 0, though only process 1 got the signal."""
  workdir = tmp_path / "run"
  processes = _start_two_processes(workdir, data_dir, num_steps=500, checkpoint_every=1000)
  deadline = time.time() + 400
  metrics = workdir / "metrics.jsonl"
  while time.time() < deadline and all(p.poll() is None for p in processes) and not (
      metrics.exists() and len(_train_steps(workdir)) >= 2):
    time.sleep(0.05)
  processes[1].send_signal(signal.SIGTERM)
  outputs = _finish(processes)
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert len(saved) == 1 and 2 <= saved[0] < 500, saved
  for output in outputs:
    assert f"Preempted: saved step {saved[0]}" in output, output[-3000:]
  assert _train_steps(workdir) == list(range(1, saved[0] + 1))
