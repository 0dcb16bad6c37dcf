"""benchmarks/gpu_suite.sh and tpu_suite.sh stay ready to run in one call: valid bash, the
GPU suite's time limits within 8 minutes, every flag they pass defined by its script, and
train steps valid on every chip of a multi-chip host."""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SUITES = [ROOT / "benchmarks" / "gpu_suite.sh", ROOT / "benchmarks" / "tpu_suite.sh"]
STEPS = ROOT / "benchmarks" / "suite_steps.sh"  # what both source


def _steps(suite: pathlib.Path) -> list[tuple[int, str, list[str]]]:
  """(time limit s, name, command words) of each `step SECONDS NAME COMMAND...` line the
  suite runs, those of suite_steps.sh's `paper_benchmarks` where the suite calls it."""
  paper = re.search(r"^paper_benchmarks\(\) \{\n(.*?)^\}", STEPS.read_text(), re.M | re.S)
  text = re.sub(r"^paper_benchmarks\b.*$", lambda _: paper.group(1), suite.read_text(),
                flags=re.M)
  text = re.sub(r"\\\n\s*", " ", text)
  return [(int(m.group(1)), m.group(2), m.group(3).split())
          for m in re.finditer(r"^\s*step (\d+) (\w+) (.*)$", text, re.M)]


@pytest.mark.parametrize("suite", SUITES + [STEPS], ids=lambda p: p.name)
def test_suite_is_valid_bash(suite):
  subprocess.run(["bash", "-n", str(suite)], check=True)
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck not installed (apt-get install shellcheck)")
  result = subprocess.run(["shellcheck", "-x", "-s", "bash", str(suite)], cwd=ROOT,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def test_a_failed_or_slow_step_is_reported_and_the_others_still_run(tmp_path):
  script = (f"source {STEPS}; suite_start test; step 5 fine echo hello; "
            "step 1 slow sleep 5; step 5 broken false; step 5 after echo still; suite_end")
  env = dict(os.environ, OUT=str(tmp_path), PATH=f"{pathlib.Path(sys.executable).parent}:"
             f"{os.environ['PATH']}")
  result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 1, result.stdout + result.stderr
  assert "!! slow failed or timed out" in result.stdout
  assert "!! broken failed or timed out" in result.stdout
  assert "!! fine" not in result.stdout and "!! after" not in result.stdout
  assert (tmp_path / "fine.log").read_text() == "hello\n"
  assert (tmp_path / "after.log").read_text() == "still\n"


def test_gpu_suite_fits_one_eight_minute_call():
  steps = _steps(SUITES[0])
  assert [name for _, name, _ in steps] == ["cudnn_vs_xla", "train_b1", "train_b8", "sampling"]
  assert sum(limit for limit, _, _ in steps) <= 8 * 60


@pytest.mark.parametrize("suite", SUITES, ids=lambda p: p.name)
def test_every_flag_a_suite_passes_is_defined(suite):
  """`python benchmarks/X.py --flag=...` steps: each --flag (config overrides aside) is one
  of X.py's absl flags, so a renamed flag fails here, not on the accelerator."""
  checked = 0
  for _, name, words in _steps(suite):
    if words[:2] != ["python", words[1]] or not words[1].startswith("benchmarks/"):
      continue
    helpfull = subprocess.run([sys.executable, words[1], "--helpfull"], cwd=ROOT,
                              capture_output=True, text=True, timeout=300, check=False).stdout
    for word in words[2:]:
      flag = re.match(r"--([\w.]+)", word)
      if flag and not flag.group(1).startswith("config"):
        assert f"--{flag.group(1)}" in helpfull, f"{suite.name} step {name}: {word}"
        checked += 1
  assert checked >= 5


@pytest.mark.parametrize("suite, chips", [(SUITES[0], 8), (SUITES[1], 4)],
                         ids=["gpu_suite.sh-8_gpus", "tpu_suite.sh-4_chips"])
def test_train_steps_are_valid_on_every_chip_of_the_host(tmp_path, suite, chips):
  """The suite run on a host of `chips` devices (8 GPUs of an H100 node; a v4-8 or v5p-8 TPU
  VM: 4 chips), with a `python` that counts the devices for real (jax on as many simulated
  CPU devices) and records the benchmark commands: each train step passes validation for
  those chips, at 1 and 8 windows per chip."""
  from perceivers_jax.training import config_validation  # pylint: disable=g-import-not-at-top
  import example_configs  # pylint: disable=g-import-not-at-top
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  fake = bin_dir / "python"
  fake.write_text(f'#!/usr/bin/env bash\nif [ "$1" = -c ]; then exec {sys.executable} "$@"; fi\n'
                  'printf "%s\\t" "$@" >> "$CALLS"; printf "\\n" >> "$CALLS"\n')
  fake.chmod(0o755)
  calls = tmp_path / "calls.tsv"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(calls),
             OUT=str(tmp_path / "out"), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={chips}")
  result = subprocess.run(["bash", str(suite)], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  train_steps = {}
  for line in calls.read_text().splitlines():
    words = line.rstrip("\t").split("\t")
    if words[0] == "benchmarks/train_step.py":
      output = next(w for w in words if w.startswith("--output="))
      train_steps[pathlib.Path(output).stem] = example_configs.config_from_flags(words)
  assert sorted(train_steps) == ["train_b1", "train_b8"]
  for name, config in train_steps.items():
    config_validation.validate(config, num_devices=chips, process_count=1)
    per_chip = int(name.removeprefix("train_b"))
    assert config.train.batch_size == per_chip * chips, name
