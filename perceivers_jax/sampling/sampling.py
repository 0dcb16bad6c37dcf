"""Sampling pieces from a trained PerceiverS: loading, primers, per-sample seeds, output files.

`load_model(path, step)` builds the model of a training workdir's checkpoint or of a
`perceivers-export` directory for eval-mode decoding, read through `state/run_dir.py` (the
config saved beside the parameters, then the parameters only); `sample_to_dir(...)`
generates `num_samples` pieces in batches of `batch_size` rows and writes, per sample i,
`sample_{i:04d}.mid`, `.npy` (raw tokens, SOS .. EOS or the last token), `.png` (its piano
roll) and a `.json` sidecar, skipping the samples already written, then the folder's
listening page (`index.html`)
(`job`: the output directory, its resumption, manifest and progress).

Multi-host: every process calls `sample_to_dir` alike (after `jax.distributed.initialize`);
each batch is the global batch, its rows split over every device of every host, and each
host writes the samples of the rows its own devices hold.

Reproducibility (README "Sampling"): sample i draws from its own key `fold_in(key(seed), i)`
(one fold per step). A run always fills whole batches (the last one padded with copies,
never written), and sample i sits in slot i % batch_size, so regenerating only sample i
(`sample_indices=(i,)`, same batch_size, backend and device count) runs the same program on
the same row and reproduces its tokens exactly; the sidecar records everything needed.
Another batch size, device or host count changes the shapes computed, which on GPUs and TPUs
(bf16) may change a logit's last bits and so a drawn token.

Decoding itself (caches, sliding window, latent resets) is `decode`'s: this module's loop
adds only the per-row keys (`decode.generate` draws one key per step for the whole batch)
around `decode.prefill` / `decode.decode_step` / `next_token.sample`. With several devices the
batch is split over a data-only mesh (parameters replicated; rows padded to a multiple of
the device count).
"""

import dataclasses
import os
import pathlib
from typing import Any, Sequence

from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
import numpy as np

from perceivers_jax.data import tokens
from perceivers_jax.model import perceivers as model_lib
from perceivers_jax.parallel import mesh as mesh_lib
from perceivers_jax.runtime import traces
from perceivers_jax.sampling import decode
from perceivers_jax.sampling import next_token
from perceivers_jax.sampling import job
from perceivers_jax.sampling import listening_page
from perceivers_jax.sampling.job import SamplingError
from perceivers_jax.state import model_state
from perceivers_jax.state import run_dir

PROFILE_DIR = "profile"  # under the output directory: traces of --profile_steps
DATA_AXIS = "data"


def _fail(field: str, value: Any, why: str) -> None:
  raise SamplingError(f"--{field}={value}: {why}")


def _setting(default: Any, help_text: str) -> Any:
  return dataclasses.field(default=default, metadata=dict(help=help_text))


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """What to sample. The `perceivers-sample` flags are these fields and those of `sampling`
  (`next_token.SamplingConfig`, the one definition of the sampling controls and their ranges),
  flattened; each field's `help` is its flag's. A new control is a new field, nothing else.
  """
  num_samples: int = _setting(1, "Number of samples K.")
  batch_size: int = _setting(1, "Samples generated together: the global batch, its rows "
                                "split over every device of every host.")
  num_tokens: int = _setting(1024, "Tokens to generate after the prompt (may exceed L).")
  seed: int = _setting(0, "Run seed; sample i uses fold_in(key(seed), i).")
  primer: str | None = _setting(None, "MIDI file to continue (default: unconditional, the "
                                      "prompt is [SOS]).")
  primer_seconds: float | None = _setting(None, "Keep the primer's first seconds (default: "
                                                "all of it).")
  max_note_seconds: float = _setting(
      tokens.DEFAULT_MAX_NOTE_SECONDS, "In the MIDI, a note whose NOTE_OFF never comes lasts at "
      "most this long (0 = until the piece ends).")
  sampling: next_token.SamplingConfig = dataclasses.field(default_factory=next_token.SamplingConfig)

  @staticmethod
  def flag_fields() -> list[dataclasses.Field]:
    """One field per flag: the settings' own, then `next_token.SamplingConfig`'s."""
    own = [f for f in dataclasses.fields(SampleSettings) if f.name != "sampling"]
    return own + list(dataclasses.fields(next_token.SamplingConfig))

  def flag_values(self) -> dict[str, Any]:
    """{flag name: value}, flattened as `flag_fields`."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name != "sampling"} | dataclasses.asdict(self.sampling)

  @classmethod
  def from_flag_values(cls, values: dict[str, Any]) -> "SampleSettings":
    """Settings from {flag name: value} (missing ones default); a bad range is a SamplingError."""
    names = {f.name for f in dataclasses.fields(next_token.SamplingConfig)}
    try:
      sampling = next_token.SamplingConfig(**{k: v for k, v in values.items() if k in names})
    except ValueError as e:
      raise SamplingError(f"--{e}") from e  # messages start with `field=value`.
    return cls(sampling=sampling, **{k: v for k, v in values.items() if k not in names})


def check_settings(settings: SampleSettings, model_config: ml_collections.ConfigDict,
                   sample_indices: Sequence[int] | None = None) -> np.ndarray:
  """Validates `settings` for a model (nothing compiled); returns the prompt int32[P]."""
  s = settings
  for field in ("num_samples", "batch_size", "num_tokens"):
    if getattr(s, field) < 1:
      _fail(field, getattr(s, field), "must be >= 1.")
  if s.max_note_seconds < 0:
    _fail("max_note_seconds", s.max_note_seconds, "must be >= 0 (0 = no cap).")
  if s.sampling.top_k > model_config.vocab_size:
    _fail("top_k", s.sampling.top_k, f"must be in [0, {model_config.vocab_size}] (0 = off).")
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
  max_seconds = s.sampling.max_seconds
  if max_seconds and tokens.tokens_duration_seconds(prompt_P) >= max_seconds:
    _fail("max_seconds", max_seconds, f"the primer already lasts "
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


def sample_keys(seed: int, sample_indices: Sequence[int]) -> jax.Array:
  """`sample_key` of each index, in one vectorised op (a global batch may hold thousands)."""
  return jax.vmap(sample_key, in_axes=(None, 0))(seed, jnp.asarray(sample_indices, jnp.int32))


# -- loading -------------------------------------------------------------------------------------


def _model_state(config: ml_collections.ConfigDict, mesh: Mesh | None) -> model_state.ModelState:
  """`config`'s model on `mesh` (default: a data-only mesh over every device)."""
  return model_state.build(config, mesh or mesh_lib.data_mesh())


def load_model(path: str | os.PathLike, step: int | None = None, *,
               mesh: Mesh | None = None,
               attention_impl: str | None = None) -> tuple[model_lib.PerceiverS, ml_collections.ConfigDict,
                                                  int]:
  """(model, config, step) from a training workdir: checkpoint `step` (default: the latest).

  `path` may also be workdir/checkpoints/STEP, or a `perceivers-export` directory (found by
  its manifest.json; `step` must then be None or the exported step). Only the parameters are
  read (`run_dir.restore_params`, never the optimizer state), straight into the
  shardings of `mesh` (default: a data-only mesh over every device, parameters replicated);
  no optimizer is built. `attention_impl` (if given) replaces config.json's
  model.attention_impl.
  """
  workdir, step = run_dir.resolve_path(os.fspath(path), step)
  config = run_dir.read_config(workdir, attention_impl)
  step = run_dir.checkpoint_step(workdir, config, step)
  model = _model_state(config, mesh)
  params = run_dir.restore_params(workdir, step, model.abstract_params)
  return model.merge(params, model.init_rest()), config, step


def untrained_model(config: ml_collections.ConfigDict, *,
                    mesh: Mesh | None = None) -> model_lib.PerceiverS:
  """The model `config` initialises (config.seed), laid out like `load_model`'s."""
  model = _model_state(config, mesh)
  return model.merge(*model.init())


# -- generation ----------------------------------------------------------------------------------


def _model_mesh(state: nnx.State) -> Mesh | None:
  sharding = getattr(jax.tree.leaves(state)[0], "sharding", None)
  if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
    return sharding.mesh
  return None


def _rows_here(tokens_BT: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """(row indices R, int32[R, T]): the rows of a [B, T] array this process's devices hold."""
  rows = {}
  for shard in tokens_BT.addressable_shards:
    start = shard.index[0].start or 0
    for offset, row_T in enumerate(np.asarray(shard.data)):
      rows.setdefault(start + offset, row_T)  # a replicated row counts once.
  order = sorted(rows)
  return np.array(order, np.int64), np.stack([rows[row] for row in order])


def _generate_global(model: model_lib.PerceiverS, prompt: np.ndarray, keys_B: jax.Array, *,
                     num_tokens: int, sampling: next_token.SamplingConfig
                     ) -> tuple[jax.Array, int]:
  """(tokens [B', num_tokens], steps run): the rows of `generate_rows` as one global array,
  B' >= B rows (padding copies at the end)."""
  batch = keys_B.shape[0]
  prompt = np.asarray(prompt, np.int32)
  prompt_BP = prompt if prompt.ndim == 2 else np.broadcast_to(prompt, (batch, len(prompt)))
  mesh = _model_mesh(nnx.state(model))
  if mesh is not None:
    pad = -batch % mesh.shape[DATA_AXIS]  # rows copied so that every device gets as many.
    prompt_BP = np.concatenate([prompt_BP, prompt_BP[-1:].repeat(pad, 0)])
    keys_B = jnp.concatenate([keys_B, jnp.repeat(keys_B[-1:], pad, 0)])
    # Typed keys are placed on other hosts' devices through their raw data (the same on
    # every host), viewed as keys again: `decode.generate` then finds them in place.
    keys_B = jax.random.wrap_key_data(
        jax.device_put(np.asarray(jax.random.key_data(keys_B)),
                       NamedSharding(mesh, PartitionSpec(DATA_AXIS))),
        impl=jax.random.key_impl(keys_B))
  out = decode.generate(model, prompt_BP, num_steps=num_tokens, keys_B=keys_B,
                        sampling=sampling, mesh=mesh, batch_axis=DATA_AXIS)
  return out["tokens"], int(out["num_steps"])


def generate_rows(model: model_lib.PerceiverS, prompt: np.ndarray, keys_B: jax.Array, *,
                  num_tokens: int, sampling: next_token.SamplingConfig
                  ) -> tuple[np.ndarray, np.ndarray, int]:
  """Continues the prompt once per key, over every device of every process of the model's mesh.

  `prompt`: int32[P], the same for every row, or [B, P], one per row (left-padded with PAD).
  Returns the rows this process holds, (row indices R, tokens int32[R, num_tokens]), and the
  steps run. A row is PAD after its EOS; the loop stops early once every row has ended. The
  rows are padded (copies) to a multiple of the mesh's data axis; padding is not returned.
  """
  tokens_BT, steps = _generate_global(model, prompt, keys_B, num_tokens=num_tokens,
                                      sampling=sampling)
  rows_R, tokens_RT = _rows_here(tokens_BT)
  real_R = rows_R < keys_B.shape[0]
  return rows_R[real_R], tokens_RT[real_R], steps


def generate(model: model_lib.PerceiverS, prompt: np.ndarray, keys_B: jax.Array, *,
             num_tokens: int, sampling: next_token.SamplingConfig) -> tuple[np.ndarray, int]:
  """`generate_rows` with every row on every process, each host having sampled its own rows
  (gathered from all hosts): (tokens int32[B, T], steps run)."""
  tokens_BT, steps = _generate_global(model, prompt, keys_B, num_tokens=num_tokens,
                                      sampling=sampling)
  if jax.process_count() > 1:
    tokens_BT = multihost_utils.process_allgather(tokens_BT, tiled=True)
  return np.asarray(tokens_BT)[:keys_B.shape[0]], steps


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


def sample_to_dir(model: model_lib.PerceiverS, config: ml_collections.ConfigDict,
                  settings: SampleSettings, output_dir: str | os.PathLike, *,
                  checkpoint_step: int, checkpoint_path: str,
                  sample_indices: Sequence[int] | None = None,
                  profile_steps: Sequence[int] = ()) -> list[dict[str, Any]]:
  """Generates the samples (all, or only `sample_indices`) not yet in `output_dir`.

  Every process of a multi-host job calls this alike; each writes the samples of the rows
  its devices hold and returns their sidecars. Samples already written completely are
  skipped, so rerunning a killed job completes it (`--batch_size` may change: tokens do not
  depend on it; every other setting must repeat the first run's). Process 0 shows the
  progress, then rebuilds samples.jsonl and prints the job's samples/s and tokens/s.
  `profile_steps`: batches of this run (1 = the first, which compiles and is not traced) whose
  profiler trace goes to `output_dir`/profile (`runtime/traces.py`).
  """
  profile_steps = traces.check_steps(profile_steps, "--profile_steps")
  prompt_P = check_settings(settings, config.model, sample_indices)
  run = dict(settings.flag_values(), checkpoint_path=checkpoint_path,
             checkpoint_step=checkpoint_step)
  del run["batch_size"]
  out = job.open_output_dir(output_dir, run)
  wanted = set(range(settings.num_samples) if sample_indices is None else sample_indices)
  missing = job.missing_samples(out, wanted)
  progress = job.Progress(total=len(wanted), done=len(wanted) - len(missing))
  sidecars = []
  tracer = traces.StepTracer(str(out / PROFILE_DIR), profile_steps, first_step=1,
                             name="sampling batch")
  plan = batch_plan(missing, settings.batch_size)
  for batch_number, slots in enumerate(plan, start=1):
    with tracer.step(batch_number):
      rows_R, generated_RT, _ = generate_rows(model, prompt_P,
                                              sample_keys(settings.seed, slots),
                                              num_tokens=settings.num_tokens,
                                              sampling=settings.sampling)
    tracer.after(batch_number, generated_RT)
    for slot, generated_T in zip(rows_R, generated_RT):
      index = slots[slot]
      if index % settings.batch_size == slot:  # other slots hold padding copies.
        sidecars.append(_write_sample(out, index, int(slot), prompt_P, generated_T, settings,
                                      checkpoint_step, checkpoint_path))
    progress.advance(len(set(slots)))
  tracer.close(len(plan))
  end_line = job.finish(out, missing, progress.close())
  if jax.process_index() == 0:
    listening_page.write_folder_page(out)
  if end_line:
    print(end_line, flush=True)
  return sidecars


def _write_sample(out: pathlib.Path, index: int, slot: int, prompt_P: np.ndarray,
                  generated_T: np.ndarray, settings: SampleSettings, checkpoint_step: int,
                  checkpoint_path: str) -> dict[str, Any]:
  """Writes sample `index`'s files (`write_sample_files`) with its sidecar."""
  return job.write_sample_files(job.stem(out, index), prompt_P, generated_T,
                            max_note_seconds=settings.max_note_seconds, sidecar={
      "sample_index": index,
      "seed": settings.seed,
      "key": f"jax.random.fold_in(jax.random.key({settings.seed}), {index})",
      "batch_size": settings.batch_size,
      "batch_slot": slot,
      "settings": settings.flag_values(),
      "checkpoint_step": checkpoint_step,
      "checkpoint_path": checkpoint_path,
      "primer": settings.primer,
      "primer_seconds": settings.primer_seconds,
      "regenerate": regenerate_command(settings, index, checkpoint_path, checkpoint_step),
  })


def regenerate_command(settings: SampleSettings, index: int, checkpoint_path: str,
                       checkpoint_step: int) -> str:
  """The perceivers-sample command that writes sample `index` alone, token for token."""
  flags = [f"--checkpoint={checkpoint_path}", f"--step={checkpoint_step}"]
  flags += [f"--{name}={value}" for name, value in settings.flag_values().items()
            if value is not None]
  return " ".join(["perceivers-sample", *flags, f"--sample_index={index}",
                   "--output_dir=OUTPUT_DIR"])
