"""Every absl command lists its own flags under --help when run as a console script."""

import subprocess
import sys

import pytest

_EXPECTED = {
    "train": "--workdir", "sample": "--num_tokens", "evaluate": "--generated",
    "export": "--dtype", "build_data": "--manual_dir", "demo": "--sample_tokens",
    "score": "--compare",
}


@pytest.mark.parametrize("name", sorted(_EXPECTED))
def test_help_lists_the_commands_flags(name):
  # argv[0] is the console script's path, as when `perceivers-NAME --help` runs.
  code = (f"import sys; sys.argv = ['/usr/bin/perceivers-{name}', '--help']; "
          f"from perceivers_jax.cli import {name}; {name}.run()")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert _EXPECTED[name] in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
