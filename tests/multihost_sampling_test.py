"""perceivers-sample as a multi-host job on one machine: two processes joined by
jax.distributed on loopback, 4 simulated CPU devices each, against one process on one device.

One job, killed mid-run and rerun: the two runs together write exactly the 20 samples (a
global batch of 8, so the last batch is padded), each with the tokens one process on one
device gives it, and a whole manifest. A bad request fails on both hosts alike, before
anything compiles.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from perceivers_jax.parallel import mesh as mesh_lib
from perceivers_jax.sampling import job
from perceivers_jax.sampling import listening_page
from perceivers_jax.sampling import sampling
from sampling_test import workdir  # pylint: disable=unused-import (the trained tiny workdir)

REPO = pathlib.Path(__file__).resolve().parent.parent
NUM_SAMPLES, GLOBAL_BATCH, NUM_TOKENS = 20, 8, 120  # 120 > L = 64: the window slides.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_two_processes(workdir: str, output_dir: pathlib.Path, *extra: str, **env_extra: str):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", **env_extra)
  command = [sys.executable, "-m", "perceivers_jax.cli.sample", f"--workdir={workdir}",
             f"--output_dir={output_dir}", f"--num_samples={NUM_SAMPLES}",
             f"--batch_size={GLOBAL_BATCH}", f"--num_tokens={NUM_TOKENS}", "--seed=5",
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", *extra]
  return [subprocess.Popen(command + [f"--process_id={i}"], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True) for i in range(2)]


def _wait(processes) -> list[str]:
  return [p.communicate(timeout=600)[0] for p in processes]


def _tokens(output_dir: pathlib.Path) -> dict[int, list[int]]:
  return {int(p.stem.split("_")[1]): np.load(p).tolist()
          for p in output_dir.glob("sample_*.npy")}


def test_killed_two_host_job_resumes_to_the_single_device_samples(workdir, tmp_path):
  # The reference: one process, one device, another batch size.
  model, config, step = sampling.load_model(
      workdir, mesh=mesh_lib.data_mesh(jax.devices()[:1]))
  settings = sampling.SampleSettings(num_samples=NUM_SAMPLES, batch_size=3,
                                     num_tokens=NUM_TOKENS, seed=5)
  sampling.sample_to_dir(model, config, settings, tmp_path / "one", checkpoint_step=step,
                         checkpoint_path=workdir)
  reference = _tokens(tmp_path / "one")
  assert sorted(reference) == list(range(NUM_SAMPLES))

  # Two hosts, killed as soon as the first sample is complete.
  out = tmp_path / "two"
  processes = _start_two_processes(workdir, out)
  deadline = time.monotonic() + 600
  while not list(out.glob("sample_*.json")) and time.monotonic() < deadline:
    assert all(p.poll() is None for p in processes), _wait(processes)
    time.sleep(0.02)
  for p in processes:
    os.killpg(p.pid, signal.SIGKILL)
  _wait(processes)
  first = {i: job.stem(out, i).with_suffix(".json").stat().st_mtime_ns for i in range(NUM_SAMPLES)
           if job.stem(out, i).with_suffix(".json").is_file()}
  assert 0 < len(first) < NUM_SAMPLES, f"the kill came too late: {len(first)} samples done"
  assert not (out / job.MANIFEST).exists()

  processes = _start_two_processes(workdir, out)
  outputs = _wait(processes)
  for i, (p, output) in enumerate(zip(processes, outputs)):
    assert p.returncode == 0, f"process {i}:\n{output[-4000:]}"
  # Only the missing samples were generated; the complete ones were left alone.
  assert f"Sampled {NUM_SAMPLES - len(first)} samples" in outputs[0]
  assert "Sampled" not in outputs[1]  # process 0 alone reports ...
  assert "sampling:" in outputs[0] and "sampling:" not in outputs[1]  # ... and shows progress.
  for i, mtime in first.items():
    assert job.stem(out, i).with_suffix(".json").stat().st_mtime_ns == mtime
  # Exactly the 20 samples (no padding row written, nothing half-written left), each with the
  # tokens of the one-device run.
  expected = {f"sample_{i:04d}{s}" for i in range(NUM_SAMPLES) for s in job.SUFFIXES}
  assert {p.name for p in out.iterdir()} == expected | {job.MANIFEST, job.RUN_FILE, listening_page.INDEX}
  assert _tokens(out) == reference
  manifest = [json.loads(line) for line in (out / job.MANIFEST).read_text().splitlines()]
  assert [entry["index"] for entry in manifest] == list(range(NUM_SAMPLES))
  for entry in manifest:
    assert entry["num_tokens"] == len(reference[entry["index"]]) and entry["seed"] == 5
    sidecar = json.loads(job.stem(out, entry["index"]).with_suffix(".json").read_text())
    assert sidecar["batch_slot"] == entry["index"] % GLOBAL_BATCH
    assert entry["eos_reached"] == sidecar["eos_reached"]


def test_bad_request_fails_alike_on_every_host_before_compiling(workdir, tmp_path):
  processes = _start_two_processes(workdir, tmp_path / "out", "--top_p=0", JAX_LOG_COMPILES="1")
  outputs = _wait(processes)
  last_lines = [output.strip().splitlines()[-1] for output in outputs]
  assert all(p.returncode != 0 for p in processes), outputs
  assert last_lines[0] == last_lines[1] and "--top_p=0" in last_lines[0], last_lines
  assert not any("Compiling" in output for output in outputs), outputs
  assert not (tmp_path / "out").exists()
