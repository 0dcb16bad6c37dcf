"""Checkpointer round trip (sharded state + Grain iterator, keep-N), the SIGTERM and SIGINT flag."""

import os
import signal

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from perceivers_jax.state import checkpointing


def _checkpoint_config(every_steps=2, keep=2, async_save=True):
  return ml_collections.ConfigDict(dict(every_steps=every_steps, keep=keep,
                                        async_save=async_save))


def _state(scale: float):
  return {"step": jnp.asarray(3, jnp.int32),
          "params": {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) * scale,
                     "b": jnp.ones((4,), jnp.bfloat16) * scale}}


def test_round_trip_restores_state_and_data_iterator(tmp_path):
  data_iter = iter(grain.MapDataset.range(100).shuffle(seed=1).to_iter_dataset())
  seen = [next(data_iter) for _ in range(5)]
  ckpt = checkpointing.Checkpointer(str(tmp_path), _checkpoint_config())
  assert ckpt.latest_step() is None
  assert ckpt.should_save(4) and not ckpt.should_save(5)
  for step in (2, 4, 6):
    assert ckpt.save(step, _state(step), data_iter)
  expected_next = [next(data_iter) for _ in range(3)]
  ckpt.close()

  reopened = checkpointing.Checkpointer(str(tmp_path), _checkpoint_config())
  assert reopened.all_steps() == [4, 6]  # keep=2 dropped step 2.
  fresh_iter = iter(grain.MapDataset.range(100).shuffle(seed=1).to_iter_dataset())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0.0))
  restored = reopened.restore(reopened.latest_step(), abstract, fresh_iter)
  reopened.close()
  jax.tree.map(np.testing.assert_array_equal, restored, _state(6))
  assert restored["params"]["b"].dtype == jnp.bfloat16
  # The restored iterator continues where the saved one stood, not at the start.
  assert [next(fresh_iter) for _ in range(3)] == expected_next
  assert expected_next != seen[:3]


def test_state_only_checkpointer_reads_training_checkpoints(tmp_path):
  data_iter = iter(grain.MapDataset.range(10).to_iter_dataset())
  ckpt = checkpointing.Checkpointer(str(tmp_path), _checkpoint_config(async_save=False))
  ckpt.save(2, _state(2.0), data_iter, force=True)
  ckpt.close()
  reader = checkpointing.Checkpointer(str(tmp_path), _checkpoint_config(), with_data_iter=False)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0.0))
  restored = reader.restore(2, abstract)
  reader.close()
  np.testing.assert_array_equal(restored["params"]["w"], _state(2.0)["params"]["w"])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_sets_the_stop_flag_and_handlers_are_restored(signum):
  """SIGTERM (preemption) and the first Ctrl-C only set the flag (a second Ctrl-C exits:
  tests/faults_test.py)."""
  previous = signal.getsignal(signum)
  watcher = checkpointing.PreemptionWatcher()
  assert not watcher.should_stop(1)
  os.kill(os.getpid(), signum)
  assert watcher.should_stop(2)
  watcher.close()
  assert signal.getsignal(signum) == previous
  assert signal.set_wakeup_fd(-1) == -1  # the wakeup fd was given back too.
