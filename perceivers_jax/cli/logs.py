"""Readable console output for the command-line tools: quiet library logs, full --help."""

import logging as std_logging
import sys

from absl import flags
from absl import logging

_NOISY_LIBRARIES = ("/orbax/", "/grain/", "/jax/", "/etils/", "/tensorflow_datasets/")


class _LibraryInfoFilter(std_logging.Filter):
  """Drops INFO chatter of orbax/grain/jax/tfds (every checkpoint logs dozens of lines), so
  progress lines stay readable; their warnings and errors still show."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in _NOISY_LIBRARIES)


def quiet_library_info() -> None:
  """Call first thing in an absl `main`."""
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())


def show_flags_in_help(module_name: str) -> None:
  """Lists `module_name`'s flags under --help when it runs as a console script.

  absl's --help shows the key flags of the module named by sys.argv[0]: a console script's
  wrapper, not the module that defines the flags.
  """
  for flag in flags.FLAGS.get_key_flags_for_module(module_name):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
