r"""perceivers-export: a training checkpoint -> params-only export (+ config and manifest).

  perceivers-export --workdir=/tmp/tiny --output=/tmp/tiny_export [--step=400] \
      [--dtype=bfloat16|float32] [--format=orbax|safetensors] [--overwrite] \
      [--attention_impl=auto|xla|cudnn|chunked]

`--format=orbax` (default) writes an Orbax checkpoint under params/; `--format=safetensors`
one params.safetensors file with flat names (listed in perceivers_jax/state/export.py) for use
outside this package. The export's config.json records --attention_impl (default auto: the
kernel is picked where the export runs) in place of the training config's. The export appears
whole or not at all (written to a temporary sibling folder, then renamed); an existing
--output is refused unless --overwrite replaces it once the new export is complete. After a
process killed mid-export, the next export to the same --output first puts the whole export
left on disk back in place (the new one, if it was complete). Either restores on any number of
devices (`perceivers_jax.state.run_dir.load_exported`), samples with
`perceivers-sample --checkpoint=DIR` and starts fine-tuning with `--config.train.init_from=DIR`.
"""

import json

from absl import app
from absl import flags

from perceivers_jax.cli import logs
from perceivers_jax.model import attention

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).",
                               required=True)
_OUTPUT = flags.DEFINE_string("output", None, "New directory for the export.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Replace an existing --output (once the new export is complete).")
_FORMAT = flags.DEFINE_enum("format", "orbax", ["orbax", "safetensors"],
                            "orbax: Orbax checkpoint params/; safetensors: params.safetensors.")
_ATTENTION_IMPL = flags.DEFINE_enum(
    "attention_impl", "auto", attention.ATTENTION_IMPLS,
    "Attention kernel the export's config.json records (auto: chosen where it runs).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from perceivers_jax.state import export  # pylint: disable=g-import-not-at-top
  manifest = export.export(_WORKDIR.value, _OUTPUT.value, step=_STEP.value, dtype=_DTYPE.value,
                           file_format=_FORMAT.value, overwrite=_OVERWRITE.value,
                           attention_impl=_ATTENTION_IMPL.value)
  summary = {k: manifest[k] for k in ("format", "step", "num_params", "dtype", "config_sha256")}
  print(json.dumps({"output": _OUTPUT.value, **summary}), flush=True)


def run() -> None:
  """Console-script entry point (`perceivers-export`)."""
  logs.run(main, __name__)


if __name__ == "__main__":
  run()
