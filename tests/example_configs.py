"""Configs of the commands that the launchers and benchmark suites document or run, and the
devices and hosts of the hardware they name, for checking them with config_validation."""

import pathlib

from absl import flags
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent


def config_from_flags(words: list[str]):
  """The config that perceivers-train (or a benchmark) builds from these command-line words:
  --config=FILE[:variant] and its --config.x=y overrides, the other flags ignored."""
  kept = [w for w in words if w.startswith(("--config=", "--config."))]
  argv = ["example"] + [f"--config={ROOT / w.removeprefix('--config=')}"
                        if w.startswith("--config=") else w for w in kept]
  flag_values = flags.FlagValues()
  # The override flags (--config.x) are defined from the words given here.
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def tpu_slice(accelerator: str) -> tuple[int, int]:
  """(chips, hosts) of a Cloud TPU accelerator type: v4 and v5p names count TensorCores (2 per
  chip, 4 chips per host); v5e (v5litepod) and v6e names count chips (up to 8 on one host,
  4 per host in larger slices)."""
  generation, size = accelerator.rsplit("-", 1)
  count = int(size)
  if generation in ("v4", "v5p"):
    chips = count // 2
    return chips, max(1, chips // 4)
  if generation in ("v5e", "v5litepod", "v6e"):
    return count, 1 if count <= 8 else count // 4
  raise ValueError(f"unknown TPU generation in {accelerator!r}: add it to tpu_slice")
