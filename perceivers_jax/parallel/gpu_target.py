"""Compile-only devices of NVIDIA H100 / H200 nodes, for compiling on a host without a GPU.

XLA's GPU compiler needs no GPU once it is told the card: a `GpuTargetConfigProto` (compute
capability, SMs, shared memory, memory size and bandwidth). jax passes one to the CUDA PJRT
plugin through `jax.experimental.topologies.get_topology_desc(platform="cuda",
target_config=..., topology="1xHOSTSx8")` and returns devices that a `Mesh` and
`jax.jit(f).lower(...).compile()` accept, as libtpu's topologies do for TPUs. The executable
has the optimised HLO (fusions, collectives, the `__cudnn$fmha*` attention calls) and
`memory_analysis()` per GPU; jax's cuDNN constraints (even lengths with a mask in training,
head dims) are checked as on a GPU.

  JAX_PLATFORMS=cpu python -c 'from perceivers_jax.parallel import gpu_target;
      print(gpu_target.devices("h100-8"))'

Needs, beside the CPU jaxlib (BUILD.md section 5, "Compiling for GPUs without one"):
`pip install jax-cuda12-plugin==V jax-cuda12-pjrt==V "nvidia-cudnn-cu12>=9.8,<10"` with V the
installed jax version (cuDNN because jax reads its version before it emits a cuDNN call), and
JAX_PLATFORMS=cpu in the compiling process, so the plugin does not look for a GPU.
"""

import dataclasses
import importlib.util
import re

import jax
from jax.experimental import topologies

from perceivers_jax import config_base

GPUS_PER_NODE = 8


@dataclasses.dataclass(frozen=True)
class Card:
  """What XLA's GPU compiler reads about one card (NVIDIA's published figures)."""
  device_kind: str
  memory_bytes: int  # usable device memory, as the CUDA driver reports it
  memory_bandwidth: int  # bytes/s
  # Hopper (compute capability 9.0, SXM): the same SM for both cards.
  compute_capability: tuple[int, int] = (9, 0)
  num_sms: int = 132
  clock_ghz: float = 1.98
  l2_cache_bytes: int = 50 * 2**20
  shared_memory_per_sm: int = 228 * 2**10
  shared_memory_per_block_optin: int = 227 * 2**10
  cudnn_version: tuple[int, int, int] = (9, 10, 0)


CARDS = {
    "h100": Card("NVIDIA H100 80GB HBM3", memory_bytes=84_942_979_072,
                 memory_bandwidth=3_352_320_000_000),
    "h200": Card("NVIDIA H200 141GB HBM3e", memory_bytes=151_397_597_184,
                 memory_bandwidth=4_800_000_000_000),
}


def target_config(card: Card) -> str:
  """`card` as the text-format GpuTargetConfigProto the CUDA plugin parses."""
  major, minor = card.compute_capability
  dnn_major, dnn_minor, dnn_patch = card.cudnn_version
  return f"""
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {card.shared_memory_per_sm}
  shared_memory_per_block_optin: {card.shared_memory_per_block_optin}
  threads_per_core_limit: 2048
  core_count: {card.num_sms}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {card.memory_bandwidth}
  l2_cache_size: {card.l2_cache_bytes}
  clock_rate_ghz: {card.clock_ghz}
  device_memory_size: {card.memory_bytes}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability {{ major: {major} minor: {minor} }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: {dnn_major} minor: {dnn_minor} patch: {dnn_patch} }}
device_description_str: "{card.device_kind}"
"""


def parse(name: str) -> tuple[Card, int]:
  """`h100-8` / `h200-16`: the card and the GPU count (up to one node, or whole 8-GPU nodes)."""
  match = re.fullmatch(r"([a-z0-9]+)-(\d+)", name)
  card = CARDS.get(match.group(1)) if match else None
  count = int(match.group(2)) if match else 0
  if card is None or count < 1 or (count > GPUS_PER_NODE and count % GPUS_PER_NODE):
    raise config_base.InputError(
        f"GPU target {name!r}: use CARD-COUNT with CARD one of {', '.join(CARDS)} and COUNT "
        f"1 to {GPUS_PER_NODE} (one node) or a multiple of {GPUS_PER_NODE} (whole nodes), "
        "e.g. h100-8.")
  return card, count


def _plugin_installed() -> bool:
  if importlib.util.find_spec("jax_plugins") is None:  # the namespace of every jax plugin
    return False
  return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13))


def devices(name: str) -> list[jax.Device]:
  """Compile-only devices of `name` (see `parse`), one process per 8-GPU node."""
  card, count = parse(name)
  install = (f'pip install jax-cuda12-plugin=={jax.__version__} '
             f'jax-cuda12-pjrt=={jax.__version__} "nvidia-cudnn-cu12>=9.8,<10"')
  if not _plugin_installed():
    raise config_base.InputError(
        f"Compiling for {name} needs jax's CUDA plugin beside the CPU jaxlib: {install} "
        "(BUILD.md section 5).")
  nodes, per_node = max(1, count // GPUS_PER_NODE), min(count, GPUS_PER_NODE)
  try:
    topology = topologies.get_topology_desc(
        name, "cuda", target_config=target_config(card), topology=f"1x{nodes}x{per_node}")
  except NotImplementedError as e:  # the plugin's start-up looked for a GPU and gave up
    raise config_base.InputError(
        f"Compiling for {name} without a GPU needs JAX_PLATFORMS=cpu set before jax starts "
        f"(the CUDA plugin then skips its GPU checks): {e}") from e
  return topology.devices
