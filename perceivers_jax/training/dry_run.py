"""`perceivers-train --dry_run`: sizes and the compiled step's memory, from abstract shapes only."""

import json
import math
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from perceivers_jax.training import flops
from perceivers_jax.training import train

def _bytes_per_device(abstract_tree: Any) -> int:
  """Bytes one device holds of the arrays of `abstract_tree`, given their shardings."""
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


def dry_run(config: ml_collections.ConfigDict, *, compile_step: bool = True) -> dict[str, Any]:
  """Sizes of `config` on this host's devices, from abstract shapes only (nothing trained).

  Returns (and the CLI prints as one JSON line): parameter count, per-device bytes of
  parameters and optimizer state, train FLOPs per step and, when `compile_step`, the compiled
  train step's memory analysis (bytes per device: arguments, outputs, temporaries).
  """
  trainer = train.build_trainer_for(config)
  params = trainer.abstract_state["params"]
  report: dict[str, Any] = {
      "num_params": trainer.num_params,
      "mesh": dict(trainer.mesh.shape),
      "devices": jax.device_count(),
      "device_kind": jax.devices()[0].device_kind,
      "param_bytes_per_device": _bytes_per_device(params),
      "opt_state_bytes_per_device": _bytes_per_device(trainer.abstract_state["opt_state"]),
      "train_flops_per_step": flops.train_flops_per_window(config.model) * config.train.batch_size,
  }
  batch = train.abstract_batch(config, config.train.batch_size, trainer.batch_sharding)
  start = time.perf_counter()
  lowered = trainer.train_step.lower(trainer.abstract_state, trainer.abstract_rest, batch)
  report["lower_seconds"] = round(time.perf_counter() - start, 2)
  if compile_step:
    start = time.perf_counter()
    compiled = lowered.compile()
    report["compile_seconds"] = round(time.perf_counter() - start, 2)
    analysis = compiled.memory_analysis()
    if analysis is not None:
      memory = {name: int(getattr(analysis, f"{name}_size_in_bytes")) for name in (
          "argument", "output", "temp", "alias", "generated_code")}
      # Donated state aliases its output: live peak = arguments + outputs - aliased + temps.
      memory["estimated_peak"] = (memory["argument"] + memory["output"] - memory["alias"]
                                  + memory["temp"])
      report["compiled_memory_bytes_per_device"] = memory
  return report


def dry_run_json(config: ml_collections.ConfigDict, **kwargs) -> str:
  return json.dumps(dry_run(config, **kwargs), sort_keys=True)
