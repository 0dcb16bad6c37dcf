"""`perceivers-train --dry_run`: sizes and the compiled step, from abstract shapes only.

On this host's devices, or with `compile_topology` on a TPU slice's (`parallel/topology.py`:
libtpu compiles for it from any host, as MaxText's train_compile.py): the mesh is built over
those devices and the real train step is compiled (the same function, shardings and batch
split a pod runs, kernels chosen for the target). The report: parameter count and bytes,
the compiled step's memory per device against the chip's HBM, FLOPs (the model's formula,
and XLA's count, which cannot see inside Mosaic kernels such as splash attention), the
collectives per step and the Mosaic/cuDNN kernel calls (`parallel/compiled.py`).
"""

import math
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from perceivers_jax.parallel import compiled as compiled_lib
from perceivers_jax.parallel import topology
from perceivers_jax.training import config_validation
from perceivers_jax.training import flops
from perceivers_jax.training import train
from perceivers_jax.training import train_step

# What lowers the training step's memory per device, for the does-not-fit line.
KNOBS = ("lower config.train.batch_size or raise config.train.microbatches, set "
         "config.model.remat_policy=full, or shard parameters and optimizer state over more "
         "devices with config.mesh.fsdp")


def _bytes_per_device(abstract_tree: Any) -> int:
  """Bytes one device holds of the arrays of `abstract_tree`, given their shardings."""
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


def dry_run(config: ml_collections.ConfigDict, *, compile_step: bool = True,
            compile_topology: str | None = None, num_slices: int = 1,
            compiler_options: dict[str, Any] | None = None) -> dict[str, Any]:
  """Sizes of `config` on this host's devices, or on `num_slices` slices of the TPU target
  `compile_topology` (e.g. "v5p-32"), from abstract shapes only (nothing trained).
  `compiler_options` go to XLA (the tests lower its optimisation effort to compile faster).

  Returns (and the CLI prints as one JSON line, `compiled.print_report`): parameter count,
  per-device bytes of parameters and optimizer state, train FLOPs per step and, when
  `compile_step` (always for a topology), the compiled step's memory per device,
  collectives, kernels, largest buffers and `does_not_fit`, one line when it exceeds the
  chip's HBM (`compiled.compile_report`).
  """
  target = topology.target(compile_topology) if compile_topology else None
  devices = topology.target_devices(compile_topology, num_slices) if target else jax.devices()
  trainer = train.build_trainer(config, config_validation.job_mesh(config, devices))
  params = trainer.abstract_state["params"]
  report: dict[str, Any] = {
      "num_params": trainer.num_params,
      "mesh": dict(trainer.mesh.shape),
      "devices": len(devices),
      "device_kind": devices[0].device_kind,
      "param_bytes_per_device": _bytes_per_device(params),
      "opt_state_bytes_per_device": _bytes_per_device(trainer.abstract_state["opt_state"]),
      "batch_size": config.train.batch_size,
      # The model's formula (flops.py); XLA's count below misses the Mosaic kernels' FLOPs.
      "train_flops_per_step": flops.train_flops_per_window(config.model) * config.train.batch_size,
  }
  if target:
    report.update(compile_topology=target.name, slices=num_slices)
  batch = train_step.abstract_batch(config, config.train.batch_size, trainer.batch_sharding)
  start = time.perf_counter()
  lowered = trainer.train_step.lower(trainer.abstract_state, trainer.abstract_rest, batch)
  report["lower_seconds"] = round(time.perf_counter() - start, 2)
  if compile_step or target:
    report.update(compiled_lib.compile_report(
        lowered, hbm_bytes=target.hbm_bytes if target else None, knobs=KNOBS,
        compiler_options=compiler_options))
  return report
