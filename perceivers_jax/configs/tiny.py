r"""PerceiverS at CPU size: the same code paths as perceivers.py, for tests and demos.

L=1,024 inputs, N=128 latents, width 128, 2 latent layers, 4 heads of 32, scales [full, 64],
float32, 0.9M parameters. The default 1,000 steps train in about ten minutes on two CPU
cores (measured: 400 steps of batch 8 plus two evaluations in 8.5 min on 2 shared cores,
1.4-2.4k predicted tokens/s; trained on 8 of the real MAESTRO pieces, validation NLL 4.02
nats on the other 2 against a training unigram entropy of 4.87):

  perceivers-train --config=perceivers_jax/configs/tiny.py --workdir=/tmp/perceivers_tiny \
      --config.data.data_dir=$HOME/tensorflow_datasets

The music evaluator is off here (README "Watching a run"): `--config.eval.music.every_evals=1`
samples and measures 16 pieces at every validation (sampling about a sixth of a 400-step
run's time with validation every 100 steps; the measuring and writing go on beside training).

Variants: `tiny.py:final_block` (short scale uses the final-block mask), and every model of
`config_base.PAPER_MODELS` at this size: `tiny.py:perceiver_ar` (one full cross-attention,
baseline windows), `:effective_segmentation`, `:perceivers` (the default), and the controls
`:effective_two_full` and `:perceivers_sum`.

Learning rate: a constant 2e-3 after 50 linear warm-up steps, reached quickly enough for a
few hundred steps; the paper-size configs use the rsqrt schedule (see perceivers.py).
"""

import ml_collections

from perceivers_jax import config_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Tiny PerceiverS; `arg` picks a variant (final_block | a PAPER_MODELS name)."""
  config = config_base.base_config()
  model = config.model
  model.max_length = 1024
  model.num_latents = 128
  model.embed_dim = 128
  model.num_heads = 4
  model.head_dim = 32
  model.num_latent_layers = 2
  model.cross_attention_scales = (config_base.FULL_CONTEXT, 64)
  model.dropout_rate = 0.0
  model.dtype = "float32"
  model.remat_policy = "none"

  config.train.batch_size = 8
  config.train.num_steps = 1000
  config.train.learning_rate = 2e-3
  config.train.schedule = "constant"
  config.train.warmup_steps = 50

  config.eval.every_steps = 250
  config.eval.batch_size = 8
  config.eval.max_batches = 0
  config.eval.music.every_evals = 0  # off unless asked (perceivers_jax/watch/music.py)

  config.checkpoint.every_steps = 250
  config.checkpoint.keep = 2
  config.log_every_steps = 20

  if arg == "final_block":
    model.scale_mask = "final_block"
  elif arg in config_base.PAPER_MODELS:
    return config_base.paper_model(config, arg)
  elif arg:
    raise ValueError(f"perceivers_jax/configs/tiny.py: unknown variant {arg!r}; use "
                     f"final_block or one of {', '.join(config_base.PAPER_MODELS)}.")
  return config
