"""jax's persistent compilation cache for one job (config.compilation_cache_dir).

What jax (0.10) caches: the XLA compilation of every jitted program, on CPU, GPU and TPU,
keyed by the lowered program, its compile options and XLA flags, the devices and the jaxlib
and backend versions; tracing and lowering still run at every start. A program is written
only if its compilation took at least `jax_persistent_cache_min_compile_time_secs` (jax's
default 1 s; config.compilation_cache_min_compile_seconds sets it, 0 writes every program);
jax's entry-size threshold is left at its default (no minimum). A restarted run, a resumed one, or
another job with the same shapes on the same kind of devices then reads its programs instead
of compiling them: the time account (`time_account.py`) counts them as cache hits.

config.compilation_cache_dir: "" = WORKDIR/compilation_cache, "off" = no cache, else a
directory or a bucket URL (gs://..., through etils.epath) that several workdirs or hosts may
share. The cache is process-wide: `enabled` sets it for a block and restores the previous
settings after it, so several jobs in one process (tests, notebooks) keep apart.
"""

import contextlib
import os
from typing import Iterator

from absl import logging
import jax
from jax.experimental.compilation_cache import compilation_cache
import ml_collections

from perceivers_jax import config_base

OFF = "off"
DEFAULT_SUBDIR = "compilation_cache"
_DIR_OPTION = "jax_compilation_cache_dir"
_MIN_SECONDS_OPTION = "jax_persistent_cache_min_compile_time_secs"


def settings(config: ml_collections.ConfigDict, workdir: str) -> tuple[str | None, float]:
  """(the cache directory `config` asks for, None for no cache; the compile-time threshold);
  ConfigError for a bad value."""
  setting = config.get("compilation_cache_dir", "")
  seconds = config.get("compilation_cache_min_compile_seconds", 1.0)
  if not isinstance(setting, str):
    config_base.fail("compilation_cache_dir", setting,
                     f'must be a path or URL, "" (under the workdir) or "{OFF}".')
  if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
    config_base.fail("compilation_cache_min_compile_seconds", seconds,
                     "must be a number of seconds >= 0 (0: cache every program).")
  if setting == OFF:
    return None, seconds
  return setting or os.path.join(workdir, DEFAULT_SUBDIR), seconds


@contextlib.contextmanager
def enabled(directory: str | None, min_compile_seconds: float = 1.0) -> Iterator[None]:
  """The persistent cache in `directory` for the block (nothing when None)."""
  if directory is None:
    yield
    return
  previous = {option: getattr(jax.config, option) for option in (_DIR_OPTION,
                                                                  _MIN_SECONDS_OPTION)}
  jax.config.update(_DIR_OPTION, directory)
  jax.config.update(_MIN_SECONDS_OPTION, float(min_compile_seconds))
  compilation_cache.reset_cache()  # the next compilation opens `directory`.
  logging.info("Persistent compilation cache: %s (programs compiling for >= %g s).",
               directory, min_compile_seconds)
  try:
    yield
  finally:
    for option, value in previous.items():
      jax.config.update(option, value)
    compilation_cache.reset_cache()
