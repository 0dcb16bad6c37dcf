"""The attention kernel is a runtime choice: a model trained with `cudnn` trains, exports,
samples and fine-tunes on a machine without a GPU (the kernel is resolved when it is built)."""

import importlib.util
import logging
import pathlib

import jax
import numpy as np
import pytest

from perceivers_jax.data import tokens
from perceivers_jax.sampling import next_token
from perceivers_jax.sampling import sampling
from perceivers_jax.state import export
from perceivers_jax.training import train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cudnn_config():
  spec = importlib.util.spec_from_file_location("tiny", ROOT / "perceivers_jax/configs/tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.max_length, c.model.num_latents, c.model.num_latent_layers = 128, 16, 1
  c.model.embed_dim, c.model.num_heads, c.model.cross_attention_scales = 32, 2, (0, 8)
  c.model.attention_impl, c.model.dtype = "cudnn", "bfloat16"
  c.train.batch_size, c.train.num_steps, c.train.warmup_steps = 2, 2, 1
  c.eval.every_steps, c.eval.max_batches = 1000, 1
  c.checkpoint.every_steps = 2
  return c


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="tests the fallback off a GPU")
def test_cudnn_config_trains_exports_samples_and_finetunes_without_a_gpu(
    maestro_paths, tmp_path, caplog):
  pieces = [{"tokens": tokens.midi_file_to_tokens(p)[:600]} for p in maestro_paths[:2]]
  config = _cudnn_config()
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, str(tmp_path / "run"), train_source=pieces,
                             eval_source=pieces)
  assert "attention_impl='cudnn' cannot run on cpu" in caplog.text
  export.export(str(tmp_path / "run"), str(tmp_path / "export"))
  model, loaded, _ = sampling.load_model(str(tmp_path / "export"))
  assert loaded.model.attention_impl == "auto"  # an export records the kernel it was given
  assert {layer.attention.impl for layer in model.cross_layers} == {"xla"}
  # Batch 1: bf16 decoding at batch >= 2 past a latent reset is not exact yet.
  out, _ = sampling.generate(model, np.array([tokens.SOS_ID], np.int32),
                             jax.random.split(jax.random.key(0), 1), num_tokens=30,
                             sampling=next_token.SamplingConfig())
  assert out.shape == (1, 30)
  finetune = _cudnn_config()
  finetune.train.init_from = str(tmp_path / "export")
  train.train_and_evaluate(finetune, str(tmp_path / "finetune"), train_source=pieces,
                           eval_source=pieces)
  assert (tmp_path / "finetune" / "checkpoints").exists()
