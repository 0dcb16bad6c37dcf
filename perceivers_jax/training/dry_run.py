"""`perceivers-train --dry_run`: sizes and the compiled step's memory, from abstract shapes only."""

import collections
import json
import math
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from perceivers_jax.training import flops
from perceivers_jax.training import train

# `%name = f32[8,1024]{1,0} op(...), ..., metadata={op_name="jit(step)/..."}` in optimised HLO.
_HLO_VALUE = re.compile(r"^\s*(?:ROOT )?%\S+ = (\w+)\[([\d,]*)\]\S* ([\w-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def _value_bytes(dtype: str, dims: str) -> int:
  return math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES[dtype]


def largest_buffers(hlo_text: str, top: int = 10) -> list[dict[str, Any]]:
  """The largest array shapes materialised by an optimised HLO module, biggest first.

  Values inside fusions are skipped (they live in registers, not buffers). Each entry: the
  shape, the bytes of one such value, how many instructions produce one, and the jax ops
  (model code) that most often produce it. These are candidates, not a liveness analysis:
  the peak holds some of them at once.
  """
  counts: dict[str, int] = collections.Counter()
  sources: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  in_fusion = False
  for line in hlo_text.splitlines():
    if line and not line[0].isspace():  # a computation header (or its closing brace)
      in_fusion = "fused" in line.split("(")[0] or "fusion" in line.split("(")[0]
      continue
    match = _HLO_VALUE.match(line)
    if in_fusion or not match or match.group(1) not in _DTYPE_BYTES:
      continue
    dtype, dims, opcode = match.groups()
    if opcode in ("parameter", "constant", "bitcast", "get-tuple-element", "tuple"):
      continue
    shape = f"{dtype}[{dims}]"
    counts[shape] += 1
    op_name = _OP_NAME.search(line)
    # The last few name parts say which model code asked for the value.
    sources[shape]["/".join(op_name.group(1).split("/")[-3:]) if op_name else opcode] += 1
  ranked = sorted(counts, key=lambda shape: -_value_bytes(*shape[:-1].split("[")))[:top]
  return [{"shape": shape, "bytes": _value_bytes(*shape[:-1].split("[")),
           "count": counts[shape], "jax_ops": [name for name, _ in sources[shape].most_common(3)]}
          for shape in ranked]


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
  train step's memory analysis (bytes per device: arguments, outputs, temporaries) and its
  largest buffers (`largest_buffers`: what holds the memory).
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
    report["largest_buffers"] = largest_buffers(compiled.as_text())
  return report


def dry_run_json(config: ml_collections.ConfigDict, **kwargs) -> str:
  return json.dumps(dry_run(config, **kwargs), sort_keys=True)
