r"""PerceiverS sized for the paper's comparison in about one GPU-hour (BUILD.md section 9).

L=4,096 inputs, N=512 latents, width 512, 6 latent layers, 8 heads of 64, scales [full, 256],
bfloat16, batch 32; cosine schedule to --steps. Trained on MAESTRO v3 (section 2), whose
validation split (137 pieces) gives every model 137 openings; every other model of
`config_base.PAPER_MODELS` is derived from it by `perceivers-reproduce`:

  perceivers-reproduce --config=perceivers_jax/configs/reproduce_gpu_hour.py \
      --data_dir=$HOME/tensorflow_datasets --workdir=$HOME/reproduce_gpu_hour \
      --steps=2500 --seeds=0,1,2 --num_samples=16 --sample_tokens=4096 \
      --opening_seconds=30 --eval_targets_per_piece=8192

Expected cost, from `perceivers-reproduce ... --dry_run` (parameters and FLOPs from the
abstract model and training/flops.py; no GPU was measured): 22.7M parameters for the
one-cross-attention models, 25.9M for PerceiverS and the size-matched control; 0.103, 0.116
and 0.137 TFLOP per training window (Perceiver AR and Effective Segmentation, PerceiverS, the
control); the four default models x 3 seeds x 2,500 steps of batch 32 are 110 PFLOP, 0.031
H100-hours at the datasheet peak. At 5% MFU (small matmuls; the Perceiver AR reference reached
13.6% at paper size) that is 37 minutes of training, plus compilation, evaluation and sampling
(16 x 4,096 tokens per stage), none of them measured.
"""

import ml_collections

from perceivers_jax import config_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """PerceiverS for the one-GPU-hour reproduction."""
  if arg:
    raise ValueError(
        f"perceivers_jax/configs/reproduce_gpu_hour.py has no variants (got {arg!r}).")
  config = config_base.base_config()
  config.model.update(dict(max_length=4096, num_latents=512, embed_dim=512, num_heads=8,
                           head_dim=64, num_latent_layers=6, remat_policy="none",
                           cross_attention_scales=(config_base.FULL_CONTEXT, 256)))
  config.train.update(dict(batch_size=32, learning_rate=1e-3, schedule="cosine",
                           warmup_steps=250))
  config.eval.batch_size = 32
  config.checkpoint.every_steps = 500
  config.log_every_steps = 100
  return config
