"""The launchers in launch/: syntax, shellcheck, and the commands they issue (fake gcloud)."""

import os
import pathlib
import shutil
import stat
import subprocess

import pytest

LAUNCH_DIR = pathlib.Path(__file__).resolve().parent.parent / "launch"
SCRIPTS = sorted(p for p in LAUNCH_DIR.iterdir() if p.suffix in (".sh", ".sbatch"))


def test_all_three_launchers_exist():
  assert {p.name for p in SCRIPTS} == {"tpu_pod.sh", "gpu_slurm.sbatch", "gpu_single_node.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck not installed (apt-get install shellcheck)")
  result = subprocess.run(["shellcheck", "-s", "bash", str(script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def _fake_gcloud(tmp_path: pathlib.Path) -> pathlib.Path:
  """A gcloud that logs its arguments and reports an existing TPU."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  fake = bin_dir / "gcloud"
  fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> "$GCLOUD_LOG"\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  return bin_dir


def test_tpu_pod_runs_one_identical_command_on_all_workers(tmp_path):
  bin_dir = _fake_gcloud(tmp_path)
  log = tmp_path / "gcloud.log"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", GCLOUD_LOG=str(log))
  subprocess.run(
      ["bash", str(LAUNCH_DIR / "tpu_pod.sh"), "--name=pod", "--zone=us-east5-a",
       f"--log_dir={tmp_path / 'logs'}", "--", "--config=configs/perceivers.py",
       "--workdir=gs://bucket/run"],
      check=True, env=env, cwd=tmp_path, capture_output=True)
  calls = log.read_text().splitlines()
  assert calls[0].startswith("compute tpus tpu-vm describe pod")
  train_calls = [c for c in calls if "perceivers_jax.cli.train" in c]
  assert len(train_calls) == 1
  assert "--worker=all" in train_calls[0]
  assert "--config=configs/perceivers.py --workdir=gs://bucket/run" in train_calls[0]
  assert any("pip install" in c and "--worker=all" in c for c in calls)


def test_tpu_pod_without_zone_fails_with_usage(tmp_path):
  result = subprocess.run(["bash", str(LAUNCH_DIR / "tpu_pod.sh"), "--name=pod", "--", "--x"],
                          capture_output=True, text=True, cwd=tmp_path)
  assert result.returncode == 2
  assert "--name and --zone are required" in result.stderr


def test_single_node_requires_workdir(tmp_path):
  venv = tmp_path / "venv" / "bin"
  venv.mkdir(parents=True)
  (venv / "python").write_text("#!/bin/sh\nexit 0\n")
  (venv / "python").chmod(0o755)
  env = dict(os.environ, PERCEIVERS_VENV=str(tmp_path / "venv"))
  result = subprocess.run(["bash", str(LAUNCH_DIR / "gpu_single_node.sh"), "--config=x.py"],
                          capture_output=True, text=True, env=env)
  assert result.returncode == 2
  assert "--workdir=DIR is required" in result.stderr


def test_tpu_pod_runs_a_sampling_job_on_all_workers(tmp_path):
  bin_dir = _fake_gcloud(tmp_path)
  log = tmp_path / "gcloud.log"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", GCLOUD_LOG=str(log))
  subprocess.run(
      ["bash", str(LAUNCH_DIR / "tpu_pod.sh"), "--name=pod", "--zone=us-east5-a", "--job=sample",
       f"--log_dir={tmp_path / 'logs'}", "--", "--workdir=/mnt/b/run", "--output_dir=/mnt/b/s",
       "--num_samples=1024"],
      check=True, env=env, cwd=tmp_path, capture_output=True)
  calls = log.read_text().splitlines()
  sample_calls = [c for c in calls if "perceivers_jax.cli.sample" in c]
  assert len(sample_calls) == 1 and not any("perceivers_jax.cli.train" in c for c in calls)
  assert "--worker=all" in sample_calls[0]
  assert "--workdir=/mnt/b/run --output_dir=/mnt/b/s --num_samples=1024" in sample_calls[0]


def test_tpu_pod_rejects_an_unknown_job(tmp_path):
  result = subprocess.run(["bash", str(LAUNCH_DIR / "tpu_pod.sh"), "--name=pod", "--zone=z",
                           "--job=export", "--", "--x"], capture_output=True, text=True,
                          cwd=tmp_path)
  assert result.returncode == 2
  assert "--job=export: must be train or sample" in result.stderr


@pytest.mark.parametrize("job_flags,module", [((), "train"), (("--job=sample",), "sample")])
def test_slurm_runs_the_job_with_srun(tmp_path, job_flags, module):
  """The sbatch script run as a plain script, with a fake srun and virtualenv."""
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "activate").write_text("")
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  srun = bin_dir / "srun"
  srun.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> "$SRUN_LOG"\n')
  srun.chmod(0o755)
  log = tmp_path / "srun.log"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SRUN_LOG=str(log),
             PERCEIVERS_VENV=str(venv), SLURM_SUBMIT_DIR=str(tmp_path))
  subprocess.run(["bash", str(LAUNCH_DIR / "gpu_slurm.sbatch"), *job_flags, "--workdir=/w",
                  "--num_samples=8"], check=True, env=env, capture_output=True)
  [call] = log.read_text().splitlines()
  assert call.endswith(f"python -m perceivers_jax.cli.{module} --workdir=/w --num_samples=8")
