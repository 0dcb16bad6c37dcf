r"""Perceiver AR baseline as the PerceiverS paper describes it.

One full-context cross-attention layer and baseline windows (random start, only the final
N positions of each window are targets), otherwise the paper size of perceivers.py.

  perceivers-train --config=perceivers_jax/configs/perceiver_ar_baseline.py \
      --workdir=/tmp/perceiver_ar \
      --config.data.data_dir=$HOME/tensorflow_datasets

Learning rate: see perceivers.py (rsqrt schedule, 0.03125 = 1024**-0.5, peak 3.1e-4).
"""

import ml_collections

from perceivers_jax import config_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Perceiver AR baseline at paper size."""
  return config_base.paper_config_without_variants(
      "perceiver_ar", arg, "perceivers_jax/configs/perceiver_ar_baseline.py")
