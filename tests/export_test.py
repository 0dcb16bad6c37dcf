"""Params-only export: written from a checkpoint trained on 8 devices, restored on 1;
Orbax and safetensors formats."""

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

from etils import epath
from flax import nnx
import jax
import numpy as np
import pytest
import safetensors

from perceivers_jax.model import param_groups
from perceivers_jax.model import perceivers as model_lib
from perceivers_jax.parallel import mesh as mesh_lib
from perceivers_jax.sampling import sampling
from perceivers_jax.state import checkpointing
from perceivers_jax.state import export
from perceivers_jax.state import model_state
from perceivers_jax.state import run_dir
from perceivers_jax.training import train
import tiny_model

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SAVE_ON_8 = r"""
import importlib.util, sys
import grain, jax, numpy as np
from perceivers_jax.state import checkpointing
from perceivers_jax.training import train
assert jax.device_count() == 8
spec = importlib.util.spec_from_file_location("tiny", sys.argv[1])
tiny = importlib.util.module_from_spec(spec); spec.loader.exec_module(tiny)
c = tiny.get_config()
c.model.max_length, c.model.num_latents, c.model.num_latent_layers = 256, 32, 1
c.model.embed_dim, c.model.num_heads, c.model.cross_attention_scales = 64, 2, (0, 16)
c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
trainer = train.build_trainer_for(c)
state, _ = trainer.init_fn()
head = state["params"]["head"]  # initialised to zero: random, so logits depend on every layer.
head["kernel"] = jax.device_put(jax.random.normal(jax.random.key(1), head["kernel"].shape) * 0.2,
                                head["kernel"].sharding)
assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state["params"]))
train._write_config(c, sys.argv[2])  # pylint: disable=protected-access
ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(sys.argv[2]), c.checkpoint)
data_iter = iter(grain.MapDataset.range(4).to_iter_dataset())
ckpt.save(2, state, data_iter, force=True)
ckpt.close()
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir (config.json + checkpoint 2) written by 8 simulated devices (2x2x2 mesh)."""
  tmp = tmp_path_factory.mktemp("export")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _SAVE_ON_8,
                           str(ROOT / "perceivers_jax/configs/tiny.py"), str(tmp / "run")], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return tmp / "run"


def test_export_restores_on_one_device(workdir, tmp_path):
  assert jax.device_count() == 1
  manifest = export.export(str(workdir), str(tmp_path / "f32"))
  config, params, loaded_manifest = run_dir.load_exported(str(tmp_path / "f32"))
  assert loaded_manifest == manifest
  assert manifest["step"] == 2 and manifest["dtype"] == "float32"
  assert manifest["source_workdir"] == str(workdir)
  config_text = (workdir / "config.json").read_text()
  assert manifest["config_sha256"] == hashlib.sha256(config_text.encode()).hexdigest()
  assert manifest["config"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2, "dcn_data": -1,
                                      "dcn_fsdp": 1, "dcn_tensor": 1}
  assert tuple(config.model.cross_attention_scales) == (0, 16)
  assert not (tmp_path / "f32" / "params" / "opt_state").exists()

  # The exported values are the checkpoint's parameters, read on one device.
  reference = train.build_trainer(config, mesh_lib.data_mesh())
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(str(workdir)), config.checkpoint,
                                    with_data_iter=False)
  state = ckpt.restore(2, reference.abstract_state)
  ckpt.close()
  assert manifest["num_params"] == model_state.count_params(state["params"]) == reference.num_params
  jax.tree.map(np.testing.assert_array_equal, params, state["params"])


def test_cli_bfloat16_export(workdir, tmp_path):
  output = tmp_path / "bf16"
  result = subprocess.run(
      [sys.executable, "-m", "perceivers_jax.cli.export", f"--workdir={workdir}",
       f"--output={output}", "--dtype=bfloat16", "--step=2"],
      capture_output=True, text=True, timeout=300, check=True)
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["dtype"] == "bfloat16" and summary["step"] == 2
  _, params, _ = run_dir.load_exported(str(output))
  leaves = jax.tree.leaves(params)
  assert all(leaf.dtype == np.dtype("bfloat16") for leaf in leaves)
  assert summary["num_params"] == sum(leaf.size for leaf in leaves)


def test_bad_requests_are_explained(workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match="--step=7 not among the saved steps"):
    export.export(str(workdir), str(tmp_path / "x"), step=7)
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    export.export(str(tmp_path), str(tmp_path / "y"))
  export.export(str(workdir), str(tmp_path / "z"))
  (tmp_path / "z" / "config.json").write_text("{}")
  with pytest.raises(ValueError, match="does not match the sha256"):
    run_dir.load_exported(str(tmp_path / "z"))


def test_existing_output_is_refused_or_replaced_whole(workdir, tmp_path):
  """An Orbax export replaced by a safetensors one with --overwrite: nothing of the old one
  stays (no mixed folder); without --overwrite the CLI names the fix."""
  output = tmp_path / "out"
  export.export(str(workdir), str(output))
  with pytest.raises(FileExistsError, match="exists: .* pass --overwrite"):
    export.export(str(workdir), str(output), file_format="safetensors")
  refused = subprocess.run([sys.executable, "-m", "perceivers_jax.cli.export",
                            f"--workdir={workdir}", f"--output={output}"],
                           capture_output=True, text=True, timeout=300, check=False)
  assert refused.returncode != 0 and "Traceback" not in refused.stderr
  assert f"--output={output} exists" in refused.stderr and "--overwrite" in refused.stderr
  subprocess.run([sys.executable, "-m", "perceivers_jax.cli.export", f"--workdir={workdir}",
                  f"--output={output}", "--format=safetensors", "--overwrite"],
                 capture_output=True, text=True, timeout=300, check=True)
  assert sorted(os.listdir(output)) == ["config.json", "manifest.json", "params.safetensors"]
  assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary or old folder left behind.
  _, _, manifest = run_dir.load_exported(str(output))
  assert manifest["format"] == run_dir.SAFETENSORS_FORMAT
  assert list(manifest["params_sha256"]) == ["params.safetensors"]


def test_a_failed_export_leaves_nothing_and_a_rerun_works(workdir, tmp_path, monkeypatch):
  def crash(*args, **kwargs):
    raise OSError("disk full")
  monkeypatch.setattr(export, "_write_safetensors", crash)
  with pytest.raises(OSError, match="disk full"):
    export.export(str(workdir), str(tmp_path / "st"), file_format="safetensors")
  assert not (tmp_path / "st").exists()
  monkeypatch.undo()
  export.export(str(workdir), str(tmp_path / "st"), file_format="safetensors")
  run_dir.load_exported(str(tmp_path / "st"))
  assert sorted(os.listdir(tmp_path)) == ["st"]


class _Killed(BaseException):
  """The export process dying at an injected point (no handler of the export catches it)."""


# Where an overwrite dies: while writing the new export; with it complete, before the old one
# moves aside; before the old one is deleted.
_KILL_POINTS = ("writing", "before_first_rename", "before_old_removal")

_KILL_BETWEEN_RENAMES = r"""
import os, signal, sys
from etils import epath
from perceivers_jax.state import export
path_type = type(epath.Path(sys.argv[2]))
rename = path_type.rename
renames = []

def rename_then_die(self, target):
  renames.append(target)
  if len(renames) == 2:  # the old export moved aside; the new one not yet in its place.
    os.kill(os.getpid(), signal.SIGKILL)
  return rename(self, target)

path_type.rename = rename_then_die
export.export(sys.argv[1], sys.argv[2], file_format="safetensors", overwrite=True)
"""


def _kill_at(point, monkeypatch):
  """Makes the next export die at `point` (_KILL_POINTS)."""
  path_type = type(epath.Path("/"))
  if point == "writing":
    def die(*args, **kwargs):
      raise _Killed
    monkeypatch.setattr(export, "_write_safetensors", die)
  elif point == "before_first_rename":
    def die(self, target):
      raise _Killed
    monkeypatch.setattr(path_type, "rename", die)
  else:
    rmtree = path_type.rmtree
    def die_before_the_old(self, *args, **kwargs):
      if self.name.endswith(".export-old"):
        raise _Killed
      return rmtree(self, *args, **kwargs)
    monkeypatch.setattr(path_type, "rmtree", die_before_the_old)


def _whole_exports(folder):
  """{name: format} of the whole exports in `folder`, temporary and old ones included."""
  found = {}
  for path in sorted(folder.iterdir()):
    try:
      found[path.name] = run_dir.check_export_files(path)["format"]
    except (OSError, ValueError, KeyError):
      pass
  return found


def test_an_overwrite_killed_at_any_point_leaves_a_whole_export(workdir, tmp_path,
                                                                 monkeypatch):
  """An Orbax export overwritten by a safetensors one, the process killed at each step (by
  SIGKILL between the two renames, where no --output folder exists): the old or the new export
  stays whole on disk, and the next export puts it back at --output; it keeps the new one once
  that was complete instead of deleting it."""
  old_export = tmp_path / "old_export"
  export.export(str(workdir), str(old_export))
  orbax, safetensors_format = run_dir.FORMATS["orbax"], run_dir.SAFETENSORS_FORMAT
  for point in _KILL_POINTS + ("between_renames",):
    folder = tmp_path / point
    folder.mkdir()
    output = folder / "out"
    shutil.copytree(old_export, output)
    if point == "between_renames":
      killed = subprocess.run([sys.executable, "-c", _KILL_BETWEEN_RENAMES, str(workdir),
                               str(output)], capture_output=True, text=True, timeout=300,
                              check=False)
      assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
      assert not output.exists()  # the moment the old export had no --output folder.
    else:
      with monkeypatch.context() as patch:
        _kill_at(point, patch)
        with pytest.raises(_Killed):
          export.export(str(workdir), str(output), file_format="safetensors", overwrite=True)
    assert _whole_exports(folder) == {
        "writing": {"out": orbax},
        "before_first_rename": {"out": orbax, ".out.export-tmp": safetensors_format},
        "between_renames": {".out.export-old": orbax, ".out.export-tmp": safetensors_format},
        "before_old_removal": {"out": safetensors_format, ".out.export-old": orbax},
    }[point], point

    # The next export dies while writing: what it recovered is at --output, whole.
    new_one_was_complete = point in ("between_renames", "before_old_removal")
    with monkeypatch.context() as patch:
      _kill_at("writing", patch)
      with pytest.raises(_Killed):
        export.export(str(workdir), str(output), file_format="safetensors", overwrite=True)
    _, _, manifest = run_dir.load_exported(str(output))
    assert manifest["format"] == (safetensors_format if new_one_was_complete else orbax), point
    assert not (folder / ".out.export-old").exists(), point

    export.export(str(workdir), str(output), file_format="safetensors", overwrite=True)
    assert sorted(os.listdir(folder)) == ["out"], point
    assert run_dir.load_exported(str(output))[2]["format"] == safetensors_format


def test_loading_checks_every_parameter_file(workdir, tmp_path):
  output = tmp_path / "orbax"
  manifest = export.export(str(workdir), str(output))
  assert len(manifest["params_sha256"]) > 1 and all(
      name.startswith("params/") for name in manifest["params_sha256"])
  # Change one byte of the largest parameter file.
  name = max(manifest["params_sha256"], key=lambda n: (output / n).stat().st_size)
  data = bytearray((output / name).read_bytes())
  data[len(data) // 2] ^= 1
  (output / name).write_bytes(bytes(data))
  with pytest.raises(ValueError, match=f"{name} does not match its sha256 in manifest.json"):
    run_dir.load_exported(str(output))
  (output / name).unlink()
  with pytest.raises(ValueError, match=f"{name} is missing"):
    run_dir.load_exported(str(output))


def _checkpoint_params(workdir: pathlib.Path):
  """(config, params of checkpoint 2 restored on this process's devices)."""
  config = run_dir.read_config(workdir)
  trainer = train.build_trainer(config, mesh_lib.data_mesh())
  return config, run_dir.restore_params(str(workdir), 2, trainer.abstract_state["params"])


def _fixed_batch():
  """Two left-padded rows of L=256: a full window at position 40 and a short piece start."""
  tokens = tiny_model.piece(400, seed=3)
  return tiny_model.batch([tiny_model.window(tokens[40:296], 40, length=256),
                           tiny_model.window(tokens[:90], 0, length=256)])


def test_safetensors_export_gives_identical_logits(workdir, tmp_path):
  config, reference_params = _checkpoint_params(workdir)
  output = tmp_path / "st32"
  manifest = export.export(str(workdir), str(output), file_format="safetensors")
  assert manifest["format"] == run_dir.SAFETENSORS_FORMAT
  assert json.loads((output / "manifest.json").read_text()) == manifest
  assert not (output / "params").exists()

  # Flat string names, scanned latent layers with their leading `layers` axis (S=1).
  with safetensors.safe_open(str(output / "params.safetensors"), framework="np") as f:
    names = set(f.keys())
    shapes = {name: tuple(f.get_slice(name).get_shape()) for name in names}
    metadata = f.metadata()
  assert names == set(param_groups.flatten(reference_params))
  assert all(isinstance(n, str) and n.replace(".", "").replace("_", "").isalnum() for n in names)
  assert shapes["cross_layers.1.attention.query_kernel"] == (64, 2, 32)
  assert shapes["latent_layers.attention.query_kernel"] == (1, 64, 2, 32)
  assert shapes["embed.embedding"] == (391, 64)
  assert metadata["format"] == run_dir.SAFETENSORS_FORMAT and metadata["step"] == "2"

  loaded_config, params, loaded_manifest = run_dir.load_exported(str(output))
  assert loaded_manifest == manifest and loaded_config.to_dict() == config.to_dict()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params),
               jax.device_get(reference_params))

  # The sampler's loader takes it unchanged; logits equal the checkpoint's bit for bit.
  reference = model_lib.PerceiverS(config.model, rngs=nnx.Rngs(0))
  param_state = nnx.state(reference, nnx.Param)
  nnx.replace_by_pure_dict(param_state, jax.device_get(reference_params))
  nnx.update(reference, param_state)
  forward, reference_state = tiny_model.jit_forward(reference)
  model, _, step = sampling.load_model(str(output))
  assert step == 2
  inputs_BL, positions_BL = _fixed_batch()
  logits_BNV = np.asarray(forward(reference_state, inputs_BL, positions_BL))
  assert logits_BNV.std() > 0.1 and np.abs(logits_BNV[0] - logits_BNV[1]).max() > 0.1
  np.testing.assert_array_equal(np.asarray(forward(nnx.split(model)[1], inputs_BL, positions_BL)),
                                logits_BNV)


def test_cli_bfloat16_safetensors_matches_orbax(workdir, tmp_path):
  output = tmp_path / "st16"
  result = subprocess.run(
      [sys.executable, "-m", "perceivers_jax.cli.export", f"--workdir={workdir}",
       f"--output={output}", "--dtype=bfloat16", "--format=safetensors"],
      capture_output=True, text=True, timeout=300, check=True)
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["format"] == run_dir.SAFETENSORS_FORMAT and summary["dtype"] == "bfloat16"
  with safetensors.safe_open(str(output / "params.safetensors"), framework="np") as f:
    assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
  export.export(str(workdir), str(tmp_path / "orbax16"), dtype="bfloat16")

  _, params, _ = run_dir.load_exported(str(output))
  _, orbax_params, _ = run_dir.load_exported(str(tmp_path / "orbax16"))
  assert all(leaf.dtype == np.dtype("bfloat16") for leaf in jax.tree.leaves(params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params),
               jax.device_get(orbax_params))
  model, _, _ = sampling.load_model(str(output))
  orbax_model, _, _ = sampling.load_model(str(tmp_path / "orbax16"))
  forward, orbax_state = tiny_model.jit_forward(orbax_model)
  inputs_BL, positions_BL = _fixed_batch()
  logits_BNV = np.asarray(forward(orbax_state, inputs_BL, positions_BL))
  assert logits_BNV.std() > 0.1
  np.testing.assert_array_equal(np.asarray(forward(nnx.split(model)[1], inputs_BL, positions_BL)),
                                logits_BNV)


def test_a_config_json_written_before_new_model_fields_loads_as_it_was_trained(workdir,
                                                                                tmp_path):
  """A workdir whose config.json predates layer_norm_epsilon, embedding_init and
  windowed_scales samples with the epsilon of the code that wrote it (1e-6)."""
  old = tmp_path / "old_run"
  old.mkdir()
  (old / "checkpoints").symlink_to(workdir / "checkpoints")
  config = json.loads((workdir / "config.json").read_text())
  for field in ("layer_norm_epsilon", "embedding_init", "windowed_scales"):
    del config["model"][field]
  (old / "config.json").write_text(json.dumps(config))
  model, loaded, step = sampling.load_model(str(old))
  assert step == 2
  assert loaded.model.layer_norm_epsilon == 1e-6 and not loaded.model.windowed_scales
  assert model.final_norm.epsilon == 1e-6
  reference, _, _ = sampling.load_model(str(workdir))
  assert reference.final_norm.epsilon == 1e-5
