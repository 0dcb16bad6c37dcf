"""Fine-tuning: init_from an export or a workdir, frozen groups, resume, bad names."""

import importlib.util
import json
import pathlib

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import unigram
from perceivers_jax.data import tokens
from perceivers_jax.state import checkpointing
from perceivers_jax.state import export
from perceivers_jax.state import run_dir
from perceivers_jax.training import config_validation
from perceivers_jax.training import validation
from perceivers_jax.training import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
FROZEN = ("embed", "cross_layers")
STEPS = 60


def _config(seed: int = 0):
  spec = importlib.util.spec_from_file_location("tiny", ROOT / "perceivers_jax/configs/tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.seed = seed
  c.model.max_length, c.model.num_latents, c.model.num_latent_layers = 256, 32, 1
  c.model.embed_dim, c.model.num_heads, c.model.cross_attention_scales = 64, 2, (0, 16)
  c.train.num_steps, c.train.warmup_steps = STEPS, 5
  c.eval.every_steps, c.eval.max_batches = 1000, 4
  c.checkpoint.every_steps = 10
  c.log_every_steps = 1
  return c


@pytest.fixture(scope="module")
def sources(maestro_paths):
  """Two real pieces to fine-tune on; their first 1,500 tokens to measure NLL."""
  arrays = [tokens.midi_file_to_tokens(p) for p in maestro_paths[3:5]]
  return [{"tokens": a} for a in arrays], [{"tokens": a[:1500]} for a in arrays]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A workdir holding a seed-1 model at step 3, and its exports in both formats and dtypes."""
  tmp = tmp_path_factory.mktemp("pretrained")
  workdir = str(tmp / "run")
  config = _config(seed=1)
  trainer = train.build_trainer_for(config)
  state, _ = trainer.init_fn()
  train._write_config(config, workdir)  # pylint: disable=protected-access
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir), config.checkpoint)
  ckpt.save(3, state, iter(grain.MapDataset.range(2).to_iter_dataset()), force=True)
  ckpt.close()
  export.export(workdir, str(tmp / "orbax"))
  export.export(workdir, str(tmp / "safetensors"), file_format="safetensors")
  for file_format in ("orbax", "safetensors"):
    export.export(workdir, str(tmp / f"{file_format}_bf16"), dtype="bfloat16",
                  file_format=file_format)
  return {"workdir": workdir, "params": jax.device_get(state["params"]),
          **{name: str(tmp / name) for name in ("orbax", "safetensors", "orbax_bf16",
                                                "safetensors_bf16")}}


def _finetune_config(init_from: str):
  config = _config(seed=0)  # another seed: frozen values equal to the export's prove the load.
  config.train.init_from = init_from
  config.train.freeze = FROZEN
  return config


def _params_at(workdir: str, step: int, config) -> dict:
  trainer = train.build_trainer_for(config)
  return jax.device_get(run_dir.restore_params(workdir, step, trainer.abstract_state["params"]))


def _train_losses(workdir: pathlib.Path) -> list[tuple[int, float]]:
  records = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
  return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def _assert_frozen_kept(params: dict, pretrained_params: dict) -> None:
  for group in FROZEN:
    jax.tree.map(np.testing.assert_array_equal, params[group], pretrained_params[group])
  assert not np.array_equal(params["head"]["kernel"], pretrained_params["head"]["kernel"])
  assert not np.array_equal(params["latent_layers"]["mlp"]["wi"]["kernel"],
                            pretrained_params["latent_layers"]["mlp"]["wi"]["kernel"])


@pytest.fixture(scope="module")
def finetuned(pretrained, sources, tmp_path_factory):
  """NLL on the two pieces before and after fine-tuning the export on them for STEPS steps."""
  train_source, eval_source = sources
  config = _finetune_config(pretrained["orbax"])
  trainer = train.build_trainer_for(config)
  params = train.pretrained_params(trainer, pretrained["orbax"])
  before = validation.run_evaluation(trainer, params, trainer.init_rest(),
                                     validation.eval_batches(config, eval_source))
  workdir = tmp_path_factory.mktemp("finetune")
  after = train.train_and_evaluate(config, str(workdir), train_source=train_source,
                                   eval_source=eval_source)
  return {"config": config, "workdir": workdir, "before": before, "after": after}


def test_finetune_from_export_beats_token_frequencies_and_keeps_frozen_groups(
    pretrained, finetuned, sources):
  before, after = finetuned["before"]["nll"], finetuned["after"]["nll"]
  train_source, eval_source = sources
  bar = unigram.frequency_only_nll([s["tokens"] for s in train_source],
                                   [s["tokens"] for s in eval_source])
  assert after < bar < before, (before, bar, after)
  assert [s for s, _ in _train_losses(finetuned["workdir"])] == list(range(1, STEPS + 1))
  params = _params_at(str(finetuned["workdir"]), STEPS, finetuned["config"])
  _assert_frozen_kept(params, pretrained["params"])


def test_resume_continues_from_the_workdir(pretrained, finetuned, sources, monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError(f"init_from read again on resume: {args} {kwargs}")

  monkeypatch.setattr(run_dir, "load_params", refuse)
  config = _finetune_config(pretrained["orbax"])
  config.train.num_steps = STEPS + 5
  train_source, eval_source = sources
  train.train_and_evaluate(config, str(finetuned["workdir"]), train_source=train_source,
                           eval_source=eval_source)
  losses = dict(_train_losses(finetuned["workdir"]))
  assert sorted(losses) == list(range(1, STEPS + 6))  # steps STEPS+1.. only: no restart at 0.
  # The resumed loss continues from step STEPS's, far below the loss fine-tuning began at.
  assert abs(losses[STEPS + 1] - losses[STEPS]) < 0.5 * (losses[1] - losses[STEPS])
  _assert_frozen_kept(_params_at(str(finetuned["workdir"]), STEPS + 5, config),
                      pretrained["params"])


def test_init_from_any_source_gives_the_same_params(pretrained):
  trainer = train.build_trainer_for(_config())
  abstract = trainer.abstract_state["params"]
  for source in ("workdir", "orbax", "safetensors"):
    params, description = run_dir.load_params(pretrained[source], abstract)
    assert pretrained[source] in description
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), pretrained["params"])
  # bfloat16 exports come back as the run's float32, equal to the rounded parameters.
  rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(np.float32), pretrained["params"])
  for source in ("orbax_bf16", "safetensors_bf16"):
    params, _ = run_dir.load_params(pretrained[source], abstract)
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), rounded)


@pytest.mark.parametrize("source", ["workdir", "orbax", "safetensors"])
def test_shape_mismatch_names_the_parameter(pretrained, source):
  config = _config()
  config.model.embed_dim = 32
  abstract = train.build_trainer_for(config).abstract_state["params"]
  with pytest.raises(ValueError, match=r"Parameter 'cross_layers\.0\.attention\.key_kernel' has "
                                       r"shape \(64, 2, 32\) in .* but \(32, 2, 32\)"):
    run_dir.load_params(pretrained[source], abstract)


def test_init_from_nothing_is_explained(tmp_path):
  abstract = train.build_trainer_for(_config()).abstract_state["params"]
  with pytest.raises(FileNotFoundError, match="init_from=.*neither a perceivers-export"):
    run_dir.load_params(str(tmp_path), abstract)


@pytest.mark.parametrize("freeze,message", [
    (("embed", "embeddings"), r"'embeddings' names no parameter group.*embed, latent_init"),
    (("latent_layers.0",), r"'latent_layers\.0' names no parameter group"),  # scanned layers
    (("embed", 1), "must be a tuple of group names"),
    (("embed", "latent_init", "cross_layers", "latent_layers", "final_norm", "head"),
     "nothing left to train"),
])
def test_bad_freeze_fails_before_building(freeze, message, tmp_path):
  config = _config()
  config.train.freeze = freeze
  with pytest.raises(config_validation.ConfigError, match=r"config\.train\.freeze=.*" + message):
    config_validation.validate(config, num_devices=1)
  if freeze == ("embed", "embeddings"):  # the training entry point checks it first of all.
    with pytest.raises(config_validation.ConfigError, match="config.train.freeze"):
      train.train_and_evaluate(config, str(tmp_path), train_source=[], eval_source=[])
  # Finer groups are fine: one cross layer, one kind of sublayer in every latent layer.
  config.train.freeze = ("cross_layers.1", "latent_layers.mlp", "head.bias")
  config_validation.validate(config, num_devices=1)
