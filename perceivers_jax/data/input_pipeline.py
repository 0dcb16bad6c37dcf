"""Grain input pipeline: random training windows and sequential eval windows.

Training: each host shuffles its shard of the pieces (records `index % process_count ==
process_index`), reshuffled every epoch, repeated forever; every visit of a piece cuts
one random window (`config.data.windows`: effective | baseline) with a generator seeded
from (seed, epoch, record index), so a seed fixes every batch and the iterator state
(`get_state`/`set_state`, Grain's Orbax handler) resumes exactly.

Evaluation: the effective sequential windows of every piece of the split (each target
predicted once), split into contiguous per-host blocks of equal size, padded with
all-PAD rows so every host runs the same number of fixed-shape batches. The plan needs only
the pieces' lengths: a built split's are read from built_dataset.LENGTHS_FILE beside its records
(`perceivers-build-data` writes it), so start-up reads no tokens.

Batches are dicts of int32 numpy arrays [B_host, L]: inputs, positions, targets
(`perceivers_jax/data/windows.py`). `to_global_arrays` makes global jax.Arrays of them.
"""

from collections.abc import Sequence
import dataclasses
import json
from typing import Any, Mapping

from absl import flags
from etils import epath
import grain
import jax
import ml_collections
import numpy as np

from perceivers_jax import config_base
from perceivers_jax.data import augmentation
from perceivers_jax.data import built_dataset
from perceivers_jax.data import windows

Batch = dict[str, np.ndarray]
DataSource = Sequence[Mapping[str, Any]]


def _process_index_and_count(process_index: int | None,
                             process_count: int | None) -> tuple[int, int]:
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return process_index, process_count


def _host_batch_size(global_batch_size: int, process_count: int, field: str) -> int:
  if global_batch_size % process_count:
    raise ValueError(f"{field}={global_batch_size} (global) must be divisible by the "
                     f"number of hosts ({process_count})")
  return global_batch_size // process_count


def _check_data_config(config: ml_collections.ConfigDict) -> None:
  if config.data.windows not in windows.WINDOW_KINDS:
    raise ValueError(f"config.data.windows must be one of {windows.WINDOW_KINDS}, "
                     f"got {config.data.windows!r}")
  if config.data.padding_side not in windows.PADDING_SIDES:
    raise ValueError(f"config.data.padding_side must be one of {windows.PADDING_SIDES}, "
                     f"got {config.data.padding_side!r}")
  augmentation.check_config(config.data.augmentation)


def _read_options(config: ml_collections.ConfigDict) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=config.data.read_threads,
                           prefetch_buffer_size=config.data.prefetch_buffer_size)


@dataclasses.dataclass(frozen=True)
class _RandomWindow:
  """Visit index + record index -> one random window (picklable for worker processes)."""

  data_source: DataSource
  shard_size: int
  seed: int
  kind: str
  max_length: int
  num_latents: int
  padding_side: str
  augment_config: dict[str, Any]  # config.data.augmentation as a dict (picklable)

  def __call__(self, visit: int, record: int) -> Batch:
    epoch = visit // self.shard_size
    rng = np.random.default_rng([self.seed, epoch, int(record)])
    piece = np.asarray(self.data_source[int(record)]["tokens"], np.int32)
    # Per piece, before windowing: stretching changes lengths and positions stay absolute.
    piece = augmentation.augment(piece, rng, self.augment_config)
    return windows.random_window(piece, rng, self.kind, max_length=self.max_length,
                                 num_latents=self.num_latents,
                                 padding_side=self.padding_side)


def make_train_iterator(config: ml_collections.ConfigDict, data_source: DataSource, *,
                        seed: int, process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
  """Endless iterator of this host's training batches (dict of int32 [B_host, L]).

  The iterator has `get_state()`/`set_state()` and works with
  `grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore(iterator)` in Orbax.
  """
  process_index, process_count = _process_index_and_count(process_index, process_count)
  batch_size = _host_batch_size(config.train.batch_size, process_count, "train.batch_size")
  _check_data_config(config)
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must lie in [0, 2**32), got {seed}")
  records = grain.MapDataset.range(len(data_source))[process_index::process_count]
  if len(records) == 0:
    raise ValueError(f"host {process_index} of {process_count} has no training pieces: "
                     f"the split holds only {len(data_source)}")
  make_window = _RandomWindow(
      data_source=data_source, shard_size=len(records), seed=seed,
      kind=config.data.windows, max_length=config.model.max_length,
      num_latents=config.model.num_latents, padding_side=config.data.padding_side,
      augment_config=config.data.augmentation.to_dict())
  dataset = (records.shuffle(seed=seed)  # reshuffled each epoch
             .repeat()
             .map_with_index(make_window)
             .batch(batch_size, drop_remainder=True)
             .to_iter_dataset(_read_options(config)))
  if config.data.worker_count:
    if not flags.FLAGS.is_parsed():
      # Grain's worker processes read its absl flags; callers outside absl.app (tests,
      # notebooks) have not parsed them, so take the defaults.
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=config.data.worker_count))
  return iter(dataset)


def eval_plan(lengths: Sequence[int], num_latents: int, *, batch_size: int,
              process_index: int, process_count: int,
              max_targets_per_piece: int = 0) -> np.ndarray:
  """This host's sequential windows: int64 [num_batches * batch_size, 3] rows of
  (record, end, first_target), record -1 for padding rows.

  Hosts take equal contiguous blocks of the global window list (so each reads mostly
  its own pieces) rounded up to whole batches; every host gets the same row count.
  `max_targets_per_piece` > 0 predicts only each piece's first targets (positions 1..max).
  """
  if max_targets_per_piece:
    lengths = [min(int(n), max_targets_per_piece + 1) for n in lengths]
  plan = [(record, end, first)
          for record, n in enumerate(lengths)
          for end, first in windows.sequential_ends(int(n), num_latents)]
  per_host = -(-len(plan) // process_count)
  per_host = -(-per_host // batch_size) * batch_size
  rows_R3 = np.full((per_host, 3), -1, np.int64)
  mine = plan[process_index * per_host:(process_index + 1) * per_host]
  if mine:
    rows_R3[:len(mine)] = mine
  return rows_R3


@dataclasses.dataclass(frozen=True)
class _SequentialWindow:
  """(record, end, first_target) -> the window, or an all-PAD row for record -1."""

  data_source: DataSource
  max_length: int
  num_latents: int
  padding_side: str

  def __call__(self, row: np.ndarray) -> Batch:
    record, end, first_target = (int(v) for v in row)
    if record < 0:
      return windows.empty_window(self.max_length)
    piece = np.asarray(self.data_source[record]["tokens"], np.int32)
    return windows.make_window(piece, end, max_length=self.max_length,
                               num_latents=self.num_latents, first_target=first_target,
                               padding_side=self.padding_side)


def record_lengths(data_source: DataSource) -> list[int]:
  """Token count of each record: from built_dataset.LENGTHS_FILE for a built TFDS split (no record read),
  else from the records' tokens (in-memory sources)."""
  info, split = getattr(data_source, "dataset_info", None), getattr(data_source, "split", None)
  if info is not None and split is not None:
    path = epath.Path(info.data_dir) / built_dataset.LENGTHS_FILE
    stored = json.loads(path.read_text()) if path.exists() else {}
    if len(stored.get(str(split), ())) == len(data_source):
      return stored[str(split)]
  return [len(data_source[i]["tokens"]) for i in range(len(data_source))]


def make_eval_batches(config: ml_collections.ConfigDict, data_source: DataSource, *,
                      process_index: int | None = None, process_count: int | None = None,
                      lengths: Sequence[int] | None = None) -> grain.MapDataset:
  """This host's eval batches: a re-iterable MapDataset of dicts of int32 [B_host, L].

  All hosts get the same number of batches (`len()`); padding rows are all-PAD.
  `lengths`: token counts of the records (default `record_lengths`).
  `config.eval.max_batches` > 0 keeps only each host's first batches;
  `config.eval.max_targets_per_piece` > 0 only each piece's first targets.
  """
  process_index, process_count = _process_index_and_count(process_index, process_count)
  batch_size = _host_batch_size(config.eval.batch_size, process_count, "eval.batch_size")
  _check_data_config(config)
  if lengths is None:
    lengths = record_lengths(data_source)
  rows_R3 = eval_plan(lengths, config.model.num_latents, batch_size=batch_size,
                      process_index=process_index, process_count=process_count,
                      max_targets_per_piece=config.eval.get("max_targets_per_piece", 0))
  if config.eval.max_batches:
    rows_R3 = rows_R3[:config.eval.max_batches * batch_size]
  make_window = _SequentialWindow(
      data_source=data_source, max_length=config.model.max_length,
      num_latents=config.model.num_latents, padding_side=config.data.padding_side)
  return (grain.MapDataset.source(list(rows_R3))
          .map(make_window)
          .batch(batch_size, drop_remainder=True))


def to_global_arrays(batch: Mapping[str, np.ndarray],
                     sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Host-local batch [B_host, L] -> global jax.Arrays [B_host * hosts, L] on `sharding`."""
  return {key: jax.make_array_from_process_local_data(sharding, value)
          for key, value in batch.items()}


def open_data_source(config: ml_collections.ConfigDict, split: str):
  """`tfds.data_source` of `config.data.dataset` (the `full` config) for `split`, read from
  the built files (built_dataset: no builder code)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if config.data.dataset not in built_dataset.DATASETS:
    config_base.fail("data.dataset", config.data.dataset, "no such TFDS dataset or config; "
                     f"use {' or '.join(built_dataset.DATASETS)}")
  data_dir = config.data.data_dir or None
  try:
    builder = tfds.builder(config.data.dataset, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:  # no builder code registered and no files there
    builder = None
  if builder is None or not builder.is_prepared():
    layout = " --layout=folder" if config.data.dataset.endswith("/folder_full") else ""
    where = builder.data_dir if builder else data_dir or "the default TFDS data_dir"
    raise FileNotFoundError(
        f"dataset {config.data.dataset!r} is not built under {where}: build it with "
        f"`perceivers-build-data --manual_dir=MIDI_DIR --data_dir=DATA_DIR{layout}` and set "
        "config.data.data_dir")
  return builder.as_data_source(split=split)
