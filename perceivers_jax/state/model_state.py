"""Model state: the PerceiverS of a config, its abstract parameters and shardings, and restoring.

Every user of parameters starts here: training (the Trainer's model, fine-tuning's
config.train.init_from), sampling (no optimizer is built), export and parameter groups.

  build(config, mesh)        the model of `config` laid out on `mesh` before any array exists
                             (nnx.eval_shape): its parameters as ShapeDtypeStructs carrying
                             their NamedShardings (logical-axis rules config.logical_axis_rules,
                             `parallel/partitioning`), the non-parameter state (RNG streams,
                             replicated), jitted creation straight into those shardings, and
                             `merge` (params + rest -> a model);
  restore_params(...)        only the parameters of training checkpoint workdir/checkpoints/STEP
                             (partial restore: the optimizer state is never read);
  load_exported(...)         the parameters of a `perceivers-export` directory in either format;
  load_params(...)           config.train.init_from: an export or a training workdir.
Everything restored lands in the shardings and dtypes of the abstract parameters it is given.

Parameters are a pure dict (the model's nnx.Param values), as in the training state.

An export directory (written by `state/export.py`) holds `params/` (Orbax, the pure params
dict) or `params.safetensors` (flat names of `model/param_groups.py`), `config.json` and
`manifest.json` (format: FORMATS, step, dtype, sha256 of config.json and of every parameter
file, ...); loading checks both before reading any parameter.
"""

import dataclasses
import hashlib
import json
import math
import os
from typing import Any, Callable

from absl import logging
from etils import epath
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
import orbax.checkpoint as ocp
import safetensors.numpy

from perceivers_jax.model import attention
from perceivers_jax.model import param_groups
from perceivers_jax.model import perceivers as model_lib
from perceivers_jax.parallel import mesh as mesh_lib
from perceivers_jax.parallel import partitioning
from perceivers_jax.state import checkpointing

FORMAT = "perceivers-jax-params-v1"  # the Orbax format; the name predates safetensors.
SAFETENSORS_FORMAT = "perceivers-jax-safetensors-v1"
FORMATS = {"orbax": FORMAT, "safetensors": SAFETENSORS_FORMAT}  # --format -> manifest format
PARAMS_PATHS = {FORMAT: "params", SAFETENSORS_FORMAT: "params.safetensors"}
MANIFEST = "manifest.json"
CONFIG_FILE = "config.json"


# -- the model and its layout --------------------------------------------------------------------


def windows_are_left_padded(config: ml_collections.ConfigDict) -> bool:
  """Whether the input pipeline pads training/evaluation windows on the left
  (config.data.padding_side): the model's forwards over them then have slot masks."""
  return config.data.padding_side == "left"


def model_fn(config: ml_collections.ConfigDict, *, left_padded_windows: bool = False,
             backend: str | None = None) -> Callable[[], model_lib.PerceiverS]:
  """Builds the model of `config`, initialised from config.seed (`left_padded_windows`: its
  forwards only see the input pipeline's left-padded windows; `backend`: the platform it
  runs on; see `PerceiverS`)."""
  return lambda: model_lib.PerceiverS(config.model, rngs=nnx.Rngs(config.seed),
                                      left_padded_windows=left_padded_windows, backend=backend)


def split(model: model_lib.PerceiverS) -> tuple[Any, nnx.State]:
  """(parameters as a pure dict, the non-parameter state: RNG streams) of `model`."""
  _, params, rest = nnx.split(model, nnx.Param, ...)
  return nnx.to_pure_dict(params), rest


def param_shapes(model_config: ml_collections.ConfigDict) -> Any:
  """ShapeDtypeStructs of the parameters `model_config` builds (nothing allocated, no mesh)."""
  model = nnx.eval_shape(lambda: model_lib.PerceiverS(model_config, rngs=nnx.Rngs(0)))
  return split(model)[0]


def count_params(params: Any) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


@dataclasses.dataclass(frozen=True)
class ModelState:
  """The model of `config` on `mesh`, before any array exists (from `build`)."""
  config: ml_collections.ConfigDict
  mesh: Mesh
  graphdef: nnx.GraphDef
  param_template: nnx.State  # the abstract nnx.Param state that `merge` fills in.
  abstract_params: Any  # pure dict of ShapeDtypeStructs carrying the target shardings.
  abstract_rest: nnx.State  # RNG streams as ShapeDtypeStructs, replicated.
  param_shardings: Any
  rest_shardings: nnx.State
  init: Callable[[], tuple[Any, nnx.State]]  # jitted: config.seed's (params, rest), sharded.
  init_rest: Callable[[], nnx.State]  # jitted: the RNG streams alone.

  @property
  def num_params(self) -> int:
    return count_params(self.abstract_params)

  def abstract_params_in(self, dtype: str) -> Any:
    """`abstract_params` with every parameter in `dtype` (e.g. an export's)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype),
                                                       sharding=a.sharding), self.abstract_params)

  def merge(self, params: Any, rest: nnx.State) -> model_lib.PerceiverS:
    """The model holding `params` (a pure dict) and `rest`; also inside jit."""
    param_state = jax.tree.map(lambda x: x, self.param_template)  # fresh Variables to fill in.
    nnx.replace_by_pure_dict(param_state, params)
    # Fresh Variables at the current trace level (NNX refuses ones created under another trace).
    return nnx.merge(self.graphdef, param_state, jax.tree.map(lambda x: x, rest))


def build(config: ml_collections.ConfigDict, mesh: Mesh, *,
          left_padded_windows: bool = False) -> ModelState:
  """The model of `config` laid out on `mesh` (rules: config.logical_axis_rules), its
  kernels chosen for the platform of the mesh's devices; `left_padded_windows` as in
  `model_fn`."""
  create = model_fn(config, left_padded_windows=left_padded_windows,
                    backend=mesh_lib.platform(mesh))
  graphdef, param_template, rest = nnx.split(nnx.eval_shape(create), nnx.Param, ...)
  param_shardings = nnx.to_pure_dict(
      partitioning.state_shardings(param_template, mesh, tuple(config.logical_axis_rules)))
  replicated = NamedSharding(mesh, PartitionSpec())
  rest_shardings = jax.tree.map(lambda _: replicated, rest)
  with_sharding = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  return ModelState(
      config=config, mesh=mesh, graphdef=graphdef, param_template=param_template,
      abstract_params=jax.tree.map(with_sharding, nnx.to_pure_dict(param_template),
                                   param_shardings),
      abstract_rest=jax.tree.map(with_sharding, rest, rest_shardings),
      param_shardings=param_shardings, rest_shardings=rest_shardings,
      init=jax.jit(lambda: split(create()), out_shardings=(param_shardings, rest_shardings)),
      init_rest=jax.jit(lambda: split(create())[1], out_shardings=rest_shardings))


def build_local(config: ml_collections.ConfigDict) -> ModelState:
  """`build` on a data-only mesh over every device (parameters replicated)."""
  return build(config, mesh_lib.data_mesh())


# -- training checkpoints ------------------------------------------------------------------------


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


def load_config(path: epath.PathLike, attention_impl: str | None = None
                ) -> ml_collections.ConfigDict:
  """A config.json written by training or export, with its tuples restored.

  `attention_impl` (if given) replaces model.attention_impl: the kernel is chosen where the
  model runs, not stored with its parameters (which are the same for every kernel). Model
  fields a file predates get the behaviour of the code that wrote it
  (`_MODEL_FIELDS_BEFORE_THEY_EXISTED`), with a warning.
  """
  check_attention_impl(attention_impl)
  config = ml_collections.ConfigDict(json.loads(epath.Path(path).read_text()))
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


def saved_step(workdir: str, config: ml_collections.ConfigDict, step: int | None = None) -> int:
  """`step` (default: the latest) after checking that `workdir` holds that checkpoint."""
  directory = checkpointing.checkpoint_dir(workdir)
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


def restore_params(workdir: str, step: int, abstract_params: Any) -> Any:
  """Only the parameters of training checkpoint `step` of `workdir` (partial restore: the
  optimizer state is never read), in the shardings/dtypes of `abstract_params`."""
  state_dir = epath.Path(checkpointing.checkpoint_dir(workdir)) / str(step) / checkpointing.STATE
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


def load_exported(export_dir: str, abstract_params: Any = None,
                  ) -> tuple[ml_collections.ConfigDict, Any, dict[str, Any]]:
  """(config, params, manifest) of an export in either format.

  Params are replicated over this process's devices in the exported dtype, or, given
  `abstract_params` (ShapeDtypeStructs with shardings, e.g. `build(...).abstract_params`),
  cast and sharded as those after checking that the shapes agree (`check_compatible`).
  Checks config.json and every parameter file against the manifest's sha256s first.
  """
  path = epath.Path(export_dir)
  manifest = json.loads((path / MANIFEST).read_text())
  file_format = manifest.get("format")
  if file_format not in PARAMS_PATHS:
    raise ValueError(f"{path / MANIFEST}: format {file_format!r}, expected one of "
                     f"{tuple(PARAMS_PATHS)}.")
  config_text = (path / CONFIG_FILE).read_text()
  if hashlib.sha256(config_text.encode()).hexdigest() != manifest["config_sha256"]:
    raise ValueError(f"{path / CONFIG_FILE} does not match the sha256 in manifest.json.")
  _check_params_sha256(path, manifest)
  config = load_config(path / CONFIG_FILE)
  if abstract_params is None:
    target = build_local(config).abstract_params_in(manifest["dtype"])
  else:
    check_compatible(param_shapes(config.model), abstract_params, str(path))
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
  config = load_config(path / CONFIG_FILE)
  directory = checkpointing.checkpoint_dir(source)
  ckpt = checkpointing.Checkpointer(directory, config.checkpoint, with_data_iter=False)
  step = ckpt.latest_step()
  ckpt.close()
  if step is None:
    raise FileNotFoundError(f"config.train.init_from={source!r}: no checkpoint under "
                            f"{directory}.")
  check_compatible(param_shapes(config.model), abstract_params, source)
  return restore_params(source, step, abstract_params), f"workdir {source} (step {step})"
