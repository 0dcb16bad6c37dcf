"""Compiled for the TPU slices it is for: libtpu compiles for a TPU topology on this CPU host.

The paper-size train step with `auto` (splash attention through Mosaic) on 4 chips (v5p-8,
data parallel) and on 2 slices of 4 (fsdp within a slice, data across slices), and the
paper-size decode loop on 4 chips; each compiles the program a pod runs (the dry runs'
`compile_topology`). Their XLA optimisation effort is lowered so that they compile in about a
minute each here; the program and its shardings are the same. `make test` installs libtpu;
without it these tests fail (they never skip).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from perceivers_jax import config_base
from perceivers_jax.model import attention
from perceivers_jax.model import masks
from perceivers_jax.model import splash
from perceivers_jax.parallel import mesh as mesh_lib
from perceivers_jax.parallel import partitioning
from perceivers_jax.parallel import topology

pytestmark = pytest.mark.tpu_compile
FAST = {"exec_time_optimization_effort": -1.0}


@pytest.fixture(scope="module", autouse=True)
def libtpu():
  if not topology.has_libtpu():
    pytest.fail("libtpu is not installed: `make test` installs it (or pip install -e '.[tpu]').")


def _paper_config(batch_size=8, **mesh):
  config = config_base.base_config()
  config.train.batch_size = config.eval.batch_size = batch_size
  config.mesh.update(mesh)
  return config


def test_splash_compiles_for_four_chips_inside_shard_map():
  """Splash forward and backward over a batch split on 4 v5p chips. Before its kernels ran
  per device, jax refused ("Mosaic kernels cannot be automatically partitioned"); before
  its tables were numpy, building them on the topology's devices failed ("'Executable'
  object has no attribute 'local_devices'")."""
  mesh = mesh_lib.data_mesh(topology.target_devices("v5p-8"))
  rules = config_base.base_config().logical_axis_rules
  batch, num_q, num_kv, heads, head_dim = 8, 128, 384, 2, 64
  positions = np.broadcast_to(np.arange(num_kv), (batch, num_kv))
  rows = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(
      (batch,) + shape, dtype, sharding=NamedSharding(mesh, PartitionSpec("data")))

  def loss(q, k, v):
    kv_pos = jnp.asarray(positions, jnp.int32)
    mask = masks.cross_attention_mask(kv_pos[:, -num_q:], kv_pos, kv_pos >= 0, scale=0,
                                      scale_mask="sliding")
    out = attention.dot_product_attention(q, k, v, mask, impl="splash", backend="tpu")
    return out.astype(jnp.float32).sum()

  with partitioning.activation_sharding(mesh, rules):
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
        rows(num_q, heads, head_dim), rows(num_kv, heads, head_dim), rows(num_kv, heads, head_dim))
  text = lowered.compile(FAST).as_text()
  assert text.count('custom_call_target="tpu_custom_call"') >= 3  # forward, dq, dkv
  # The kernel saw one device's rows: 8 over 4 chips.
  assert "bf16[2,2,128,64]" in text
  kernel = splash._kernel(num_q, num_kv, heads, 0, splash.BLOCK, False)  # pylint: disable=protected-access
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(kernel))


@pytest.fixture(scope="module")
def four_chip_step():
  from perceivers_jax.training import dry_run  # pylint: disable=g-import-not-at-top
  return dry_run.dry_run(_paper_config(8), compile_topology="v5p-8", compiler_options=FAST)


def test_paper_train_step_compiles_for_four_chips_with_splash(four_chip_step):
  report = four_chip_step
  assert report["devices"] == 4 and report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  # Every window call runs splash: 2 cross-attention layers and 24 latent layers, each
  # forward once more under remat, and one dq and one dkv kernel per layer.
  assert report["kernels"] == {"mosaic:splash_mha_fwd_segmented_residuals": 52,
                               "mosaic:splash_mha_dq_segmented_no_residuals": 26,
                               "mosaic:splash_mha_dkv_segmented_no_residuals": 26}
  # Data parallelism: the gradients' all-reduce (2 bytes per parameter: XLA sums the bf16
  # gradients of the bf16 matmuls before their float32 update), nothing gathered.
  assert set(report["collectives"]) == {"all-reduce"}
  assert report["collectives"]["all-reduce"]["bytes"] > 1.9 * report["num_params"]
  memory = report["compiled_memory_bytes_per_device"]
  assert memory["hbm"] == 95 * 2**30 and report["does_not_fit"] is None
  assert 3.9e9 < memory["argument"] < 4.0e9  # replicated parameters + Adam state
  assert report["xla_flops_per_device"] < report["train_flops_per_step"] / 4  # splash unseen


def test_paper_train_step_compiles_for_two_slices_with_fsdp():
  """8 chips as 2 slices of v5p-8: FSDP over each slice's 4 chips, data parallel across the
  slices (config.mesh.dcn_data)."""
  from perceivers_jax.training import dry_run  # pylint: disable=g-import-not-at-top
  report = dry_run.dry_run(_paper_config(8, data=1, fsdp=-1, dcn_data=-1),
                           compile_topology="v5p-8", num_slices=2, compiler_options=FAST)
  assert report["devices"] == 8 and report["slices"] == 2
  assert report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  assert {"all-gather", "all-reduce"} <= set(report["collectives"])  # FSDP gathers weights
  assert report["kernels"]["mosaic:splash_mha_fwd_segmented_residuals"] == 52
  assert report["param_bytes_per_device"] < 1.317e9 / 3  # sharded over the fsdp axis
  assert report["does_not_fit"] is None


def test_paper_decode_loop_compiles_for_four_chips():
  from perceivers_jax.sampling import dry_run  # pylint: disable=g-import-not-at-top
  from perceivers_jax.sampling import sampling  # pylint: disable=g-import-not-at-top
  config = config_base.base_config()
  report = dry_run.dry_run(config, sampling.SampleSettings(batch_size=16, num_tokens=2048),
                           compile_topology="v5p-8", compiler_options=FAST)
  assert report["devices"] == 4 and report["rows_per_device"] == 4
  assert report["kernels"] == {}  # the decoder's cached calls never run splash
  assert report["does_not_fit"] is None
  assert report["compiled_memory_bytes_per_device"]["argument"] > 1.3e9  # replicated params


def test_unknown_topology_and_bad_slices_fail_in_one_line():
  with pytest.raises(config_base.InputError, match="--compile_topology=v5p-7: unknown target"):
    topology.target_devices("v5p-7")
  with pytest.raises(config_base.InputError, match="compile_topology_num_slices=0"):
    topology.target_devices("v5p-8", 0)


def _cli(name, *args):
  import pathlib, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  return subprocess.run([sys.executable, "-m", f"perceivers_jax.cli.{name}", *args],
                        capture_output=True, text=True, timeout=900,
                        cwd=pathlib.Path(__file__).resolve().parent.parent)


def test_cli_names_an_unknown_target_and_a_config_that_does_not_fit():
  """One `error:` line each: a target that does not exist, and (compiled) a tiny model whose
  batch of 16,384 rows per chip cannot fit a v5e chip's 16 GiB."""
  unknown = _cli("train", "--config=configs/tiny.py", "--dry_run", "--compile_topology=v5p-7")
  assert unknown.returncode == 1, unknown.stderr[-2000:]
  assert unknown.stderr.strip().splitlines()[-1].startswith(
      "error: --compile_topology=v5p-7: unknown target; use one of v4-8,")
  too_big = _cli("train", "--config=configs/tiny.py", "--dry_run", "--compile_topology=v5e-4",
                 "--config.train.batch_size=65536", "--config.eval.batch_size=65536")
  last = too_big.stderr.strip().splitlines()[-1]
  assert too_big.returncode == 1 and last.startswith("error: does not fit:"), too_big.stderr[-3000:]
  assert "config.train.batch_size" in last and "config.mesh.fsdp" in last
  assert "Traceback" not in too_big.stderr
