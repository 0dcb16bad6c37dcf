"""perceivers_jax/parallel/gpu_target.py: compiling for H100 / H200 nodes on this CPU host.

The compiles run in a child process with JAX_PLATFORMS=cpu (what the CUDA plugin needs without
a GPU) and skip where jax's CUDA plugin is not installed (BUILD.md section 5)."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from perceivers_jax import config_base
from perceivers_jax.parallel import gpu_target

TESTS_DIR = pathlib.Path(__file__).resolve().parent


def test_names_give_the_card_and_the_gpu_count():
  assert gpu_target.parse("h100-8") == (gpu_target.CARDS["h100"], 8)
  assert gpu_target.parse("h200-16") == (gpu_target.CARDS["h200"], 16)
  assert gpu_target.parse("h100-1")[1] == 1
  for bad in ("a100-8", "h100-12", "h100-0", "h100", "v5p-8"):
    with pytest.raises(config_base.InputError, match="CARD-COUNT"):
      gpu_target.parse(bad)


def test_without_the_plugin_one_line_names_the_install(monkeypatch):
  monkeypatch.setattr(gpu_target, "_plugin_installed", lambda: False)
  with pytest.raises(config_base.InputError, match=r"pip install jax-cuda12-plugin==\S+ "):
    gpu_target.devices("h100-8")


def compile_cudnn_attention(name: str, kv_length: int) -> dict:
  """Runs in the child: forward + backward of the project's cuDNN attention (a mask, so a
  bias), batch 8 split over the GPUs of `name`; what the compiled executable holds."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax import sharding  # pylint: disable=g-import-not-at-top
  from perceivers_jax.model import attention, masks  # pylint: disable=g-import-not-at-top

  devices = gpu_target.devices(name)
  rows = sharding.NamedSharding(sharding.Mesh(np.array(devices), ("data",)),
                                sharding.PartitionSpec("data"))
  batch, num_queries, heads, head_dim = 8, 128, 4, 64

  def loss(q_BNHK, k_BLHK, v_BLHK):
    q_positions = jnp.broadcast_to(jnp.arange(kv_length - num_queries, kv_length),
                                   (batch, num_queries))
    kv_positions = jnp.broadcast_to(jnp.arange(kv_length), (batch, kv_length))
    mask = masks.causal_mask(q_positions, kv_positions, kv_positions >= 0)
    out = attention.dot_product_attention(q_BNHK, k_BLHK, v_BLHK, mask, impl="cudnn")
    return out.astype(jnp.float32).sum()

  q = jax.ShapeDtypeStruct((batch, num_queries, heads, head_dim), jnp.bfloat16, sharding=rows)
  kv = jax.ShapeDtypeStruct((batch, kv_length, heads, head_dim), jnp.bfloat16, sharding=rows)
  try:
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
  except NotImplementedError as e:  # jax's cuDNN constraints
    return {"refused": str(e)}
  hlo = compiled.as_text()
  calls = re.findall(r'= \((\w+)\[(\d+),[^\n]*custom_call_target="(__cudnn\$fmha\w*)"', hlo)
  return {"device_kind": devices[0].device_kind, "platform": devices[0].platform,
          "cudnn_calls": sorted({target for _, _, target in calls}),
          "call_batch": sorted({int(rows_) for _, rows_, _ in calls}),
          "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}


def _in_child(name: str, kv_length: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      [str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
  script = ("import json, gpu_target_test as t; "
            f"print('RESULT', json.dumps(t.compile_cudnn_attention({name!r}, {kv_length})))")
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
  line = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")]
  assert line, result.stderr[-4000:]
  return json.loads(line[0].removeprefix("RESULT "))


@pytest.mark.skipif(not gpu_target._plugin_installed(),  # pylint: disable=protected-access
                    reason="jax's CUDA plugin is not installed (BUILD.md section 5)")
def test_cudnn_attention_compiles_for_an_h100_node_and_keeps_cudnns_rules():
  compiled = _in_child("h100-8", kv_length=256)
  assert compiled["platform"] == "gpu" and compiled["device_kind"] == "NVIDIA H100 80GB HBM3"
  # The mask goes in as a bias; forward and backward are cuDNN's fused kernels, each GPU
  # running its own row of the batch of 8.
  assert compiled["cudnn_calls"] == ["__cudnn$fmhaScaleBiasSoftmax",
                                     "__cudnn$fmhaScaleBiasSoftmaxBackward"]
  assert compiled["call_batch"] == [1]
  assert compiled["temp_bytes"] > 0
  # An odd key count with a bias in training is refused, as on a GPU.
  assert "Unsupported sequence length Q 128, KV 255" in _in_child("h100-8", 255)["refused"]
