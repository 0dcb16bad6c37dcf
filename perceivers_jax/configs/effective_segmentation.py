r"""Perceiver AR + Effective Segmentation (no Multi-Scale): the paper's middle ablation.

One full-context cross-attention layer trained on effective windows (every target position of
a piece is reachable, the first N included). Learning rate: see perceivers.py (rsqrt schedule,
0.03125 = 1024**-0.5, peak 3.1e-4).

  perceivers-train --config=perceivers_jax/configs/effective_segmentation.py \
      --workdir=/tmp/effseg --config.data.data_dir=$HOME/tensorflow_datasets
"""

import ml_collections

from perceivers_jax import config_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Effective Segmentation with a single full-context cross-attention, paper size."""
  return config_base.paper_config_without_variants(
      "effective_segmentation", arg, "perceivers_jax/configs/effective_segmentation.py")
