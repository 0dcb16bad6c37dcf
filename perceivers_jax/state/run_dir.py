"""Reading run directories: the one place that knows how a training workdir and an export are laid
out on disk, for everything that loads a model (sampling, perceivers-score, --mode=eval,
fine-tuning's config.train.init_from, perceivers-export).

A path is one of
  a training workdir   config.json (the training config) and checkpoints/STEP (Orbax, written
                       by `state/checkpointing.py`: the train state and the data iterator);
  workdir/checkpoints/STEP
                       one of its checkpoints (`resolve_path` turns it into the workdir + STEP);
  an export            (written by `state/export.py`) params/ (Orbax, the pure params dict) or
                       params.safetensors (flat names of `model/param_groups.py`), config.json
                       and manifest.json (format: FORMATS, step, dtype, sha256 of config.json and
                       of every parameter file, ...); found by its manifest.json.

  resolve_path / read_config / checkpoint_step / restore_params
                       the steps of loading any of them: (directory, step), its config (old
                       files get the fields they predate filled in), the step to read, and only
                       the parameters of that step (a checkpoint's optimizer state is never
                       read; an export's files are checked against its sha256s first);
  load_exported        an export's config, parameters and manifest;
  load_params          config.train.init_from: an export or a training workdir.
Everything restored lands in the shardings and dtypes of the abstract parameters it is given.
"""

import hashlib
import json
import os
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp
import safetensors.numpy

from perceivers_jax import config_base
from perceivers_jax.model import attention
from perceivers_jax.model import param_groups
from perceivers_jax.state import checkpointing
from perceivers_jax.state import model_state

FORMAT = "perceivers-jax-params-v1"  # the Orbax format; the name predates safetensors.
SAFETENSORS_FORMAT = "perceivers-jax-safetensors-v1"
FORMATS = {"orbax": FORMAT, "safetensors": SAFETENSORS_FORMAT}  # --format -> manifest format
PARAMS_PATHS = {FORMAT: "params", SAFETENSORS_FORMAT: "params.safetensors"}
MANIFEST = "manifest.json"  # marks an export.
CONFIG_FILE = "config.json"


class RunDirError(config_base.InputError, ValueError):
  """A run directory or export that cannot be read as asked; the message names the path or flag
  and the fix."""


# -- the config ----------------------------------------------------------------------------------


def check_attention_impl(attention_impl: str | None) -> None:
  """Raises ValueError naming --attention_impl unless it is None or in ATTENTION_IMPLS."""
  if attention_impl is not None and attention_impl not in attention.ATTENTION_IMPLS:
    raise ValueError(f"--attention_impl={attention_impl!r}: use one of "
                     f"{attention.ATTENTION_IMPLS}.")


# Model fields added after config.json files were first written, with the behaviour of the
# code before each existed, so that such a file keeps computing what it computed then.
_MODEL_FIELDS_BEFORE_THEY_EXISTED = dict(
    layer_norm_epsilon=1e-6,  # flax's default, before Perceiver AR's 1e-5 became config
    embedding_init="normal_0.02",
    windowed_scales=False,  # masked full sliding scales: the same numbers, more work
)


def _fill_missing_model_fields(config: ml_collections.ConfigDict, path) -> None:
  missing = {name: value for name, value in _MODEL_FIELDS_BEFORE_THEY_EXISTED.items()
             if name not in config.model}
  if missing:
    logging.warning("%s predates config.model fields %s: using what the code that wrote it "
                    "did (%s).", path, ", ".join(missing),
                    ", ".join(f"{k}={v}" for k, v in missing.items()))
    config.model.update(missing)


def _parse_config(path: epath.Path, attention_impl: str | None) -> ml_collections.ConfigDict:
  check_attention_impl(attention_impl)
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  _fill_missing_model_fields(config, path)
  if attention_impl is not None:
    config.model.attention_impl = attention_impl
  config.model.cross_attention_scales = tuple(config.model.cross_attention_scales)
  if "freeze" in config.train:
    config.train.freeze = tuple(config.train.freeze)
  config.logical_axis_rules = tuple(
      (name, tuple(axes) if isinstance(axes, list) else axes)
      for name, axes in config.logical_axis_rules)
  return config


def read_config(directory: epath.PathLike,
                attention_impl: str | None = None) -> ml_collections.ConfigDict:
  """The config.json of `directory` (a training workdir or an export), its tuples restored.

  `attention_impl` (if given) replaces model.attention_impl: the kernel is chosen where the
  model runs, not stored with its parameters (which are the same for every kernel). Model
  fields a file predates get the behaviour of the code that wrote it
  (`_MODEL_FIELDS_BEFORE_THEY_EXISTED`), with a warning. FileNotFoundError without a
  config.json, RunDirError for an unreadable one or a bad `attention_impl`.
  """
  path = epath.Path(directory) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"--checkpoint/--workdir {directory}: no {CONFIG_FILE} there; pass "
                            "a training workdir, one of its checkpoints/STEP folders or an "
                            "export.")
  try:
    return _parse_config(path, attention_impl)
  except ValueError as e:
    raise RunDirError(str(e)) from e


# -- which directory, which step -----------------------------------------------------------------


def resolve_path(path: str, step: int | None = None) -> tuple[str, int | None]:
  """(directory holding config.json, step) for a workdir, a workdir/checkpoints/STEP path or an
  export."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--checkpoint/--workdir {path}: no such directory.")
  name, parent = os.path.basename(path), os.path.dirname(path)
  if (name.isdigit() and os.path.basename(parent) == checkpointing.CHECKPOINTS
      and not os.path.isfile(os.path.join(path, CONFIG_FILE))):
    if step is not None and step != int(name):
      raise RunDirError(f"--step={step} contradicts the checkpoint path {path}.")
    return os.path.dirname(parent), int(name)
  return path, step


def is_export(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, MANIFEST))


def saved_step(workdir: str, config: ml_collections.ConfigDict, step: int | None = None) -> int:
  """`step` (default: the latest) after checking that training `workdir` holds that
  checkpoint."""
  directory = checkpointing.checkpoint_dir(workdir)
  if not epath.Path(directory).exists():
    raise FileNotFoundError(f"{workdir}: no {checkpointing.CHECKPOINTS}/ folder; train first.")
  ckpt = checkpointing.Checkpointer(directory, config.checkpoint, with_data_iter=False)
  steps = ckpt.all_steps()
  ckpt.close()
  if not steps:
    raise FileNotFoundError(f"No checkpoint under {directory}: train first.")
  step = max(steps) if step is None else step
  if step not in steps:
    raise FileNotFoundError(
        f"--step={step} not among the saved steps {sorted(steps)} in {directory}.")
  return step


def _exported_step(directory: str, step: int | None) -> int:
  with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
    exported_step = int(json.load(f)["step"])
  if step is not None and step != exported_step:
    raise RunDirError(f"--step={step}: {directory} is an export of step {exported_step}.")
  return exported_step


def checkpoint_step(directory: str, config: ml_collections.ConfigDict, step: int | None) -> int:
  """The step `restore_params` reads from a `resolve_path` directory (default: the latest)."""
  if is_export(directory):
    return _exported_step(directory, step)
  return saved_step(directory, config, step)


# -- parameters ----------------------------------------------------------------------------------


def restore_params(directory: str, step: int, abstract_params: Any) -> Any:
  """The parameters (only) of checkpoint `step` of a `resolve_path` directory (a training
  workdir: partial restore, the optimizer state is never read; or an export), in the
  shardings and dtypes of `abstract_params`."""
  if is_export(directory):
    return load_exported(directory, abstract_params)[1]
  state_dir = (epath.Path(checkpointing.checkpoint_dir(directory)) / str(step)
               / checkpointing.STATE)
  target = {"params": abstract_params}
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
  return restored["params"]


def check_compatible(source_params: Any, target_params: Any, source: str) -> None:
  """Raises ValueError naming the first parameter whose shape differs between the parameters
  stored in `source` (abstract `source_params`) and this run's model (`target_params`)."""
  have, want = param_groups.flatten(source_params), param_groups.flatten(target_params)
  fix = ("fine-tuning needs the same parameter shapes: match config.model's vocab_size, "
         "embed_dim, num_heads, head_dim, mlp_ratio, num_latent_layers, scan_layers and the "
         "number of cross_attention_scales to the source's config.json.")
  for name, target in want.items():
    if name not in have:
      raise ValueError(f"{source} has no parameter {name!r}, which this model needs: {fix}")
    if tuple(have[name].shape) != tuple(target.shape):
      raise ValueError(f"Parameter {name!r} has shape {tuple(have[name].shape)} in {source} "
                       f"but {tuple(target.shape)} in this model: {fix}")
  extra = sorted(set(have) - set(want))
  if extra:
    raise ValueError(f"{source} has parameter {extra[0]!r}, which this model lacks: {fix}")


# -- exports -------------------------------------------------------------------------------------


def _read_safetensors(path: epath.Path, abstract_params: Any) -> Any:
  """The arrays of `path`, by flat name, cast and sharded as `abstract_params`."""
  arrays = safetensors.numpy.load_file(os.fspath(path))
  extra = sorted(set(arrays) - set(param_groups.flatten(abstract_params)))
  if extra:
    raise ValueError(f"{path} holds {extra[0]!r}, which this model has no parameter for.")

  def load(name, leaf):
    if name not in arrays:
      raise ValueError(f"{path} lacks parameter {name!r}.")
    array = arrays[name]
    if array.shape != tuple(leaf.shape):
      raise ValueError(f"{path}: {name!r} has shape {array.shape}, the model needs "
                       f"{tuple(leaf.shape)}.")
    array = array.astype(leaf.dtype, copy=False)
    return jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda index: array[index])

  return param_groups.map_with_names(load, abstract_params)


def _file_sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      digest.update(chunk)
  return digest.hexdigest()


def params_sha256(export_dir: epath.Path, params_name: str) -> dict[str, str]:
  """sha256 of every file of the parameters `export_dir / params_name` (one safetensors file or
  an Orbax folder), by path relative to `export_dir` (written to the manifest by export, checked
  here on loading)."""
  def files(path: epath.Path):  # epath has no recursive glob on every backend.
    if path.is_file():
      yield path
    elif path.is_dir():
      for child in path.iterdir():
        yield from files(child)

  return {os.fspath(p.relative_to(export_dir)): _file_sha256(p)
          for p in sorted(files(export_dir / params_name))}


def _check_params_sha256(path: epath.Path, manifest: dict[str, Any]) -> None:
  """Raises RunDirError naming the first parameter file that is missing, extra or changed."""
  fix = "export again (perceivers-export ... --overwrite)."
  if "params_sha256" not in manifest:
    raise RunDirError(f"{path / MANIFEST} has no params_sha256 (an export from before files "
                      f"were hashed): {fix}")
  want = manifest["params_sha256"]
  have = params_sha256(path, PARAMS_PATHS[manifest["format"]])
  for name in sorted(set(want) | set(have)):
    if name not in have:
      raise RunDirError(f"{path / name} is missing, though {MANIFEST} lists it: {fix}")
    if name not in want:
      raise RunDirError(f"{path / name} is not in {MANIFEST} (a changed export): {fix}")
    if have[name] != want[name]:
      raise RunDirError(f"{path / name} does not match its sha256 in {MANIFEST}: {fix}")


def check_export_files(export_dir: epath.PathLike) -> dict[str, Any]:
  """The manifest of the export in `export_dir`, after checking config.json and every parameter
  file against its sha256s; RunDirError naming the first file that differs, OSError for a
  missing manifest."""
  path = epath.Path(export_dir)
  manifest = json.loads((path / MANIFEST).read_text())
  file_format = manifest.get("format")
  if file_format not in PARAMS_PATHS:
    raise RunDirError(f"{path / MANIFEST}: format {file_format!r}, expected one of "
                      f"{tuple(PARAMS_PATHS)}.")
  config_text = (path / CONFIG_FILE).read_text()
  if hashlib.sha256(config_text.encode()).hexdigest() != manifest["config_sha256"]:
    raise RunDirError(f"{path / CONFIG_FILE} does not match the sha256 in {MANIFEST}.")
  _check_params_sha256(path, manifest)
  return manifest


def load_exported(export_dir: str, abstract_params: Any = None,
                  ) -> tuple[ml_collections.ConfigDict, Any, dict[str, Any]]:
  """(config, params, manifest) of an export in either format.

  Params are replicated over this process's devices in the exported dtype, or, given
  `abstract_params` (ShapeDtypeStructs with shardings, e.g. `build(...).abstract_params`),
  cast and sharded as those after checking that the shapes agree (`check_compatible`).
  Checks config.json and every parameter file against the manifest's sha256s first.
  """
  path = epath.Path(export_dir)
  manifest = check_export_files(path)
  file_format = manifest["format"]
  config = read_config(path)
  if abstract_params is None:
    target = model_state.build_local(config).abstract_params_in(manifest["dtype"])
  else:
    check_compatible(model_state.param_shapes(config.model), abstract_params, str(path))
    target = abstract_params
  params_path = path / PARAMS_PATHS[file_format]
  if file_format == SAFETENSORS_FORMAT:
    params = _read_safetensors(params_path, target)
  else:
    with ocp.StandardCheckpointer() as checkpointer:
      params = checkpointer.restore(params_path, target)
  return config, params, manifest


def load_params(source: str, abstract_params: Any) -> tuple[Any, str]:
  """(params, description) for config.train.init_from=`source`: an export directory (either
  format) or a training workdir (its latest checkpoint's parameters only), cast and sharded as
  `abstract_params`. Raises ValueError naming the first parameter whose shape differs."""
  path = epath.Path(source)
  if (path / MANIFEST).exists():
    _, params, manifest = load_exported(source, abstract_params)
    return params, f"export {source} (step {manifest['step']}, {manifest['dtype']})"
  if not (path / CONFIG_FILE).exists():
    raise FileNotFoundError(f"config.train.init_from={source!r}: neither a perceivers-export "
                            f"directory ({MANIFEST}) nor a training workdir ({CONFIG_FILE}).")
  config = read_config(path)
  directory = checkpointing.checkpoint_dir(source)
  ckpt = checkpointing.Checkpointer(directory, config.checkpoint, with_data_iter=False)
  step = ckpt.latest_step()
  ckpt.close()
  if step is None:
    raise FileNotFoundError(f"config.train.init_from={source!r}: no checkpoint under "
                            f"{directory}.")
  check_compatible(model_state.param_shapes(config.model), abstract_params, source)
  return restore_params(source, step, abstract_params), f"workdir {source} (step {step})"
