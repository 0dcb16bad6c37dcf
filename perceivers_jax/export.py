"""Params-only export of a training checkpoint, restorable on any number of devices.

An export directory holds
  params/        Orbax checkpoint of the parameters only (pure dict, as in training
                 checkpoints), cast to the export dtype; no optimizer state, no data iterator;
  config.json    the training config;
  manifest.json  format, step, parameter count, dtype, source workdir, sha256 of config.json
                 and the config itself.
Only the parameters are read from the training checkpoint (partial restore), straight into
the target devices' shardings, so exporting never loads the optimizer state.
"""

import hashlib
import json
import os
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from perceivers_jax import checkpointing
from perceivers_jax import mesh as mesh_lib
from perceivers_jax import train

FORMAT = "perceivers-jax-params-v1"
DTYPES = ("float32", "bfloat16")


def load_config(path: epath.PathLike) -> ml_collections.ConfigDict:
  """A config.json written by training or export, with its tuples restored."""
  config = ml_collections.ConfigDict(json.loads(epath.Path(path).read_text()))
  config.model.cross_attention_scales = tuple(config.model.cross_attention_scales)
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


def export(workdir: str, output: str, *, step: int | None = None,
           dtype: str = "float32") -> dict[str, Any]:
  """Writes the params of checkpoint `step` (default: latest) of `workdir` to `output`.

  Returns the manifest. Raises FileNotFoundError / ValueError naming what is missing.
  """
  if dtype not in DTYPES:
    raise ValueError(f"--dtype={dtype!r}: use one of {DTYPES}.")
  config_path = epath.Path(workdir) / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{config_path} not found: --workdir must be a training workdir.")
  config_text = config_path.read_text()
  config = load_config(config_path)
  ckpt = checkpointing.Checkpointer(train.checkpoint_dir(workdir), config.checkpoint,
                                    with_data_iter=False)
  steps = ckpt.all_steps()
  ckpt.close()
  if not steps:
    raise FileNotFoundError(f"No checkpoint under {train.checkpoint_dir(workdir)}.")
  step = max(steps) if step is None else step
  if step not in steps:
    raise ValueError(f"--step={step} not among the saved steps {sorted(steps)}.")

  params = restore_params(workdir, step, _abstract_params(config, dtype))

  out = epath.Path(output)
  if (out / "params").exists():
    raise FileExistsError(f"{out / 'params'} exists: choose a new --output directory.")
  out.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(out / "params", params)
  manifest = {
      "format": FORMAT,
      "step": int(step),
      "num_params": train.count_params(params),
      "dtype": dtype,
      "source_workdir": workdir if "://" in workdir else os.path.abspath(workdir),
      "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
      "config": json.loads(config_text),
  }
  if jax.process_index() == 0:
    (out / "config.json").write_text(config_text)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
  return manifest


def load_exported(export_dir: str) -> tuple[ml_collections.ConfigDict, Any, dict[str, Any]]:
  """(config, params, manifest) of an export, params sharded over this process's devices.

  Checks that config.json still matches the manifest's sha256.
  """
  path = epath.Path(export_dir)
  manifest = json.loads((path / "manifest.json").read_text())
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path / 'manifest.json'}: format {manifest.get('format')!r}, "
                     f"expected {FORMAT!r}.")
  config_text = (path / "config.json").read_text()
  if hashlib.sha256(config_text.encode()).hexdigest() != manifest["config_sha256"]:
    raise ValueError(f"{path / 'config.json'} does not match the sha256 in manifest.json.")
  config = load_config(path / "config.json")
  target = _abstract_params(config, manifest["dtype"])
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(path / "params", target)
  return config, params, manifest
