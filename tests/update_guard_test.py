"""The update checks on small trees: each reason to reject, the loss window (warm-up, ring,
rejected losses left out) and the refusal of exploded parameters to resume from."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceivers_jax.training import update_guard

LIMITS = update_guard.Limits(max_update_ratio=1.0, loss_spike_sigmas=6.0, loss_spike_window=8)


def _judge(updates, *, loss=5.0, grads=None, window=None, limits=LIMITS):
  params = {"w": jnp.ones(4), "b": jnp.zeros(2)}
  updates = {"w": jnp.full(4, updates, jnp.float32), "b": jnp.zeros(2)}
  grads = updates if grads is None else grads
  window = update_guard.empty_loss_window(limits) if window is None else window
  new_params = jax.tree.map(jnp.add, params, updates)
  return jax.jit(update_guard.judge, static_argnums=6)(
      jnp.float32(loss), grads, params, updates, new_params, window, limits)


def test_each_reason_to_reject_an_update():
  ok = _judge(0.01)
  assert int(ok["rejected"]) == 0
  np.testing.assert_allclose(float(ok["update_ratio"]), 0.01, rtol=1e-6)  # ||u|| / ||p||
  assert int(_judge(10.0)["rejected"]) == update_guard.TOO_LARGE
  assert int(_judge(2e6)["rejected"]) == update_guard.TOO_LARGE | update_guard.EXPLODED
  off = update_guard.Limits(max_update_ratio=0.0, loss_spike_sigmas=6.0, loss_spike_window=8)
  assert int(_judge(10.0, limits=off)["rejected"]) == 0
  nan_grads = {"w": jnp.full(4, jnp.nan), "b": jnp.zeros(2)}
  assert int(_judge(0.01, grads=nan_grads)["rejected"]) == update_guard.NONFINITE
  assert int(_judge(0.01, loss=jnp.inf)["rejected"]) & update_guard.NONFINITE
  # A rejected update's loss stays out of the window.
  assert int(_judge(10.0)["loss_window"]["count"]) == 0
  assert int(ok["loss_window"]["count"]) == 1


def test_loss_spike_against_the_window_of_accepted_losses():
  losses = [5.0, 5.2, 4.8, 5.1, 4.9, 5.3, 4.7, 5.0, 5.1, 4.9]  # 10 > the window of 8
  window = update_guard.empty_loss_window(LIMITS)
  for i, loss in enumerate(losses):
    verdict = _judge(0.01, loss=loss, window=window)
    if i < 4:  # half of the window: no statistics yet.
      assert float(verdict["loss_z"]) == 0.0
    assert int(verdict["rejected"]) == 0, (i, verdict)
    window = verdict["loss_window"]
  assert int(window["count"]) == 10
  last = np.array(losses[-8:], np.float32)  # the ring holds the last 8 accepted losses.
  np.testing.assert_array_equal(np.sort(np.asarray(window["losses"])), np.sort(last))

  spike = _judge(0.01, loss=7.0, window=window)
  np.testing.assert_allclose(float(spike["loss_z"]), (7.0 - last.mean()) / last.std(),
                             rtol=1e-5)
  assert int(spike["rejected"]) == update_guard.LOSS_SPIKE
  jax.tree.map(np.testing.assert_array_equal, spike["loss_window"], window)  # left out.
  assert int(_judge(0.01, loss=5.5, window=window)["rejected"]) == 0  # 1.8 sigmas: accepted.


def test_a_constant_loss_does_not_make_rounding_noise_a_spike():
  window = update_guard.empty_loss_window(LIMITS)
  for _ in range(8):
    window = _judge(0.01, loss=2.0, window=window)["loss_window"]
  verdict = _judge(0.01, loss=2.0001, window=window)  # std 0: measured in MIN_LOSS_STD units.
  np.testing.assert_allclose(float(verdict["loss_z"]), 0.1, rtol=1e-2)
  assert int(verdict["rejected"]) == 0


def test_exploded_or_nonfinite_parameters_are_refused_in_one_line():
  update_guard.check_sane({"w": jnp.full(3, 1e5)}, "Checkpoint step 4 in DIR", "delete it.")
  for bad in (2e6, -jnp.inf, jnp.nan):
    with pytest.raises(update_guard.RejectedUpdateError,
                       match=r"^Checkpoint step 4 in DIR holds parameters with \|x\| up to .*"
                             r"beyond \+-1e\+06 .*: delete it\.$"):
      update_guard.check_sane({"w": jnp.array([1.0, bad])}, "Checkpoint step 4 in DIR",
                              "delete it.")
