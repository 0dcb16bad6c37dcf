r"""perceivers-sample: generate MIDI pieces from a trained PerceiverS.

  perceivers-sample --workdir=/tmp/tiny --output_dir=/tmp/samples --num_samples=8 \
      --batch_size=4 --num_tokens=2048 --top_p=0.95
  perceivers-sample --workdir=/tmp/tiny --output_dir=/tmp/cont --primer=piece.mid \
      --primer_seconds=10 --num_tokens=1024
  perceivers-sample --checkpoint=/tmp/tiny/checkpoints/400 --output_dir=/tmp/again \
      --num_samples=8 --batch_size=4 --num_tokens=2048 --top_p=0.95 --sample_index=5

The model config comes from the workdir's config.json; --attention_impl (default auto: the
best kernel for this backend) replaces its model.attention_impl. Each sample i writes sample_{i:04d}.mid,
.npy (tokens), .png (piano roll) and .json (its seed, settings, checkpoint and the command
regenerating it alone: the same flags plus --sample_index=i give the same tokens);
samples.jsonl lists them all and index.html is the folder's listening page.
Rerunning the same command completes a killed run (samples already written are skipped).
--profile_steps=2 writes a profiler trace of the second batch to OUTPUT_DIR/profile.
Multi-host: run the same command on every host (TPU pods, SLURM and Open MPI are detected;
otherwise pass --coordinator_address, --num_processes and --process_id, or the JAX_*
environment variables); --batch_size is the global batch and --output_dir must be a directory
every host sees.
"""

import dataclasses
import typing

from absl import app
from absl import flags

from perceivers_jax.cli import distributed
from perceivers_jax.cli import logs
from perceivers_jax.model import attention
from perceivers_jax.runtime import traces
from perceivers_jax.sampling import sampling

flags.adopt_module_key_flags(distributed)  # --help lists the multi-host flags.

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json, checkpoints/).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Instead of --workdir: a workdir's checkpoints/STEP folder or a "
    "perceivers-export directory (manifest.json).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the samples go (all hosts).")
_SAMPLE_INDEX = flags.DEFINE_multi_integer(
    "sample_index", [], "Generate only these samples (repeatable); same other flags as the "
    "original run reproduce them exactly.")
_PROFILE_STEPS = flags.DEFINE_multi_integer(
    "profile_steps", [], "Write a profiler trace of these batches of this run (repeatable; 1 = "
    "the first, which compiles and is not traced) to OUTPUT_DIR/profile, for TensorBoard or "
    "XProf.")
_ATTENTION_IMPL = flags.DEFINE_enum(
    "attention_impl", "auto", attention.ATTENTION_IMPLS,
    "Attention kernel, replacing config.json's model.attention_impl (auto: chosen per backend).")


def _define_setting_flag(field: dataclasses.Field) -> flags.FlagHolder:
  """The flag of one `SampleSettings` field: its name, default, type and help."""
  kind = next(t for t in typing.get_args(field.type) or (field.type,) if t is not type(None))
  define = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string,
            bool: flags.DEFINE_bool}[kind]
  return define(field.name, field.default, field.metadata["help"])


_SETTINGS = [_define_setting_flag(f) for f in sampling.SampleSettings.flag_fields()]


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if (_WORKDIR.value is None) == (_CHECKPOINT.value is None):
    raise app.UsageError("Pass exactly one of --workdir=DIR and --checkpoint=DIR.")
  if not _OUTPUT_DIR.value:
    raise app.UsageError("--output_dir is required.")
  distributed.initialize()  # Before anything touches a jax backend.

  path = _WORKDIR.value or _CHECKPOINT.value
  indices = _SAMPLE_INDEX.value or None
  try:
    settings = sampling.SampleSettings.from_flag_values({f.name: f.value for f in _SETTINGS})
    workdir, step = sampling.resolve_path(path, _STEP.value)
    config = sampling.read_config(workdir, _ATTENTION_IMPL.value)
    # Every request error surfaces here, the same on every host, before anything is restored
    # or compiled.
    sampling.check_settings(settings, config.model, indices)
    traces.check_steps(_PROFILE_STEPS.value, "--profile_steps")
    model, config, step = sampling.load_model(workdir, step,
                                              attention_impl=_ATTENTION_IMPL.value)
    sampling.sample_to_dir(model, config, settings, _OUTPUT_DIR.value, checkpoint_step=step,
                           checkpoint_path=workdir, sample_indices=indices,
                           profile_steps=_PROFILE_STEPS.value)
  except (FileNotFoundError, sampling.SamplingError) as e:
    raise app.UsageError(str(e)) from e


def run() -> None:
  """Console-script entry point (`perceivers-sample`)."""
  logs.run(main, __name__)


if __name__ == "__main__":
  run()
