"""Sampling pieces from a trained PerceiverS: loading, primers, per-sample seeds, output files.

`load_model(path, step)` restores the parameters (only those) of a training workdir's
checkpoint or of a `perceivers-export` directory, with the model config saved beside them
(config.json), for eval-mode decoding; `sample_to_dir(...)` generates `num_samples` pieces in
batches of `batch_size` rows and writes, per sample i, `sample_{i:04d}.mid`, `.npy` (raw tokens,
SOS .. EOS or the last token) and a `.json` sidecar.

Reproducibility: sample i draws from its own key `fold_in(key(seed), i)` (one fold per step),
so its tokens do not depend on which other samples share its batch. A run always fills whole
batches (the last one padded with copies), and sample i sits in slot i % batch_size, so
regenerating only sample i (`sample_indices=(i,)`, same batch_size) runs the same program on
the same row and reproduces its tokens exactly; the sidecar records everything needed.

Decoding itself (caches, sliding window, latent resets) is `decode`'s: this module's loop
adds only the per-row keys (`decode.generate` draws one key per step for the whole batch)
around `decode.prefill` / `decode.decode_step` / `decode.sample`. With several devices the
batch is split over a data-only mesh (parameters replicated; rows padded to a multiple of
the device count).
"""

import dataclasses
import json
import os
import pathlib
from typing import Any, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
import numpy as np

from perceivers_jax.data import tokens
from perceivers_jax.model import perceivers as model_lib
from perceivers_jax.parallel import mesh as mesh_lib
from perceivers_jax.sampling import decode
from perceivers_jax.state import export
from perceivers_jax.training import train

CONFIG_FILE = "config.json"
EXPORT_MANIFEST = export.MANIFEST  # marks a `perceivers-export` directory.
DATA_AXIS = "data"


class SamplingError(ValueError):
  """An invalid sampling request; the message names the setting (= its CLI flag)."""


def _fail(field: str, value: Any, why: str) -> None:
  raise SamplingError(f"--{field}={value}: {why}")


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """What to sample. Field names are the `perceivers-sample` flags.

  primer: a MIDI file to continue (None: unconditional, the prompt is [SOS]);
  primer_seconds: keep the primer's first seconds (None: all of it);
  max_seconds / end_seconds: stop by, or steer towards finishing at, a music duration
  (primer included; 0 = off; see `decode.SamplingConfig`).
  """
  num_samples: int = 1
  batch_size: int = 1
  num_tokens: int = 1024
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  max_seconds: float = 0.0
  end_seconds: float = 0.0
  seed: int = 0
  primer: str | None = None
  primer_seconds: float | None = None

  def sampling_config(self) -> decode.SamplingConfig:
    return decode.SamplingConfig(temperature=self.temperature, top_k=self.top_k,
                                 top_p=self.top_p, min_p=self.min_p,
                                 max_seconds=self.max_seconds, end_seconds=self.end_seconds)


def check_settings(settings: SampleSettings, model_config: ml_collections.ConfigDict,
                   sample_indices: Sequence[int] | None = None) -> np.ndarray:
  """Validates `settings` for a model (nothing compiled); returns the prompt int32[P]."""
  s = settings
  for field in ("num_samples", "batch_size", "num_tokens"):
    if getattr(s, field) < 1:
      _fail(field, getattr(s, field), "must be >= 1.")
  try:
    s.sampling_config()  # the sampling ranges live there
  except ValueError as e:
    raise SamplingError(f"--{e}") from e
  if s.top_k > model_config.vocab_size:
    _fail("top_k", s.top_k, f"must be in [0, {model_config.vocab_size}] (0 = off).")
  for index in sample_indices or ():
    if not 0 <= index < s.num_samples:
      _fail("sample_index", index, f"must be in [0, --num_samples={s.num_samples}).")
  if s.primer_seconds is not None:
    if s.primer is None:
      _fail("primer_seconds", s.primer_seconds, "needs --primer=FILE.mid.")
    if s.primer_seconds <= 0:
      _fail("primer_seconds", s.primer_seconds, "must be > 0 (omit it for the whole primer).")
  if s.primer is None:
    return np.array([tokens.SOS_ID], np.int32)
  if not os.path.isfile(s.primer):
    _fail("primer", s.primer, "no such file.")
  prompt_P = primer_prompt(s.primer, s.primer_seconds)
  length = model_config.max_length
  if len(prompt_P) > length:
    _fail("primer_seconds", s.primer_seconds,
          f"the primer {s.primer} gives {len(prompt_P)} tokens (SOS included), more than the "
          f"model's context L={length}; use fewer --primer_seconds.")
  if s.max_seconds and tokens.tokens_duration_seconds(prompt_P) >= s.max_seconds:
    _fail("max_seconds", s.max_seconds, f"the primer already lasts "
          f"{tokens.tokens_duration_seconds(prompt_P):.2f} s; allow more or use fewer "
          "--primer_seconds.")
  return prompt_P


def primer_prompt(path: str | os.PathLike, seconds: float | None = None) -> np.ndarray:
  """[SOS, events...] of a MIDI file, EOS dropped, cut after its first `seconds` of music.

  The cut is at a token boundary: every event up to an accumulated TIME_SHIFT time of
  `seconds` is kept (events at exactly that time included), the first shift past it is not.
  """
  piece = tokens.midi_file_to_tokens(path)
  events = piece[1:-1]  # [SOS, ..., EOS] -> events.
  if seconds is not None:
    is_shift = (events >= tokens.TIME_SHIFT_START) & (events < tokens.VELOCITY_START)
    elapsed_steps = np.cumsum(np.where(is_shift, events - tokens.TIME_SHIFT_START + 1, 0))
    events = events[elapsed_steps <= round(seconds * tokens.STEPS_PER_SECOND)]
  return np.concatenate([[tokens.SOS_ID], events]).astype(np.int32)


def sample_key(seed: int, sample_index: int) -> jax.Array:
  """Sample `sample_index`'s own key (recorded in its sidecar as this formula)."""
  return jax.random.fold_in(jax.random.key(seed), sample_index)


# -- loading -------------------------------------------------------------------------------------


def read_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config saved in `path`/config.json by training (or by an export)."""
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"--checkpoint/--workdir {path}: no {CONFIG_FILE} there; pass a "
                            "training workdir, one of its checkpoints/STEP folders or an export.")
  return export.load_config(file)


def resolve_path(path: str, step: int | None = None) -> tuple[str, int | None]:
  """(directory holding config.json, step) for a workdir or a workdir/checkpoints/STEP path."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--checkpoint/--workdir {path}: no such directory.")
  name, parent = os.path.basename(path), os.path.dirname(path)
  if (name.isdigit() and os.path.basename(parent) == "checkpoints"
      and not os.path.isfile(os.path.join(path, CONFIG_FILE))):
    if step is not None and step != int(name):
      raise SamplingError(f"--step={step} contradicts the checkpoint path {path}.")
    return os.path.dirname(parent), int(name)
  return path, step


def sampling_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A data-only mesh (parameters replicated, rows split) over `devices` (default: all)."""
  config = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return mesh_lib.make_mesh(config, devices)


def _sampling_trainer(config: ml_collections.ConfigDict, mesh: Mesh) -> train.Trainer:
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh = ml_collections.ConfigDict(dict(mesh.shape))
  return train.build_trainer(config, mesh)


def _model_from(config: ml_collections.ConfigDict, params: Any,
                rest: nnx.State) -> model_lib.PerceiverS:
  """The model of `config` holding `params` (a pure dict, as in the training state)."""
  abstract = nnx.eval_shape(lambda: model_lib.PerceiverS(config.model, rngs=nnx.Rngs(0)))
  graphdef, param_state, _ = nnx.split(abstract, nnx.Param, ...)
  nnx.replace_by_pure_dict(param_state, params)
  return nnx.merge(graphdef, param_state, rest)


def load_model(path: str | os.PathLike, step: int | None = None, *,
               mesh: Mesh | None = None) -> tuple[model_lib.PerceiverS, ml_collections.ConfigDict,
                                                  int]:
  """(model, config, step) from a training workdir: checkpoint `step` (default: the latest).

  `path` may also be workdir/checkpoints/STEP, or a `perceivers-export` directory (found by
  its manifest.json; `step` must then be None or the exported step). Only the parameters are
  read (`export`'s partial restore, never the optimizer state), straight into the shardings
  of `mesh` (default: a data-only mesh over every device, parameters replicated).
  """
  workdir, step = resolve_path(os.fspath(path), step)
  config = read_config(workdir)
  is_export = os.path.isfile(os.path.join(workdir, EXPORT_MANIFEST))
  step = _exported_step(workdir, step) if is_export else export.saved_step(workdir, config, step)
  trainer = _sampling_trainer(config, mesh or sampling_mesh())
  abstract_params = trainer.abstract_state["params"]
  if is_export:
    _, params, _ = export.load_exported(workdir, abstract_params)
  else:
    params = export.restore_params(workdir, step, abstract_params)
  return _model_from(config, params, trainer.init_rest()), config, step


def _exported_step(path: str, step: int | None) -> int:
  with open(os.path.join(path, EXPORT_MANIFEST), encoding="utf-8") as f:
    exported_step = int(json.load(f)["step"])
  if step is not None and step != exported_step:
    raise SamplingError(f"--step={step}: {path} is an export of step {exported_step}.")
  return exported_step


def untrained_model(config: ml_collections.ConfigDict, *,
                    mesh: Mesh | None = None) -> model_lib.PerceiverS:
  """The model `config` initialises (config.seed), laid out like `load_model`'s."""
  trainer = _sampling_trainer(config, mesh or sampling_mesh())
  state, rest = trainer.init_fn()
  return _model_from(config, state["params"], rest)


# -- generation ----------------------------------------------------------------------------------


def _model_mesh(state: nnx.State) -> Mesh | None:
  sharding = getattr(jax.tree.leaves(state)[0], "sharding", None)
  if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
    return sharding.mesh
  return None


def generate(model: model_lib.PerceiverS, prompt_P: np.ndarray, keys_B: jax.Array, *,
             num_tokens: int, sampling: decode.SamplingConfig) -> tuple[np.ndarray, int]:
  """Continues `prompt_P` once per key: (tokens int32[B, num_tokens], steps run).

  A row is PAD after its EOS; the loop stops early once every row has ended. On a
  multi-device model the rows are split over the mesh's data axis.
  """
  batch = keys_B.shape[0]
  prompt_BP = np.broadcast_to(np.asarray(prompt_P, np.int32), (batch, len(prompt_P)))
  mesh = _model_mesh(nnx.state(model))
  if mesh is not None:
    pad = -batch % mesh.shape[DATA_AXIS]  # rows copied so that every device gets as many.
    prompt_BP = np.concatenate([prompt_BP, prompt_BP[-1:].repeat(pad, 0)])
    keys_B = jnp.concatenate([keys_B, jnp.repeat(keys_B[-1:], pad, 0)])
  out = decode.generate(model, prompt_BP, num_steps=num_tokens, keys_B=keys_B,
                        sampling=sampling, mesh=mesh, batch_axis=DATA_AXIS)
  return np.asarray(out["tokens"])[:batch], int(out["num_steps"])


def batch_plan(sample_indices: Sequence[int], batch_size: int) -> list[list[int]]:
  """Per batch of a run, the sample in each slot: batch k holds samples k*B .. k*B + B-1.

  Only batches with a requested sample run; slots of unrequested (or missing) samples hold
  a copy of a requested one, so every batch has B rows and a sample keeps its slot.
  """
  by_batch: dict[int, list[int]] = {}
  for index in sorted(set(sample_indices)):
    by_batch.setdefault(index // batch_size, []).append(index)
  plan = []
  for number, wanted in sorted(by_batch.items()):
    slots = [number * batch_size + slot for slot in range(batch_size)]
    plan.append([index if index in wanted else wanted[0] for index in slots])
  return plan


def _trim(prompt_P: np.ndarray, generated_T: np.ndarray) -> tuple[np.ndarray, bool]:
  """prompt + generated tokens up to and including EOS (or all); whether EOS was reached."""
  eos = np.flatnonzero(generated_T == tokens.EOS_ID)
  end = eos[0] + 1 if eos.size else len(generated_T)
  return np.concatenate([prompt_P, generated_T[:end]]).astype(np.int32), bool(eos.size)


def sample_to_dir(model: model_lib.PerceiverS, config: ml_collections.ConfigDict,
                  settings: SampleSettings, output_dir: str | os.PathLike, *,
                  checkpoint_step: int, checkpoint_path: str,
                  sample_indices: Sequence[int] | None = None) -> list[dict[str, Any]]:
  """Generates samples (all, or only `sample_indices`) into `output_dir`; returns the sidecars."""
  prompt_P = check_settings(settings, config.model, sample_indices)
  indices = range(settings.num_samples) if sample_indices is None else sample_indices
  out = pathlib.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  sampling = settings.sampling_config()
  sidecars = []
  for slots in batch_plan(indices, settings.batch_size):
    keys_B = jnp.stack([sample_key(settings.seed, index) for index in slots])
    generated_BT, _ = generate(model, prompt_P, keys_B, num_tokens=settings.num_tokens,
                               sampling=sampling)
    for slot, index in enumerate(slots):
      if index % settings.batch_size == slot:  # other slots hold padding copies.
        sidecars.append(_write_sample(out, index, slot, prompt_P, generated_BT[slot], settings,
                                      checkpoint_step, checkpoint_path))
  return sidecars


def _write_sample(out: pathlib.Path, index: int, slot: int, prompt_P: np.ndarray,
                  generated_T: np.ndarray, settings: SampleSettings, checkpoint_step: int,
                  checkpoint_path: str) -> dict[str, Any]:
  sequence, eos_reached = _trim(prompt_P, generated_T)
  stem = out / f"sample_{index:04d}"
  np.save(stem.with_suffix(".npy"), sequence)
  # The MIDI holds the notes as the tokeniser reads them: re-encoding first resolves
  # same-pitch overlaps (common in samples), whose NOTE_OFFs a MIDI reader would pair otherwise.
  notes = tokens.tokens_to_note_sequence(sequence)
  tokens.tokens_to_midi_file(tokens.note_sequence_to_tokens(notes), stem.with_suffix(".mid"))
  sidecar = {
      "sample_index": index,
      "seed": settings.seed,
      "key": f"jax.random.fold_in(jax.random.key({settings.seed}), {index})",
      "batch_size": settings.batch_size,
      "batch_slot": slot,
      "settings": dataclasses.asdict(settings),
      "num_tokens": int(len(sequence)),
      "num_generated": int(len(sequence) - len(prompt_P)),
      "prompt_tokens": int(len(prompt_P)),
      "duration_seconds": tokens.tokens_duration_seconds(sequence),
      "eos_reached": eos_reached,
      "checkpoint_step": checkpoint_step,
      "checkpoint_path": checkpoint_path,
      "primer": settings.primer,
      "primer_seconds": settings.primer_seconds,
      "regenerate": regenerate_command(settings, index, checkpoint_path, checkpoint_step),
  }
  stem.with_suffix(".json").write_text(json.dumps(sidecar, indent=2, sort_keys=True),
                                       encoding="utf-8")
  return sidecar


def regenerate_command(settings: SampleSettings, index: int, checkpoint_path: str,
                       checkpoint_step: int) -> str:
  """The perceivers-sample command that writes sample `index` alone, token for token."""
  flags = [f"--checkpoint={checkpoint_path}", f"--step={checkpoint_step}"]
  flags += [f"--{name}={value}" for name, value in dataclasses.asdict(settings).items()
            if value is not None]
  return " ".join(["perceivers-sample", *flags, f"--sample_index={index}",
                   "--output_dir=OUTPUT_DIR"])
