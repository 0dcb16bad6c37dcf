"""The launchers in launch/: syntax, shellcheck, the commands they issue (fake gcloud), and
the training examples they and BUILD.md document, valid on the hardware each names."""

import os
import pathlib
import re
import shlex
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


def _launcher(command: str) -> str:
  return re.search(r"launch/([\w.]+)", command).group(1)


def _header_commands(text: str) -> list[str]:
  """The commands written in a script's leading comment block, continuation lines joined."""
  comment = []
  for line in text.splitlines()[1:]:
    if not line.startswith("#"):
      break
    comment.append(line.lstrip("#").strip())
  joined = re.sub(r"\\\n", " ", "\n".join(comment))
  return [line for line in joined.splitlines() if line.startswith(("launch/", "sbatch "))]


def _build_md_commands() -> list[str]:
  """The launcher commands in backticks in BUILD.md section 5."""
  build = (LAUNCH_DIR.parent / "BUILD.md").read_text()
  section = re.search(r"^## 5\. .*?(?=^## )", build, re.M | re.S).group(0)
  return [c for c in re.findall(r"`([^`]+)`", section) if c.startswith(("launch/", "sbatch "))]


def _hardware(script: str, launcher_words: list[str]) -> tuple[int, int]:
  """(devices, hosts) of the hardware a launcher command names (flags before the job's)."""
  import example_configs  # pylint: disable=g-import-not-at-top
  text = (LAUNCH_DIR / script).read_text()
  given = dict(w.removeprefix("--").split("=", 1) for w in launcher_words if "=" in w)
  if script == "tpu_pod.sh":
    default = re.search(r'accelerator="([\w-]+)"', text).group(1)
    return example_configs.tpu_slice(given.get("accelerator", default))
  if script == "gpu_slurm.sbatch":
    nodes = int(given.get("nodes", re.search(r"#SBATCH --nodes=(\d+)", text).group(1)))
    per_node = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", text).group(1))
    return nodes * per_node, nodes
  return int(re.search(r"\b(\d+)-GPU\b", text).group(1)), 1  # gpu_single_node.sh


def _training_examples() -> list[tuple[str, str]]:
  """(where, command) of every documented launcher command that trains."""
  found = [(p.name, c) for p in SCRIPTS for c in _header_commands(p.read_text())]
  found += [("BUILD.md", c) for c in _build_md_commands()]
  return [(where, c) for where, c in found
          if "--config=" in c and "--job=sample" not in c]


def test_every_launcher_documents_a_training_example_here_and_in_build_md():
  named = lambda where: {_launcher(c) for w, c in _training_examples() if w == where}
  launchers = {p.name for p in SCRIPTS}
  assert named("BUILD.md") == launchers
  assert set().union(*(named(p.name) for p in SCRIPTS)) == launchers


@pytest.mark.parametrize("where, command", _training_examples(),
                         ids=[f"{where}:{_launcher(c)}" for where, c in _training_examples()])
def test_training_example_is_valid_on_the_hardware_it_names(where, command):
  """Each example's config passes perceivers-train's validation for the devices and hosts of
  the hardware the command names (v5p-64: 32 chips on 8 hosts; 4 SLURM nodes of 8 GPUs)."""
  import example_configs  # pylint: disable=g-import-not-at-top
  from perceivers_jax.training import config_validation  # pylint: disable=g-import-not-at-top
  del where
  words = shlex.split(command)
  script_at = next(i for i, w in enumerate(words) if w.startswith("launch/"))
  script = _launcher(command)
  job_at = words.index("--") if "--" in words else script_at + 1
  launcher_words = words[:script_at] + words[script_at + 1:job_at]
  devices, hosts = _hardware(script, launcher_words)
  config = example_configs.config_from_flags(words[job_at:])
  config_validation.validate(config, num_devices=devices, process_count=hosts)
