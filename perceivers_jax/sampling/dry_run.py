"""`perceivers-sample --dry_run`: the decode loop compiled, from abstract shapes only.

The same program `sampling.generate_rows` runs (`decode.lower_generate`): the whole cached
loop for `--batch_size` rows split over a data-only mesh (padded to a multiple of its
devices, as sampling pads them), parameters replicated, kernels chosen for the target. On
this host's devices, or with `compile_topology` on a TPU slice's (`parallel/topology.py`).
The report: compiled memory per device against the chip's HBM, compile time, collectives
and kernel calls (`parallel/compiled.py`; ops inside the decode loop, whose length depends on
when the samples end, are counted once per token step).
"""

import time
from typing import Any

import jax
import ml_collections

from perceivers_jax.parallel import compiled as compiled_lib
from perceivers_jax.parallel import mesh as mesh_lib
from perceivers_jax.parallel import topology
from perceivers_jax.sampling import decode
from perceivers_jax.sampling import sampling
from perceivers_jax.state import model_state

KNOBS = ("lower --batch_size (rows per device) or --num_tokens (the output buffers), or "
         "sample on more devices")


def dry_run(config: ml_collections.ConfigDict, settings: sampling.SampleSettings, *,
            compile_topology: str | None = None, num_slices: int = 1,
            compiler_options: dict[str, Any] | None = None) -> dict[str, Any]:
  """The decode loop of `settings` for `config`'s model, compiled for this host's devices
  or for `num_slices` slices of the TPU target `compile_topology` (`compiler_options` to
  XLA); nothing is restored."""
  prompt_P = sampling.check_settings(settings, config.model)
  target = topology.target(compile_topology) if compile_topology else None
  devices = topology.target_devices(compile_topology, num_slices) if target else jax.devices()
  mesh = mesh_lib.data_mesh(devices)
  state = model_state.build(config, mesh)
  model = state.merge(state.abstract_params, state.abstract_rest)
  rows = -(-settings.batch_size // mesh.shape[sampling.DATA_AXIS]) * mesh.shape[sampling.DATA_AXIS]
  report: dict[str, Any] = {
      "num_params": state.num_params, "mesh": dict(mesh.shape), "devices": len(devices),
      "device_kind": devices[0].device_kind, "batch_size": settings.batch_size,
      "rows_per_device": rows // mesh.shape[sampling.DATA_AXIS],
      "num_tokens": settings.num_tokens, "prompt_tokens": len(prompt_P),
  }
  if target:
    report.update(compile_topology=target.name, slices=num_slices)
  start = time.perf_counter()
  lowered = decode.lower_generate(model, batch_size=rows, prompt_length=len(prompt_P),
                                  num_steps=settings.num_tokens, sampling=settings.sampling,
                                  mesh=mesh, batch_axis=sampling.DATA_AXIS)
  report["lower_seconds"] = round(time.perf_counter() - start, 2)
  report.update(compiled_lib.compile_report(
      lowered, hbm_bytes=target.hbm_bytes if target else None, knobs=KNOBS,
      compiler_options=compiler_options))
  return report
