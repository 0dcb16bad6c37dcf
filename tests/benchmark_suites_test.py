"""benchmarks/gpu_suite.sh and tpu_suite.sh stay ready to run in one call: valid bash, the
GPU suite's time limits within 8 minutes, and every flag they pass defined by its script."""

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
