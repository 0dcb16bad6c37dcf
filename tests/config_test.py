"""Configs load, bad values fail before anything is built, dry run matches the model's size."""

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

from flax import nnx
import jax
import pytest

from perceivers_jax import config_base
from perceivers_jax.model import perceivers as model_lib
from perceivers_jax.parallel import mesh as mesh_lib
from perceivers_jax.state import model_state
from perceivers_jax.training import config_validation
from perceivers_jax.training import flops
from perceivers_jax.training import optimizer as optimizer_lib
from perceivers_jax.training import train

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "perceivers_jax" / "configs"


def load_config(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name,arg,windows,scales,scale_mask", [
    ("perceivers", None, "effective", (0, 1024), "sliding"),
    ("perceivers", "final_block", "effective", (0, 1024), "final_block"),
    ("perceiver_ar_baseline", None, "baseline", (0,), "sliding"),
    ("effective_segmentation", None, "effective", (0,), "sliding"),
    ("perceivers", "sum", "effective", (0, 1024), "sliding"),
    ("tiny", None, "effective", (0, 64), "sliding"),
    ("tiny", "final_block", "effective", (0, 64), "final_block"),
    ("reproduce_gpu_hour", None, "effective", (0, 256), "sliding"),
    ("tiny", "perceiver_ar", "baseline", (0,), "sliding"),
    ("tiny", "effective_segmentation", "effective", (0,), "sliding"),
    ("tiny", "effective_two_full", "effective", (0, 0), "sliding"),
    ("tiny", "perceivers_sum", "effective", (0, 64), "sliding"),
])
def test_configs_load_and_validate(name, arg, windows, scales, scale_mask):
  config = load_config(name, arg)
  assert config.data.windows == windows
  assert tuple(config.model.cross_attention_scales) == scales
  assert config.model.scale_mask == scale_mask
  assert config.model.combine == ("sum" if arg in ("sum", "perceivers_sum") else "cascade")
  config_validation.validate(config, num_devices=8)


@pytest.mark.parametrize("size", ["tiny", "reproduce_gpu_hour", "perceivers"])
def test_paper_models_differ_only_where_the_table_says(size):
  """One owner of the model variants; the control `effective_two_full` has PerceiverS's
  parameters (its depth) but no short scale, so Multi-Scale is compared at equal size."""
  base = load_config(size)
  fields = {}
  for name in config_base.PAPER_MODELS:
    config = config_base.paper_model(base, name)
    diff = {k for k, v in _flat(config.to_dict()).items() if _flat(base.to_dict())[k] != v}
    fields[name] = (diff, config.data.windows, tuple(config.model.cross_attention_scales),
                    config.model.combine)
  scales, w = "model.cross_attention_scales", tuple(base.model.cross_attention_scales)[1]
  assert fields == {
      "perceiver_ar": ({"data.windows", scales}, "baseline", (0,), "cascade"),
      "effective_segmentation": ({scales}, "effective", (0,), "cascade"),
      "perceivers": (set(), "effective", (0, w), "cascade"),
      "effective_two_full": ({scales}, "effective", (0, 0), "cascade"),
      "perceivers_sum": ({"model.combine"}, "effective", (0, w), "sum")}
  count = lambda name: model_state.count_params(
      model_state.param_shapes(config_base.paper_model(base, name).model))
  assert count("effective_two_full") == count("perceivers") > count("effective_segmentation")
  with pytest.raises(config_base.ConfigError, match="derived from a PerceiverS config"):
    config_base.paper_model(config_base.paper_model(base, "perceiver_ar"), "perceivers")


def _flat(tree: dict, prefix: str = "") -> dict:
  return {k: v for key, value in tree.items() for k, v in (
      _flat(value, f"{prefix}{key}.").items() if isinstance(value, dict)
      else [(f"{prefix}{key}", value)])}


def test_unknown_variant_is_rejected():
  with pytest.raises(ValueError, match="unknown variant 'nope'"):
    load_config("perceivers", "nope")


def _set(config, field, value):
  *parents, leaf = field.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


@pytest.mark.parametrize("field,value,devices,message", [
    ("model.num_latents", 2048, 1, "config.model.num_latents=2048"),
    ("model.attention_impl", "flash", 1, "config.model.attention_impl='flash'"),
    ("model.scale_mask", "diagonal", 1, "config.model.scale_mask='diagonal'"),
    ("model.combine", "mean", 1, "config.model.combine='mean'"),
    ("model.remat_policy", "some", 1, "config.model.remat_policy='some'"),
    ("model.cross_attention_scales", (0, -4), 1, "config.model.cross_attention_scales"),
    ("mesh.tensor", 3, 8, "config.mesh="),
    ("train.microbatches", 3, 1, "config.train.batch_size=8"),
    ("train.batch_size", 12, 8, "config.train.batch_size=12"),
    ("train.schedule", "linear", 1, "config.train.schedule='linear'"),
    ("data.windows", "random", 1, "config.data.windows='random'"),
    ("train.optimizer", "sgd", 1, "config.train.optimizer='sgd': must be one of adam, adamw"),
    ("train.weight_decay", 0.1, 1, "needs config.train.optimizer='adamw' (it is 'adam')"),
    ("train.on_bad_update", "ignore", 1, "config.train.on_bad_update='ignore'"),
    ("train.max_update_ratio", -1.0, 1, "config.train.max_update_ratio=-1.0: must be a number"),
    ("train.loss_spike_sigmas", -2.0, 1, "config.train.loss_spike_sigmas=-2.0: must be a number"),
    ("train.loss_spike_window", 2, 1, "config.train.loss_spike_window=2: must be an integer >= 4"),
    ("eval.max_targets_per_piece", -1, 1, "config.eval.max_targets_per_piece=-1"),
])
def test_bad_value_names_the_field(field, value, devices, message):
  config = load_config("tiny")
  _set(config, field, value)
  with pytest.raises(config_validation.ConfigError) as error:
    config_validation.validate(config, num_devices=devices)
  assert message in str(error.value)


def test_splash_needs_whole_blocks_of_latents_and_left_padded_windows():
  config = load_config("tiny")
  config.model.attention_impl = "splash"
  config.model.num_latents = 64
  with pytest.raises(config_validation.ConfigError, match="multiple of 128"):
    config_validation.validate(config, num_devices=1)
  config.model.num_latents = 128
  config_validation.validate(config, num_devices=1)
  config.data.padding_side = "right"
  with pytest.raises(config_validation.ConfigError, match="padding_side='left'"):
    config_validation.validate(config, num_devices=1)


def test_mesh_shape_fills_the_free_axis():
  config = load_config("tiny")
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, -1, 2
  assert mesh_lib.resolve_mesh_shape(config.mesh, 8) == (2, 2, 2)
  config.mesh.data = -1
  with pytest.raises(config_validation.ConfigError, match="at most one of data, fsdp, tensor"):
    mesh_lib.resolve_mesh_shape(config.mesh, 8)


def test_dcn_level_splits_slices_and_batch_fits_every_shard():
  """Multi-slice: data/fsdp/tensor split a slice's devices, dcn_* the slices; each mesh
  axis is the product of its two levels, and the batch must split over all of it."""
  config = load_config("tiny")
  config.mesh.update(data=1, fsdp=-1, tensor=1, dcn_data=-1)
  assert mesh_lib.resolve_mesh_levels(config.mesh, 32, 2) == ((1, 16, 1), (2, 1, 1))
  assert mesh_lib.resolve_mesh_shape(config.mesh, 32, 2) == (2, 16, 1)
  config.train.batch_size = config.eval.batch_size = 32
  config_validation.validate(config, num_devices=32, num_slices=2, process_count=8)
  config.train.batch_size = 16
  with pytest.raises(config_validation.ConfigError,
                     match=r"config.train.batch_size=16: .* 32 batch shards .* use a multiple "
                           r"of 32 \(e.g. --config.train.batch_size=32\)"):
    config_validation.validate(config, num_devices=32, num_slices=2, process_count=8)
  config.mesh.dcn_fsdp = -1
  with pytest.raises(config_validation.ConfigError, match="at most one of dcn_data, dcn_fsdp"):
    mesh_lib.resolve_mesh_shape(config.mesh, 32, 2)
  config.mesh.update(dcn_data=3, dcn_fsdp=1)
  with pytest.raises(config_validation.ConfigError, match="there are 2 slices"):
    mesh_lib.resolve_mesh_shape(config.mesh, 32, 2)


def test_bad_value_fails_before_building(monkeypatch, tmp_path):
  """Validation runs before the model is built, so nothing is traced or compiled."""
  config = load_config("tiny")
  config.model.num_latents = config.model.max_length + 1

  def must_not_build(*args, **kwargs):
    raise AssertionError("the trainer was built for an invalid config")

  monkeypatch.setattr(train, "build_trainer", must_not_build)
  with pytest.raises(config_validation.ConfigError, match="config.model.num_latents"):
    train.train_and_evaluate(config, str(tmp_path), train_source=[], eval_source=[])


def test_cli_rejects_bad_override(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "perceivers_jax.cli.train", f"--config={CONFIGS / 'tiny.py'}",
       f"--workdir={tmp_path}", "--config.model.attention_impl=flash"],
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode != 0
  assert "config.model.attention_impl='flash'" in result.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_dry_run_paper_size_matches_model_param_count():
  """`perceivers-train --dry_run` prints sizes from abstract shapes (no 1.3 GB of weights)."""
  result = subprocess.run(
      [sys.executable, "-m", "perceivers_jax.cli.train",
       f"--config={CONFIGS / 'perceivers.py'}", "--dry_run", "--dry_run_compile=false"],
      capture_output=True, text=True, timeout=300, check=True)
  report = json.loads(result.stdout.strip().splitlines()[-1])
  config = load_config("perceivers")
  model = nnx.eval_shape(lambda: model_lib.PerceiverS(config.model, rngs=nnx.Rngs(0)))
  expected = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert report["num_params"] == expected
  assert 300e6 < expected < 360e6  # 24 latent + 2 cross-attention layers of width 1,024.
  assert report["param_bytes_per_device"] == 4 * expected  # float32, one device.
  assert report["opt_state_bytes_per_device"] >= 8 * expected  # Adam mu and nu.


def test_flops_match_spec_reference():
  """Perceiver AR at paper size trains at 3.06 TFLOP per window (the perceiver-ar reference)."""
  baseline_flops = flops.train_flops_per_window(load_config("perceiver_ar_baseline").model)
  assert baseline_flops == pytest.approx(3.06e12, rel=0.01)
  # PerceiverS's windowed short scale (W=1,024) counts its N + W - 1 = 2,047 keys only; keyed
  # over all L (the masked full layer) it would add another 0.77 TFLOP.
  model = load_config("perceivers").model
  assert flops.train_flops_per_window(model) == pytest.approx(3.18e12, rel=0.01)
  model.windowed_scales = False
  assert flops.train_flops_per_window(model) == pytest.approx(3.95e12, rel=0.01)


def test_rsqrt_schedule_peaks_at_perceiver_ar_rate():
  config = load_config("perceivers")
  schedule = optimizer_lib.make_schedule(config.train)
  peak = float(schedule(config.train.warmup_steps))
  assert peak == pytest.approx(0.03125 / 100, rel=1e-5)  # 3.1e-4 at 10k warm-up steps.
  assert float(schedule(config.train.warmup_steps // 2)) == pytest.approx(peak / 2, rel=1e-4)
  assert float(schedule(4 * config.train.warmup_steps)) == pytest.approx(peak / 2, rel=1e-4)


def test_single_host_does_not_initialize_distributed(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
               "OMPI_COMM_WORLD_SIZE", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  called = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: called.append(a))
  assert not mesh_lib.initialize_distributed()
  monkeypatch.setenv("SLURM_NTASKS", "4")  # a multi-task SLURM job: jax auto-detects.
  assert mesh_lib.initialize_distributed()
  monkeypatch.delenv("SLURM_NTASKS")
  assert mesh_lib.initialize_distributed("10.0.0.1:1234", 2, 1)
  assert called == [(), ("10.0.0.1:1234", 2, 1)]
  with pytest.raises(ValueError, match="needs num_processes and process_id"):
    mesh_lib.initialize_distributed("10.0.0.1:1234")


def test_optimizer_field_selects_adam_or_adamw():
  """adamw decays the parameters (zero gradients still move them); adam does not."""
  config = load_config("tiny")
  params = {"w": jax.numpy.ones((3,))}
  grads = {"w": jax.numpy.zeros((3,))}
  config.train.warmup_steps, config.train.grad_clip_norm = 0, 0.0
  moved = {}
  for name, decay in (("adam", 0.0), ("adamw", 0.5)):
    config.train.optimizer, config.train.weight_decay = name, decay
    config_validation.validate(config, num_devices=1)
    optimizer = optimizer_lib.make_optimizer(config.train)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    moved[name] = float(jax.numpy.abs(updates["w"]).max())
  assert moved["adam"] == 0.0
  assert moved["adamw"] == pytest.approx(config.train.learning_rate * 0.5)
