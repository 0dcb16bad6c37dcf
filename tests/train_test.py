"""Training end to end on real MAESTRO tokens: learning, sharding, exact resume after SIGTERM."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from perceivers_jax.data import tokens
from perceivers_jax.training import update_guard
import slow_training_run

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tiny_module():
  spec = importlib.util.spec_from_file_location("tiny", ROOT / "perceivers_jax/configs/tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def pieces(maestro_paths, tmp_path_factory):
  """Tokens of three real performances, saved for the subprocess tests too."""
  return slow_training_run.save_pieces(maestro_paths[:3], tmp_path_factory.mktemp("tokens"))


def _unigram_entropy(train_pieces) -> float:
  ids = np.concatenate([p[1:] for p in train_pieces])  # every target; SOS is never one.
  p = np.bincount(ids, minlength=tokens.VOCAB_SIZE) / len(ids)
  p = p[p > 0]
  return float(-(p * np.log(p)).sum())


def test_tiny_learns_below_unigram_entropy(pieces, tmp_path):
  from perceivers_jax.training import validation  # pylint: disable=g-import-not-at-top
  from perceivers_jax.training import train  # pylint: disable=g-import-not-at-top
  arrays, _ = pieces
  config = _tiny_module().get_config()
  config.model.max_length = 512
  config.model.num_latents = 64
  config.train.num_steps = 120
  config.train.warmup_steps = 20
  config.eval.every_steps = 120
  config.eval.max_batches = 6
  config.checkpoint.every_steps = 60
  train_source = [{"tokens": p} for p in arrays[:2]]
  eval_source = [{"tokens": arrays[2][:4000]}]
  entropy = _unigram_entropy(arrays[:2])

  metrics = train.train_and_evaluate(config, str(tmp_path), train_source=train_source,
                                     eval_source=eval_source)
  assert metrics["nll"] < entropy - 0.4, (metrics["nll"], entropy)
  assert metrics["bits_per_token"] == pytest.approx(metrics["nll"] / np.log(2))
  assert 0.0 < metrics["accuracy"] < 1.0
  assert "nll_pos_1_2" in metrics and "nll_pos_2048_4096" in metrics
  assert metrics["targets_in_nll_first_16"] == 16  # one piece's first 16 targets

  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  assert losses[-1] < losses[0] - 0.5
  assert all(r["train/tokens_per_s"] > 0 for r in records if "train/loss" in r)
  assert list((tmp_path / "tensorboard").iterdir())
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["120", "60"]

  # --mode=eval on the workdir reproduces the final evaluation from the checkpoint.
  again = validation.evaluate(config, str(tmp_path), eval_source=eval_source)
  assert again["nll"] == pytest.approx(metrics["nll"], rel=1e-6)


_SHARDED_STEP = r"""
import importlib.util, json, sys
import jax, numpy as np
from perceivers_jax.data import input_pipeline
from perceivers_jax.data import windows
from perceivers_jax.parallel import mesh as mesh_lib
from perceivers_jax.training import train
spec = importlib.util.spec_from_file_location("tiny", sys.argv[1])
tiny = importlib.util.module_from_spec(spec); spec.loader.exec_module(tiny)
piece = np.load(sys.argv[2])["arr_0"]

def config(microbatches, mesh):
  c = tiny.get_config()
  c.model.max_length, c.model.num_latents, c.model.num_latent_layers = 256, 32, 1
  c.model.embed_dim, c.model.num_heads, c.model.cross_attention_scales = 64, 2, (0, 16)
  c.model.dropout_rate = 0.0
  c.train.microbatches = microbatches
  c.train.warmup_steps = 0  # full-size Adam steps (~2e-3), so a layout mismatch would show.
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  return c

rng = np.random.default_rng(0)
rows = [windows.random_window(piece, rng, "effective", max_length=256, num_latents=32)
        for _ in range(8)]
local = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
# One initialisation (on one device), copied into every layout.
first = train.build_trainer(config(1, (1, 1, 1)),
                            mesh_lib.make_mesh(config(1, (1, 1, 1)).mesh, jax.devices()[:1]))
state0, rest0 = jax.device_get(first.init_fn())

def one_step(c, devices):
  trainer = train.build_trainer(c, mesh_lib.make_mesh(c.mesh, devices=devices))
  state = jax.device_put(state0, trainer.state_shardings)
  rest = jax.tree.map(lambda a, s: jax.device_put(a, s.sharding), rest0, trainer.abstract_rest)
  batch = input_pipeline.to_global_arrays(local, trainer.batch_sharding)
  state, metrics = trainer.train_step(state, rest, batch)
  params = jax.tree.leaves(state["params"])
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  metrics["split_params"] = sum(not x.sharding.is_fully_replicated for x in params)
  return metrics, [np.asarray(x) for x in params]

out = {"devices": jax.device_count()}
ref_metrics, ref = one_step(config(1, (1, 1, 1)), jax.devices()[:1])
initial = [np.asarray(x) for x in jax.tree.leaves(state0["params"])]
for name, micro in (("sharded", 1), ("sharded_micro", 2)):
  metrics, got = one_step(config(micro, (2, 2, 2)), jax.devices())
  out[name] = {"ref": ref_metrics, "sharded": metrics,
               "max_param_diff": max(float(np.abs(a - b).max()) for a, b in zip(ref, got)),
               "max_update": max(float(np.abs(a - b).max()) for a, b in zip(ref, initial))}
print("RESULT" + json.dumps(out))
"""


def test_sharded_step_equals_single_device(pieces):
  """data=2, fsdp=2, tensor=2 on 8 simulated devices = one device (also with 2 microbatches)."""
  _, path = pieces
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _SHARDED_STEP,
                           str(ROOT / "perceivers_jax/configs/tiny.py"), str(path)],
                          capture_output=True, text=True, timeout=600, env=env, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.split("RESULT", 1)[1])
  assert out["devices"] == 8
  for name in ("sharded", "sharded_micro"):
    ref, sharded = out[name]["ref"], out[name]["sharded"]
    assert sharded["split_params"] > 0  # the layout really splits parameters.
    for key in ("loss", "nll", "accuracy", "grad_norm", "targets"):
      assert sharded[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (name, key)
    assert out[name]["max_update"] > 1e-3  # the step changed the parameters...
    assert out[name]["max_param_diff"] < 1e-5, out[name]  # ...identically in both layouts.


_losses = slow_training_run.losses


def test_sigterm_then_rerun_resumes_exactly(resumed_runs):
  runs = resumed_runs
  assert runs.sigterm_returncode == 0, runs.sigterm_stderr[-3000:]
  saved = runs.saved_at_sigterm
  assert len(saved) == 1 and 3 <= saved[0] < 20, saved
  assert [s for s, _ in runs.losses_at_sigterm] == list(range(1, saved[0] + 1))
  resumed = _losses(runs.interrupted)
  assert [s for s, _ in resumed] == list(range(1, 21))  # no step repeated or skipped.
  assert resumed == _losses(runs.straight)  # bitwise-equal losses, before and after the restart.


def _saved_params(train, config, workdir):
  """{step: params} of every checkpoint in `workdir`, restored on this process's devices."""
  from perceivers_jax.state import checkpointing  # pylint: disable=g-import-not-at-top
  trainer = train.build_trainer_for(config)
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir), config.checkpoint,
                                    with_data_iter=False)
  saved = {s: jax.device_get(ckpt.restore(s, trainer.abstract_state)["params"])
           for s in ckpt.all_steps()}
  ckpt.close()
  return saved


def _diverging_config():
  config = _tiny_module().get_config()
  config.model.max_length, config.model.num_latents, config.model.num_latent_layers = 128, 16, 1
  config.train.warmup_steps = 0
  config.checkpoint.every_steps = config.log_every_steps = 1
  config.checkpoint.keep = 10
  config.eval.every_steps = 1000
  return config


def test_diverging_run_stops_with_a_clear_message_and_only_sane_checkpoints(pieces, tmp_path):
  """Learning rate 1e30 without gradient clipping: the update of step 3 is finite but moves
  the parameters to ~1e30 (the loss of step 3 is still fine). It is not applied, nothing from
  step 3 on is saved, and the message names the reason and step 2 as the last good
  checkpoint."""
  from perceivers_jax.training import train  # pylint: disable=g-import-not-at-top
  arrays, _ = pieces
  sources = dict(train_source=[{"tokens": arrays[0]}], eval_source=[{"tokens": arrays[0][:200]}])
  config = _diverging_config()
  config.train.num_steps, config.train.grad_clip_norm = 2, 0.0
  train.train_and_evaluate(config, str(tmp_path), **sources)
  config.train.learning_rate = 1e30
  config.train.num_steps = 6
  with pytest.raises(update_guard.RejectedUpdateError, match=(
      r"update of step 3: parameters beyond \+-1e\+06; an update too large for float32 to "
      r"measure its norm .* Stopping .* last good checkpoint is step 2 in ")):
    train.train_and_evaluate(config, str(tmp_path), **sources)
  saved = _saved_params(train, config, str(tmp_path))
  assert sorted(saved) == [1, 2]
  for params in saved.values():
    assert max(np.abs(leaf).max() for leaf in jax.tree.leaves(params)) < 1e6
  assert [s for s, _ in _losses(tmp_path)] == [1, 2]  # the rejected step 3 is not logged.
