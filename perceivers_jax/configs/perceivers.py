r"""PerceiverS at the paper's size: Effective Segmentation + Multi-Scale cross-attention.

Two cross-attention layers in cascade, scales [full context, 1,024], over L=32,768 inputs with
N=1,024 latents, width 1,024 and 24 latent self-attention layers.

  perceivers-train --config=perceivers_jax/configs/perceivers.py --workdir=/tmp/perceivers \
      --config.data.data_dir=$HOME/tensorflow_datasets

Variants (`--config=perceivers_jax/configs/perceivers.py:VARIANT`):
  final_block: the paper's literal eq. 16 for the short scale (inputs before the last W
      positions of the window are hidden) instead of the sliding window.
  sum: the cross-attention layers run in parallel and their outputs are added (ablation).

Learning rate: the paper states "initial learning rate 0.03125" for Adam. 0.03125 = 1/32 =
1024**-0.5, the width factor of the Transformer's reciprocal-square-root schedule; with that
reading and 10k warm-up steps (Perceiver AR's default warm-up) the peak rate is
0.03125 / sqrt(10,000) = 3.1e-4, which is Perceiver AR's own base_lr (3e-4). Used literally as
an Adam step size, 0.03125 diverges. So the default is `schedule="rsqrt"`:
lr(t) = learning_rate * min(t * warmup**-1.5, t**-0.5) (see perceivers_jax/training/optimizer.py).
"""

import ml_collections

from perceivers_jax import config_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """PerceiverS, paper size; `arg` picks a variant (final_block | sum)."""
  config = config_base.base_config()  # scales [full, 1024], effective windows, cascade
  if arg == "final_block":
    config.model.scale_mask = "final_block"
    config.eval.music.every_evals = 0  # the cached decoder needs sliding windows
  elif arg == "sum":
    return config_base.paper_model(config, "perceivers_sum")
  elif arg:
    raise ValueError(f"perceivers_jax/configs/perceivers.py: unknown variant {arg!r}; use "
                     "final_block or sum.")
  return config_base.paper_model(config, "perceivers")
