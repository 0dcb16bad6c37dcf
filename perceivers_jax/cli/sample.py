r"""perceivers-sample: generate MIDI pieces from a trained PerceiverS.

  perceivers-sample --workdir=/tmp/tiny --output_dir=/tmp/samples --num_samples=8 \
      --batch_size=4 --num_tokens=2048 --top_p=0.95
  perceivers-sample --workdir=/tmp/tiny --output_dir=/tmp/cont --primer=piece.mid \
      --primer_seconds=10 --num_tokens=1024
  perceivers-sample --checkpoint=/tmp/tiny/checkpoints/400 --output_dir=/tmp/again \
      --num_samples=8 --batch_size=4 --num_tokens=2048 --top_p=0.95 --sample_index=5
  perceivers-sample --config=perceivers_jax/configs/perceivers.py --dry_run \
      --compile_topology=v5p-8 \
      --batch_size=16 --num_tokens=8192     # the decode loop compiled for a TPU slice

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
every host sees. --dry_run compiles the decode loop instead (on this host's devices, or with
--compile_topology for a TPU slice) and prints one JSON line of its memory, collectives and
kernels; the model config then may also come from --config.
"""

import dataclasses
import typing

from absl import app
from absl import flags
from ml_collections import config_flags

from perceivers_jax.cli import compile_target
from perceivers_jax.cli import distributed
from perceivers_jax.cli import logs
from perceivers_jax.model import attention
from perceivers_jax.parallel import compiled
from perceivers_jax.runtime import traces
from perceivers_jax.sampling import sampling
from perceivers_jax.state import run_dir

flags.adopt_module_key_flags(distributed)  # --help lists the multi-host flags,
flags.adopt_module_key_flags(compile_target)  # and the compile-target ones.

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
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Compile the decode loop and print one JSON line of its memory, "
    "collectives and kernels; nothing is restored or sampled.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "With --dry_run, instead of --workdir/--checkpoint: an experiment config "
    "file (perceivers_jax/configs/*.py).", lock_config=True)
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
  if _DRY_RUN.value:
    _dry_run()
    return
  if compile_target.COMPILE_TOPOLOGY.value or _CONFIG.value:
    raise app.UsageError("--compile_topology and --config need --dry_run.")
  if (_WORKDIR.value is None) == (_CHECKPOINT.value is None):
    raise app.UsageError("Pass exactly one of --workdir=DIR and --checkpoint=DIR.")
  if not _OUTPUT_DIR.value:
    raise app.UsageError("--output_dir is required.")
  distributed.initialize()  # Before anything touches a jax backend.

  path = _WORKDIR.value or _CHECKPOINT.value
  indices = _SAMPLE_INDEX.value or None
  try:
    settings = sampling.SampleSettings.from_flag_values({f.name: f.value for f in _SETTINGS})
    workdir, step = run_dir.resolve_path(path, _STEP.value)
    config = run_dir.read_config(workdir, _ATTENTION_IMPL.value)
    # Every request error surfaces here, the same on every host, before anything is restored
    # or compiled.
    sampling.check_settings(settings, config.model, indices)
    traces.check_steps(_PROFILE_STEPS.value, "--profile_steps")
    model, config, step = sampling.load_model(workdir, step,
                                              attention_impl=_ATTENTION_IMPL.value)
    sampling.sample_to_dir(model, config, settings, _OUTPUT_DIR.value, checkpoint_step=step,
                           checkpoint_path=workdir, sample_indices=indices,
                           profile_steps=_PROFILE_STEPS.value)
  except (FileNotFoundError, sampling.SamplingError, run_dir.RunDirError) as e:
    raise app.UsageError(str(e)) from e


def _dry_run() -> None:
  sources = [v for v in (_WORKDIR.value, _CHECKPOINT.value, _CONFIG.value) if v is not None]
  if len(sources) != 1:
    raise app.UsageError("--dry_run needs exactly one of --workdir, --checkpoint and --config.")
  compile_target.requested()  # Before anything touches a jax backend.
  from perceivers_jax.sampling import dry_run  # pylint: disable=g-import-not-at-top
  try:
    settings = sampling.SampleSettings.from_flag_values({f.name: f.value for f in _SETTINGS})
    if _CONFIG.value is not None:
      config = _CONFIG.value.copy_and_resolve_references()
      config.model.attention_impl = _ATTENTION_IMPL.value
    else:
      config = run_dir.read_config(run_dir.resolve_path(_WORKDIR.value or _CHECKPOINT.value)[0],
                                   _ATTENTION_IMPL.value)
    compiled.print_report(dry_run.dry_run(config, settings,
                                          compile_topology=compile_target.COMPILE_TOPOLOGY.value,
                                          num_slices=compile_target.NUM_SLICES.value))
  except (FileNotFoundError, sampling.SamplingError, run_dir.RunDirError) as e:
    raise app.UsageError(str(e)) from e


def run() -> None:
  """Console-script entry point (`perceivers-sample`)."""
  logs.run(main, __name__)


if __name__ == "__main__":
  run()
