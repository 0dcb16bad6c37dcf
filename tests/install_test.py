"""A non-editable install runs on its own: the package is built from setup.py into a fresh venv
and its commands run from a directory outside the checkout, with their default configs.

The fresh venv borrows this environment's dependencies through a .pth line (nothing is
downloaded); a .pth line adds a directory without running the .pth files in it, so this
environment's editable install of the checkout stays out of the fresh venv.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sysconfig
import venv

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(venv bin folder, its site-packages, a working directory outside the checkout)."""
  tmp = tmp_path_factory.mktemp("install")
  source = tmp / "source"  # a copy: building writes build/ and *.egg-info beside setup.py
  source.mkdir()
  shutil.copy(ROOT / "setup.py", source / "setup.py")
  for package in ("perceivers_jax", "data_prep"):
    shutil.copytree(ROOT / package, source / package,
                    ignore=shutil.ignore_patterns("__pycache__"))
  env_dir = tmp / "venv"
  venv.create(env_dir, with_pip=False)
  site = pathlib.Path(sysconfig.get_path("purelib", vars={"base": str(env_dir),
                                                          "platbase": str(env_dir)}))
  (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
  python = env_dir / "bin" / "python"
  subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps",
                  "--no-build-isolation", "--no-index", "--ignore-installed", str(source)],
                 check=True, capture_output=True, text=True, timeout=300, env=_env())
  outside = tmp / "elsewhere"
  outside.mkdir()
  return env_dir / "bin", site, outside


def _env() -> dict[str, str]:
  """This environment without PYTHONPATH (which could put the checkout first)."""
  return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"JAX_PLATFORMS": "cpu"}


def _run(installed, *command: str, returncode: int = 0) -> subprocess.CompletedProcess:
  bin_dir, _, outside = installed
  result = subprocess.run([str(bin_dir / command[0]), *command[1:]], cwd=outside, env=_env(),
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == returncode, result.stderr[-3000:]
  return result


def test_the_installed_copy_is_imported_and_writes_nothing_beside_itself(installed):
  """The modules come from the install; the demo's pieces go under the working directory."""
  _, site, outside = installed
  files = json.loads(_run(installed, "python", "-c", (
      "import json, data_prep, perceivers_jax, perceivers_jax.configs.tiny as t\n"
      "from data_prep import fetch_maestro_samples as f\n"
      "print(json.dumps([m.__file__ for m in (perceivers_jax, data_prep, t)]"
      " + [str(f.sample_paths()[0].resolve())]))")).stdout)
  assert all(pathlib.Path(f).is_relative_to(site) for f in files[:3]), (files, site)
  assert pathlib.Path(files[3]).is_relative_to(outside), files[3]


def test_demo_help_names_the_installed_default_config(installed):
  _, site, _ = installed
  default = site / "perceivers_jax" / "configs" / "tiny.py"
  help_text = _run(installed, "perceivers-demo", "--help", returncode=1).stdout  # absl: 1
  assert default.is_file() and f"(default:'{default}')" in "".join(help_text.split())


def test_train_dry_run_of_the_installed_tiny_config(installed):
  _, site, _ = installed
  result = _run(installed, "perceivers-train",
                f"--config={site / 'perceivers_jax' / 'configs' / 'tiny.py'}", "--dry_run",
                "--dry_run_compile=false")
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["batch_size"] == 8 and report["num_params"] > 0, report
