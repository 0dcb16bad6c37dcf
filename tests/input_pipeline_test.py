"""Grain pipeline: determinism, exact resume in a fresh process, per-host sharding."""

import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from perceivers_jax import config_base
from perceivers_jax.data import augmentation
from perceivers_jax.data import built_dataset
from perceivers_jax.data import input_pipeline
from perceivers_jax.data import tokens
from perceivers_jax.data import windows

REPO = pathlib.Path(__file__).resolve().parent.parent


def _config(max_length=64, num_latents=16, batch_size=4, kind="effective", padding="left"):
  config = config_base.base_config()
  config.model.max_length = max_length
  config.model.num_latents = num_latents
  config.train.batch_size = batch_size
  config.eval.batch_size = batch_size
  config.data.windows = kind
  config.data.padding_side = padding
  return config


def _tagged_pieces(lengths):
  """Pieces whose token values tell (record, position): 1000 * record + position + 3."""
  return [{"tokens": np.arange(n, dtype=np.int32) + 1000 * r + 3} for r, n in enumerate(lengths)]


def _record_of(row):
  """Record index of a window row from `_tagged_pieces` (-1 for an all-PAD row)."""
  valid = row["positions"] >= 0
  return int(row["inputs"][valid][0] - 3) // 1000 if valid.any() else -1


def _rows(batch):
  return [{k: v[i] for k, v in batch.items()} for i in range(len(batch["inputs"]))]


@pytest.fixture(scope="module")
def real_source(maestro_paths):
  """Token records of three real pieces (shortest first) as an in-memory data source."""
  return [{"tokens": tokens.midi_file_to_tokens(p)} for p in maestro_paths[:3]]


def test_batches_have_fixed_shapes_and_hold_real_windows(real_source):
  config = _config()
  batch = next(input_pipeline.make_train_iterator(config, real_source, seed=0,
                                                  process_index=0, process_count=1))
  assert set(batch) == {"inputs", "positions", "targets"}
  for value in batch.values():
    assert value.shape == (4, 64) and value.dtype == np.int32
  for row in _rows(batch):
    valid = row["positions"] >= 0
    positions = row["positions"][valid]
    assert any(np.array_equal(row["inputs"][valid], r["tokens"][positions])
               for r in real_source if positions[-1] < len(r["tokens"]))
    assert (row["targets"] != tokens.PAD_ID).sum() == min(16, valid.sum())


def test_same_seed_same_batches_other_seed_other_batches(real_source):
  config = _config()
  take = lambda seed: [next(it) for it in [input_pipeline.make_train_iterator(
      config, real_source, seed=seed, process_index=0, process_count=1)] for _ in range(5)]
  first, again, other = take(7), take(7), take(8)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert any(not np.array_equal(a["positions"], b["positions"]) for a, b in zip(first, other))


def test_state_restores_in_fresh_process_via_orbax(real_source, tmp_path):
  """Save after k batches with Grain's Orbax handler; a new process continues identically."""
  np.savez(tmp_path / "pieces.npz", *[r["tokens"] for r in real_source])
  script = textwrap.dedent(f"""
      import sys
      import grain
      import numpy as np
      import orbax.checkpoint as ocp
      sys.path.insert(0, {str(REPO)!r})
      from perceivers_jax.data import input_pipeline
      from tests.input_pipeline_test import _config
      pieces = np.load({str(tmp_path / "pieces.npz")!r})
      source = [{{"tokens": pieces[k]}} for k in sorted(pieces.files, key=lambda s: int(s[4:]))]
      it = input_pipeline.make_train_iterator(_config(), source, seed=3, process_index=0,
                                              process_count=1)
      manager = ocp.CheckpointManager({str(tmp_path / "ckpt")!r})
      if sys.argv[1] == "save":
        for _ in range(4):
          next(it)
        manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
      else:
        manager.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it)))
      batches = [next(it) for _ in range(3)]
      np.savez({str(tmp_path)!r} + "/" + sys.argv[1] + ".npz",
               **{{f"{{i}}_{{k}}": v for i, b in enumerate(batches) for k, v in b.items()}})
  """)
  for mode in ("save", "restore"):
    subprocess.run([sys.executable, "-c", script, mode], check=True, cwd=REPO)
  saved, restored = np.load(tmp_path / "save.npz"), np.load(tmp_path / "restore.npz")
  assert sorted(saved.files) == sorted(restored.files) and len(saved.files) == 9
  for key in saved.files:
    np.testing.assert_array_equal(saved[key], restored[key])


def test_get_state_set_state_in_process(real_source):
  config = _config()
  make = lambda: input_pipeline.make_train_iterator(config, real_source, seed=5,
                                                    process_index=0, process_count=1)
  it = make()
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  resumed = make()
  resumed.set_state(state)
  for a in expected:
    np.testing.assert_array_equal(a["inputs"], next(resumed)["inputs"])


def test_two_hosts_train_on_disjoint_complete_shards_reshuffled_each_epoch():
  lengths = [40 + 7 * r for r in range(10)]
  source = _tagged_pieces(lengths)
  config = _config(max_length=16, num_latents=4, batch_size=2)  # 1 row per host batch
  visits = {}
  for host in (0, 1):
    it = input_pipeline.make_train_iterator(config, source, seed=0, process_index=host,
                                            process_count=2)
    visits[host] = [_record_of(_rows(next(it))[0]) for _ in range(15)]  # 3 epochs of 5
  shards = {host: set(v) for host, v in visits.items()}
  assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(range(10))
  for host, seen in visits.items():
    epochs = [seen[i:i + 5] for i in range(0, 15, 5)]
    assert all(sorted(e) == sorted(shards[host]) for e in epochs)  # each epoch a permutation
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled between epochs


def test_baseline_windows_in_the_pipeline():
  source = _tagged_pieces([200] * 4)
  config = _config(max_length=32, num_latents=8, batch_size=8, kind="baseline",
                   padding="right")
  it = input_pipeline.make_train_iterator(config, source, seed=0, process_index=0,
                                          process_count=1)
  for _ in range(5):
    for row in _rows(next(it)):
      predicted = row["positions"][row["targets"] != tokens.PAD_ID] + 1
      assert len(predicted) == 8 and predicted.min() >= 32 + 1 - 8
      assert row["positions"][0] >= 0  # right padding: valid slots first


def test_eval_two_hosts_cover_every_target_once_with_equal_batches():
  lengths = [2, 17, 40, 95, 33, 64, 5]
  source = _tagged_pieces(lengths)
  config = _config(max_length=24, num_latents=8, batch_size=4)
  counts = [np.zeros(n, int) for n in lengths]
  num_batches = []
  for host in (0, 1):
    batches = input_pipeline.make_eval_batches(config, source, process_index=host,
                                               process_count=2)
    num_batches.append(len(batches))
    records = set()
    for batch in batches:
      assert batch["inputs"].shape == (2, 24)
      for row in _rows(batch):
        record = _record_of(row)
        if record < 0:
          assert not row["inputs"].any() and not row["targets"].any()
          continue
        records.add(record)
        predicted = row["targets"] != tokens.PAD_ID
        np.add.at(counts[record], row["positions"][predicted] + 1, 1)
  assert num_batches[0] == num_batches[1]
  total = windows.num_sequential_windows(lengths, 8)
  assert num_batches[0] * 2 * 2 >= total > (num_batches[0] - 1) * 2 * 2
  for n, count in zip(lengths, counts):
    assert count[0] == 0 and np.all(count[1:] == 1)

  config.eval.max_batches = 2
  assert len(input_pipeline.make_eval_batches(config, source, process_index=0,
                                              process_count=2)) == 2


def test_eval_max_targets_per_piece_predicts_each_piece_opening_once():
  lengths = [2, 17, 40, 95]
  source = _tagged_pieces(lengths)
  config = _config(max_length=24, num_latents=8, batch_size=4)
  config.eval.max_targets_per_piece = 20
  counts = [np.zeros(n, int) for n in lengths]
  for batch in input_pipeline.make_eval_batches(config, source, process_index=0,
                                                process_count=1):
    for row in _rows(batch):
      if _record_of(row) >= 0:
        predicted = row["targets"] != tokens.PAD_ID
        np.add.at(counts[_record_of(row)], row["positions"][predicted] + 1, 1)
  for n, count in zip(lengths, counts):
    assert count[0] == 0 and np.all(count[1:21] == 1) and not count[21:].any()


class _StoredSplit(list):
  """A list of records posing as a TFDS split source (dataset_info.data_dir, split)."""

  def __init__(self, records, data_dir, split):
    super().__init__(records)
    self.dataset_info = type("Info", (), {"data_dir": str(data_dir)})()
    self.split = split


def test_record_lengths_prefer_the_stored_file_when_it_fits(tmp_path):
  source = _StoredSplit(_tagged_pieces([5, 9]), tmp_path, "validation")
  assert input_pipeline.record_lengths(source) == [5, 9]  # no file: from the tokens
  (tmp_path / built_dataset.LENGTHS_FILE).write_text('{"validation": [50, 90]}')
  assert input_pipeline.record_lengths(source) == [50, 90]  # the file, no record read
  source.append(source[0])
  assert input_pipeline.record_lengths(source) == [5, 9, 5]  # stale file: from the tokens


def test_to_global_arrays():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  batch = {"inputs": np.arange(12, dtype=np.int32).reshape(3, 4)}
  arrays = input_pipeline.to_global_arrays(batch, sharding)
  assert arrays["inputs"].shape == (3, 4) and arrays["inputs"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(arrays["inputs"]), batch["inputs"])


def test_to_global_arrays_over_eight_devices():
  script = textwrap.dedent("""
      import os
      os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
      import jax
      import numpy as np
      from perceivers_jax.data import input_pipeline
      mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
      sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
      batch = {"inputs": np.arange(8 * 16, dtype=np.int32).reshape(8, 16)}
      array = input_pipeline.to_global_arrays(batch, sharding)["inputs"]
      assert array.shape == (8, 16) and len(array.addressable_shards) == 8
      assert all(s.data.shape == (1, 16) for s in array.addressable_shards)
      np.testing.assert_array_equal(np.asarray(array), batch["inputs"])
      print("ok")
  """)
  result = subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO,
                          capture_output=True, text=True)
  assert result.stdout.strip() == "ok"


def test_bad_configuration_is_named():
  source = _tagged_pieces([50] * 3)
  with pytest.raises(ValueError, match="train.batch_size"):
    input_pipeline.make_train_iterator(_config(batch_size=3), source, seed=0,
                                       process_index=0, process_count=2)
  with pytest.raises(ValueError, match="config.data.windows"):
    input_pipeline.make_train_iterator(_config(kind="random"), source, seed=0,
                                       process_index=0, process_count=1)
  with pytest.raises(ValueError, match="config.data.padding_side"):
    input_pipeline.make_eval_batches(_config(padding="middle"), source, process_index=0,
                                     process_count=1)
  with pytest.raises(ValueError, match="seed"):
    input_pipeline.make_train_iterator(_config(), source, seed=-1, process_index=0,
                                       process_count=1)
  with pytest.raises(ValueError, match="no training pieces"):
    input_pipeline.make_train_iterator(_config(batch_size=4), source[:1], seed=0,
                                       process_index=1, process_count=2)


def test_worker_processes_give_the_same_batches_and_resume():
  source = _tagged_pieces([50, 300, 500, 90, 1000])
  config = _config(max_length=32, num_latents=8)
  threads = input_pipeline.make_train_iterator(config, source, seed=1, process_index=0,
                                               process_count=1)
  expected = [next(threads)["positions"] for _ in range(4)]
  config.data.worker_count = 1
  workers = input_pipeline.make_train_iterator(config, source, seed=1, process_index=0,
                                               process_count=1)
  for batch in expected[:2]:
    np.testing.assert_array_equal(next(workers)["positions"], batch)
  state = workers.get_state()
  resumed = input_pipeline.make_train_iterator(config, source, seed=1, process_index=0,
                                               process_count=1)
  resumed.set_state(state)
  for batch in expected[2:]:
    np.testing.assert_array_equal(next(resumed)["positions"], batch)


def test_augmentation_transposes_training_windows_deterministically(real_source):
  """With transposition on, each window is a window of a transposed piece, fixed by the seed."""
  config = _config()
  config.data.augmentation.transpose_range = 6
  take = lambda: next(input_pipeline.make_train_iterator(
      config, real_source, seed=3, process_index=0, process_count=1))
  first, again = take(), take()
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])
  shifts = []
  for row in _rows(first):
    valid = row["positions"] >= 0
    matches = [k for r in real_source for k in range(-6, 7)
               if row["positions"][valid][-1] < len(r["tokens"]) and np.array_equal(
                   augmentation.transpose(r["tokens"], k)[row["positions"][valid]],
                   row["inputs"][valid])]
    assert matches, "window is no transposition of any piece"
    shifts.append(matches[0])
  assert any(k != 0 for k in shifts)


def test_bad_augmentation_config_is_named(real_source):
  config = _config()
  config.data.augmentation.stretch_range = (1.1, 0.9)
  with pytest.raises(ValueError, match="config.data.augmentation.stretch_range"):
    input_pipeline.make_train_iterator(config, real_source, seed=0, process_index=0,
                                       process_count=1)
