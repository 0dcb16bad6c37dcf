"""What every command-line tool shares: quiet library logs, full --help, and bad input as one
line on stderr.

Bad input (a missing or misnamed file, flag or config field) exits 1 with one line that
names the thing and the fix, and no traceback; `--verbose` shows the traceback too. Any
other exception is a bug and keeps its traceback.
"""

from collections.abc import Callable
import logging as std_logging
import re
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging

from perceivers_jax import config_base

_NOISY_LIBRARIES = ("/orbax/", "/grain/", "/jax/", "/etils/", "/tensorflow_datasets/")
# Path errors are the user's: a missing input, an output where a file already is.
_PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError)
VERBOSE_FLAG = "verbose"

flags.DEFINE_bool(VERBOSE_FLAG, False,
                  "On bad input, also print the traceback (it is one line without).")


class _LibraryInfoFilter(std_logging.Filter):
  """Drops INFO chatter of orbax/grain/jax/tfds (every checkpoint logs dozens of lines), so
  progress lines stay readable; their warnings and errors still show."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in _NOISY_LIBRARIES)


def quiet_library_info() -> None:
  """Filters library INFO lines out of absl logging (`run` does this for absl mains)."""
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())


def show_flags_in_help(module_name: str) -> None:
  """Lists `module_name`'s flags under --help when it runs as a console script.

  absl's --help shows the key flags of the module named by sys.argv[0]: a console script's
  wrapper, not the module that defines the flags.
  """
  for flag in flags.FLAGS.get_key_flags_for_module(module_name):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def input_error_line(error: BaseException) -> str | None:
  """"error: ..." on one line if `error` is bad input, else None (a bug)."""
  if isinstance(error, (config_base.InputError, app.UsageError)):
    message = str(error)
  elif isinstance(error, _PATH_ERRORS) and error.filename:
    message = f"{error.filename}: {error.strerror}"
  elif isinstance(error, _PATH_ERRORS):
    message = str(error)
  else:
    return None
  return "error: " + " ".join(message.split())


def call(fn: Callable[[], Any], *, verbose: bool) -> int:
  """Runs fn(): 0, or 1 once bad input is printed as one line (re-raised if `verbose`)."""
  try:
    fn()
  except Exception as e:  # pylint: disable=broad-except
    line = input_error_line(e)
    if line is None or verbose:
      raise
    print(line, file=sys.stderr, flush=True)
    return 1
  return 0


def _innermost_message(error: BaseException) -> str:
  """The message under ml_collections' wrapping: an AttributeError whose argument is a
  KeyError whose argument is the text, e.g. `'num_stepz'` + newline + `Did you mean ...`."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  return error.args[0] if error.args and isinstance(error.args[0], str) else str(error)


def _flag_error_line(error: Exception, argv: list[str]) -> str:
  """A flag parser's exception (a --config.* override that fails) as one line."""
  message = _innermost_message(error)
  unknown = re.match(r"'([^']+)'", message)
  suggestion = re.search(r"""[Dd]id you mean ["']([^"']+)["']""", message)
  for arg in argv[1:] if unknown else ():
    parts = arg.lstrip("-").partition("=")[0].split(".")
    if unknown.group(1) in parts[1:]:
      depth = parts.index(unknown.group(1), 1)
      parent, name = ".".join(parts[:depth]), ".".join(parts)
      fix = ("check the name against the config file" if suggestion is None else
             f"did you mean --{'.'.join(parts[:depth] + [suggestion.group(1)] + parts[depth + 1:])}?")
      return f"error: --{name}: {parent} has no field {unknown.group(1)!r}; {fix}"
  return "error: bad flag: " + " ".join(f"{type(error).__name__}: {message}".split())


def run(main: Callable[[list[str]], Any], module_name: str) -> None:
  """absl `app.run(main)` for a console script, with everything this module does."""
  show_flags_in_help(module_name)
  main_started = False

  def guarded_main(argv: list[str]) -> int:
    nonlocal main_started
    main_started = True
    quiet_library_info()
    return call(lambda: main(argv), verbose=flags.FLAGS[VERBOSE_FLAG].value)

  argv = list(sys.argv)
  try:
    app.run(guarded_main)
  except Exception as e:  # pylint: disable=broad-except
    # Before main: raised while parsing flags (absl reports its own flag errors), i.e. a
    # --config.* override that does not fit the config.
    if main_started or f"--{VERBOSE_FLAG}" in argv:
      raise
    print(_flag_error_line(e, argv), file=sys.stderr, flush=True)
    sys.exit(1)
