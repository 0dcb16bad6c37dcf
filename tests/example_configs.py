"""Configs of the commands that the launchers and benchmark suites document or run, for
checking them with config_validation against the hardware they name."""

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
