"""Readable console output for the command-line tools."""

import logging as std_logging

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
