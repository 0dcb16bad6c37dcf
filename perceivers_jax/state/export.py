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
  manifest.json  format (run_dir.FORMATS: which of the two), step, parameter count,
                 dtype, source workdir, sha256 of config.json, the sha256 of every parameter
                 file (params_sha256, by path inside the export) and the config itself.
An export is written whole into a temporary sibling folder (`.NAME.export-tmp`, manifest.json
last) and renamed to `output` when complete, so a crash never leaves a partial export; an
existing `output` is an error unless `overwrite`, which replaces the whole folder (never mixing
two exports): only once the new export is complete does the old one move aside
(`.NAME.export-old`), the new one take its place and the old one go. A process killed at any
point leaves the old export or the new one whole on disk, and the next export to `output`
first puts the whole one back in place (`_recover`): the complete new export, if the kill came
after it was written, else the old one.
Only the parameters are read from the training checkpoint (partial restore), straight into
the target devices' shardings, so exporting never loads the optimizer state. Reading an
export back (either format, into this process's devices or into any given shardings, as
sampling and fine-tuning's config.train.init_from do) is `run_dir.load_exported`.

Safetensors names are the flat dotted names of perceivers_jax/model/param_groups.py, e.g.
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

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy

from perceivers_jax.model import param_groups
from perceivers_jax.state import model_state
from perceivers_jax.state import run_dir

DTYPES = ("float32", "bfloat16")


def _write_safetensors(path: epath.Path, params: Any, metadata: dict[str, str]) -> None:
  # Replicated arrays: np.asarray reads this process's copy, also on multi-host jobs.
  arrays = {name: np.asarray(leaf) for name, leaf in param_groups.flatten(params).items()}
  if jax.process_index() == 0:
    safetensors.numpy.save_file(arrays, os.fspath(path), metadata=metadata)


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


def _is_complete(path: epath.Path) -> bool:
  """Whether `path` holds a whole export (manifest.json, config and every parameter file
  matching its sha256s)."""
  try:
    run_dir.check_export_files(path)
  except (OSError, ValueError, KeyError):
    return False
  return True


def _recover(out: epath.Path, tmp: epath.Path, old: epath.Path) -> None:
  """Puts the whole export back at `out` after an export to it was killed (process 0 only).

  The steps of an overwrite are: write `tmp` completely, rename `out` to `old`, rename `tmp` to
  `out`, delete `old`. Killed before the first rename, `out` is still the old export; between
  the renames, `tmp` is the complete new one and takes its place; after them, only `old` is
  left to delete. A `tmp` that is not complete is left for the export to replace.
  """
  if not out.exists():
    if tmp.exists() and _is_complete(tmp):
      tmp.rename(out)
      logging.warning("Recovered %s: the complete export of an interrupted run.", out)
    elif old.exists():
      old.rename(out)
      logging.warning("Recovered %s: the export an interrupted overwrite had moved aside.", out)
  if old.exists() and out.exists():
    old.rmtree()


def export(workdir: str, output: str, *, step: int | None = None, dtype: str = "float32",
           file_format: str = "orbax", overwrite: bool = False,
           attention_impl: str = "auto") -> dict[str, Any]:
  """Writes the params of checkpoint `step` (default: latest) of `workdir` to `output`.

  `file_format`: "orbax" or "safetensors" (run_dir.FORMATS). `output` must not exist
  unless `overwrite`, which replaces it once the new export is complete. The export's
  config.json records `attention_impl` as model.attention_impl. Returns the manifest.
  Raises FileNotFoundError / FileExistsError / ValueError naming what is wrong.
  """
  if dtype not in DTYPES:
    raise ValueError(f"--dtype={dtype!r}: use one of {DTYPES}.")
  if file_format not in run_dir.FORMATS:
    raise ValueError(f"--format={file_format!r}: use one of {tuple(run_dir.FORMATS)}.")
  run_dir.check_attention_impl(attention_impl)
  config_path = epath.Path(workdir) / run_dir.CONFIG_FILE
  if not config_path.exists():
    raise FileNotFoundError(f"{config_path} not found: --workdir must be a training workdir.")
  out = epath.Path(output)
  # Every host computes the same folder names (Orbax writes collectively into tmp).
  tmp = out.parent / f".{out.name}.export-tmp"
  old = out.parent / f".{out.name}.export-old"
  if jax.process_index() == 0:
    _recover(out, tmp, old)
  _sync("export-recovered")
  if out.exists() and not overwrite:
    raise FileExistsError(f"--output={output} exists: choose a new directory, or pass "
                          "--overwrite to replace it.")
  config_text = _with_attention_impl(config_path.read_text(), attention_impl)
  config = run_dir.read_config(workdir, attention_impl)
  step = run_dir.saved_step(workdir, config, step)

  params = run_dir.restore_params(
      workdir, step, model_state.build_local(config).abstract_params_in(dtype))
  if jax.process_index() == 0:
    if tmp.exists():  # left incomplete by an export that was killed (or an old one's).
      tmp.rmtree()
    tmp.mkdir(parents=True)
  _sync("export-tmp-ready")
  manifest_format = run_dir.FORMATS[file_format]
  params_name = run_dir.PARAMS_PATHS[manifest_format]
  manifest = {
      "format": manifest_format,
      "step": int(step),
      "num_params": model_state.count_params(params),
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
    manifest["params_sha256"] = run_dir.params_sha256(tmp, params_name)
    (tmp / run_dir.CONFIG_FILE).write_text(config_text)
    (tmp / run_dir.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if out.exists():  # overwrite: the old export moves aside only now the new one is complete.
      out.rename(old)
    tmp.rename(out)
    if old.exists():
      old.rmtree()
  _sync("export-renamed")
  return manifest

