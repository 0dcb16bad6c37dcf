"""Params-only export of a training checkpoint, restorable on any number of devices.

An export directory holds
  params/ or     the parameters only (no optimizer state, no data iterator), cast to the
  params.safetensors
                 export dtype: `--format=orbax` (default) writes an Orbax checkpoint of the
                 pure params dict, as in training checkpoints; `--format=safetensors` writes
                 one safetensors file with flat names (below) for use outside this package;
  config.json    the training config, its model.attention_impl set to the export's
                 `attention_impl` (default "auto": the kernel is a runtime choice, so an
                 export is backend-neutral; the text is kept verbatim when it already says so);
  manifest.json  format (FORMATS: which of the two), step, parameter count, dtype, source
                 workdir, sha256 of config.json, the sha256 of every parameter file
                 (params_sha256, by path inside the export) and the config itself.
An export is written whole into a temporary sibling folder (`.NAME.export-tmp`) and renamed to
`output` when complete, so a crash never leaves a partial export; an existing `output` is an
error unless `overwrite`, which replaces the whole folder (never mixing two exports). Loading
checks config.json and every parameter file against the manifest.
Only the parameters are read from the training checkpoint (partial restore), straight into
the target devices' shardings, so exporting never loads the optimizer state. `load_exported`
reads either format back, into this process's devices or into any given shardings (as
fine-tuning's config.train.init_from does, through `load_params`).

Safetensors names are the flat dotted names of perceivers_jax/param_groups.py, e.g.
`embed.embedding` [V, D], `cross_layers.0.attention.query_kernel` [D, H, K] (one cross layer
per attention scale, in config.model.cross_attention_scales order), `head.kernel` [D, V].
Scanned latent layers (config.model.scan_layers=True) keep their leading `layers` axis:
`latent_layers.mlp.wi.kernel` is [S, D, F] for S = config.model.num_latent_layers; without
scanning they are `latent_layers.0.mlp.wi.kernel`, ... The file's metadata repeats the
manifest's format, step and dtype; bfloat16 tensors are stored as safetensors BF16.
"""

import hashlib
import json
import os
from typing import Any

from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy

from perceivers_jax.model import attention
from perceivers_jax.model import param_groups
from perceivers_jax.parallel import mesh as mesh_lib
from perceivers_jax.state import checkpointing
from perceivers_jax.training import train

FORMAT = "perceivers-jax-params-v1"  # the Orbax format; the name predates safetensors.
SAFETENSORS_FORMAT = "perceivers-jax-safetensors-v1"
FORMATS = {"orbax": FORMAT, "safetensors": SAFETENSORS_FORMAT}  # --format -> manifest format
PARAMS_PATHS = {FORMAT: "params", SAFETENSORS_FORMAT: "params.safetensors"}
MANIFEST = "manifest.json"
DTYPES = ("float32", "bfloat16")


def check_attention_impl(attention_impl: str | None) -> None:
  """Raises ValueError naming --attention_impl unless it is None or in ATTENTION_IMPLS."""
  if attention_impl is not None and attention_impl not in attention.ATTENTION_IMPLS:
    raise ValueError(f"--attention_impl={attention_impl!r}: use one of "
                     f"{attention.ATTENTION_IMPLS}.")


def load_config(path: epath.PathLike, attention_impl: str | None = None
                ) -> ml_collections.ConfigDict:
  """A config.json written by training or export, with its tuples restored.

  `attention_impl` (if given) replaces model.attention_impl: the kernel is chosen where the
  model runs, not stored with its parameters (which are the same for every kernel).
  """
  check_attention_impl(attention_impl)
  config = ml_collections.ConfigDict(json.loads(epath.Path(path).read_text()))
  if attention_impl is not None:
    config.model.attention_impl = attention_impl
  config.model.cross_attention_scales = tuple(config.model.cross_attention_scales)
  if "freeze" in config.train:
    config.train.freeze = tuple(config.train.freeze)
  config.logical_axis_rules = tuple(
      (name, tuple(axes) if isinstance(axes, list) else axes)
      for name, axes in config.logical_axis_rules)
  return config


def for_local_devices(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with a mesh over whatever devices this process has (data-parallel, FSDP 1)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
  config.train.batch_size = config.eval.batch_size = jax.device_count()
  config.train.microbatches = 1
  return config


def _abstract_params(config: ml_collections.ConfigDict, dtype: str) -> Any:
  """Parameter shapes in `dtype`, replicated over this process's devices."""
  local = for_local_devices(config)
  params = train.build_trainer(local, mesh_lib.make_mesh(local.mesh)).abstract_state["params"]
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype),
                                                     sharding=a.sharding), params)


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


def restore_params(workdir: str, step: int, abstract_params: Any) -> Any:
  """Only the parameters of training checkpoint `step` of `workdir` (partial restore: the
  optimizer state is never read), in the shardings/dtypes of `abstract_params`."""
  state_dir = epath.Path(train.checkpoint_dir(workdir)) / str(step) / checkpointing.STATE
  target = {"params": abstract_params}
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
  return restored["params"]


def _write_safetensors(path: epath.Path, params: Any, metadata: dict[str, str]) -> None:
  # Replicated arrays: np.asarray reads this process's copy, also on multi-host jobs.
  arrays = {name: np.asarray(leaf) for name, leaf in param_groups.flatten(params).items()}
  if jax.process_index() == 0:
    safetensors.numpy.save_file(arrays, os.fspath(path), metadata=metadata)


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


def saved_step(workdir: str, config: ml_collections.ConfigDict, step: int | None = None) -> int:
  """`step` (default: the latest) after checking that `workdir` holds that checkpoint."""
  directory = train.checkpoint_dir(workdir)
  if not epath.Path(directory).exists():
    raise FileNotFoundError(f"{workdir}: no checkpoints/ folder; train first.")
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


def _file_sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      digest.update(chunk)
  return digest.hexdigest()


def params_sha256(export_dir: epath.Path, params_name: str) -> dict[str, str]:
  """sha256 of every file of the parameters `export_dir / params_name` (one safetensors file or
  an Orbax folder), by path relative to `export_dir`."""
  def files(path: epath.Path):  # epath has no recursive glob on every backend.
    if path.is_file():
      yield path
    elif path.is_dir():
      for child in path.iterdir():
        yield from files(child)

  return {os.fspath(p.relative_to(export_dir)): _file_sha256(p)
          for p in sorted(files(export_dir / params_name))}


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _with_attention_impl(config_text: str, attention_impl: str) -> str:
  """`config_text` (a training config.json) saying model.attention_impl=`attention_impl`."""
  config = json.loads(config_text)
  if config["model"].get("attention_impl") == attention_impl:
    return config_text
  config["model"]["attention_impl"] = attention_impl
  return json.dumps(config, indent=2, sort_keys=True)


def export(workdir: str, output: str, *, step: int | None = None, dtype: str = "float32",
           file_format: str = "orbax", overwrite: bool = False,
           attention_impl: str = "auto") -> dict[str, Any]:
  """Writes the params of checkpoint `step` (default: latest) of `workdir` to `output`.

  `file_format`: "orbax" or "safetensors" (FORMATS). `output` must not exist unless
  `overwrite`, which replaces it once the new export is complete. The export's config.json
  records `attention_impl` as model.attention_impl. Returns the manifest.
  Raises FileNotFoundError / FileExistsError / ValueError naming what is wrong.
  """
  if dtype not in DTYPES:
    raise ValueError(f"--dtype={dtype!r}: use one of {DTYPES}.")
  if file_format not in FORMATS:
    raise ValueError(f"--format={file_format!r}: use one of {tuple(FORMATS)}.")
  check_attention_impl(attention_impl)
  config_path = epath.Path(workdir) / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{config_path} not found: --workdir must be a training workdir.")
  out = epath.Path(output)
  if out.exists() and not overwrite:
    raise FileExistsError(f"--output={output} exists: choose a new directory, or pass "
                          "--overwrite to replace it.")
  config_text = _with_attention_impl(config_path.read_text(), attention_impl)
  config = load_config(config_path, attention_impl)
  step = saved_step(workdir, config, step)

  params = restore_params(workdir, step, _abstract_params(config, dtype))
  # Every host computes the same folder name (Orbax writes collectively into it).
  tmp = out.parent / f".{out.name}.export-tmp"
  if jax.process_index() == 0:
    if tmp.exists():  # left by an export that was killed.
      tmp.rmtree()
    tmp.mkdir(parents=True)
  _sync("export-tmp-ready")
  params_name = PARAMS_PATHS[FORMATS[file_format]]
  manifest = {
      "format": FORMATS[file_format],
      "step": int(step),
      "num_params": train.count_params(params),
      "dtype": dtype,
      "source_workdir": workdir if "://" in workdir else os.path.abspath(workdir),
      "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
      "config": json.loads(config_text),
  }
  if file_format == "orbax":
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(tmp / params_name, params)
  else:
    _write_safetensors(tmp / params_name, params, {k: str(manifest[k]) for k in (
        "format", "step", "dtype", "config_sha256")})
  _sync("export-params-written")
  if jax.process_index() == 0:
    manifest["params_sha256"] = params_sha256(tmp, params_name)
    (tmp / "config.json").write_text(config_text)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    old = out.parent / f".{out.name}.export-old"
    if out.exists():  # overwrite: the old export goes only once the new one is complete.
      if old.exists():
        old.rmtree()
      out.rename(old)
    tmp.rename(out)
    if old.exists():
      old.rmtree()
  _sync("export-renamed")
  return manifest


def load_exported(export_dir: str, abstract_params: Any = None,
                  ) -> tuple[ml_collections.ConfigDict, Any, dict[str, Any]]:
  """(config, params, manifest) of an export in either format.

  Params are replicated over this process's devices in the exported dtype, or, given
  `abstract_params` (ShapeDtypeStructs with shardings, e.g. a Trainer's), cast and sharded
  as those after checking that the shapes agree (`check_compatible`). Checks that
  config.json still matches the manifest's sha256.
  """
  path = epath.Path(export_dir)
  manifest = json.loads((path / MANIFEST).read_text())
  file_format = manifest.get("format")
  if file_format not in PARAMS_PATHS:
    raise ValueError(f"{path / MANIFEST}: format {file_format!r}, expected one of "
                     f"{tuple(PARAMS_PATHS)}.")
  config_text = (path / "config.json").read_text()
  if hashlib.sha256(config_text.encode()).hexdigest() != manifest["config_sha256"]:
    raise ValueError(f"{path / 'config.json'} does not match the sha256 in manifest.json.")
  _check_params_sha256(path, manifest)
  config = load_config(path / "config.json")
  if abstract_params is None:
    target = _abstract_params(config, manifest["dtype"])
  else:
    check_compatible(param_groups.abstract_params(config.model), abstract_params, str(path))
    target = abstract_params
  params_path = path / PARAMS_PATHS[file_format]
  if file_format == SAFETENSORS_FORMAT:
    params = _read_safetensors(params_path, target)
  else:
    with ocp.StandardCheckpointer() as checkpointer:
      params = checkpointer.restore(params_path, target)
  return config, params, manifest


def _check_params_sha256(path: epath.Path, manifest: dict[str, Any]) -> None:
  """Raises ValueError naming the first parameter file that is missing, extra or changed."""
  fix = "export again (perceivers-export ... --overwrite)."
  if "params_sha256" not in manifest:
    raise ValueError(f"{path / MANIFEST} has no params_sha256 (an export from before files were "
                     f"hashed): {fix}")
  want = manifest["params_sha256"]
  have = params_sha256(path, PARAMS_PATHS[manifest["format"]])
  for name in sorted(set(want) | set(have)):
    if name not in have:
      raise ValueError(f"{path / name} is missing, though manifest.json lists it: {fix}")
    if name not in want:
      raise ValueError(f"{path / name} is not in manifest.json (a changed export): {fix}")
    if have[name] != want[name]:
      raise ValueError(f"{path / name} does not match its sha256 in manifest.json: {fix}")


def load_params(source: str, abstract_params: Any) -> tuple[Any, str]:
  """(params, description) for config.train.init_from=`source`: an export directory (either
  format) or a training workdir (its latest checkpoint's parameters only), cast and sharded as
  `abstract_params`. Raises ValueError naming the first parameter whose shape differs."""
  path = epath.Path(source)
  if (path / MANIFEST).exists():
    _, params, manifest = load_exported(source, abstract_params)
    return params, f"export {source} (step {manifest['step']}, {manifest['dtype']})"
  if not (path / "config.json").exists():
    raise FileNotFoundError(f"config.train.init_from={source!r}: neither a perceivers-export "
                            f"directory ({MANIFEST}) nor a training workdir (config.json).")
  config = load_config(path / "config.json")
  ckpt = checkpointing.Checkpointer(train.checkpoint_dir(source), config.checkpoint,
                                    with_data_iter=False)
  step = ckpt.latest_step()
  ckpt.close()
  if step is None:
    raise FileNotFoundError(f"config.train.init_from={source!r}: no checkpoint under "
                            f"{train.checkpoint_dir(source)}.")
  check_compatible(param_groups.abstract_params(config.model), abstract_params, source)
  return restore_params(source, step, abstract_params), f"workdir {source} (step {step})"
