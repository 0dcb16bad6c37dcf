"""Reading run directories (state/run_dir.py): a tiny workdir with checkpoints 1 and 3 and its
exports resolve from each kind of path to the parameters saved there; an old config.json gets
the fields it predates; a changed parameter file fails its sha256 check with one line."""

import json
import shutil

from absl import app
from absl import flags
import jax
import numpy as np
import pytest

from perceivers_jax import config_base
from perceivers_jax.cli import sample as sample_cli
from perceivers_jax.state import checkpointing
from perceivers_jax.state import export
from perceivers_jax.state import model_state
from perceivers_jax.state import run_dir
import tiny_model


def _config():
  config = config_base.base_config()
  config.model = tiny_model.tiny_model_config()
  return config


def _params_at(step: int, params):
  """Checkpoint `step`'s parameters: the initial ones times `step`, so steps differ."""
  return jax.tree.map(lambda x: x * step, params)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir with config.json and checkpoints 1 and 3, its float32 exports in both formats,
  checkpoint 1's and 3's params on the host)."""
  tmp = tmp_path_factory.mktemp("run_dir")
  workdir = tmp / "workdir"
  config = _config()
  params, _ = model_state.build_local(config).init()
  workdir.mkdir()
  (workdir / run_dir.CONFIG_FILE).write_text(config.to_json_best_effort(indent=2,
                                                                          sort_keys=True))
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(str(workdir)), config.checkpoint,
                                    with_data_iter=False)
  saved = {}
  for step in (1, 3):
    saved[step] = _params_at(step, params)
    ckpt.save(step, {"params": saved[step]}, force=True)
  ckpt.close()
  exports = {}
  for file_format in run_dir.FORMATS:
    exports[file_format] = tmp / file_format
    export.export(str(workdir), str(exports[file_format]), file_format=file_format)
  return workdir, exports, jax.device_get(saved)


def _assert_same(params, want):
  for got, expected in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(want),
                           strict=True):
    np.testing.assert_array_equal(got, expected)


def _load(path, step=None):
  """(directory, step, params) as sampling and perceivers-score read `path`."""
  directory, step = run_dir.resolve_path(str(path), step)
  config = run_dir.read_config(directory)
  step = run_dir.checkpoint_step(directory, config, step)
  abstract = model_state.build_local(config).abstract_params
  return directory, step, run_dir.restore_params(directory, step, abstract)


def test_each_kind_of_path_resolves_to_its_parameters(run):
  workdir, exports, saved = run
  directory, step, params = _load(workdir)
  assert (directory, step) == (str(workdir), 3)  # the latest checkpoint
  _assert_same(params, saved[3])
  directory, step, params = _load(workdir / checkpointing.CHECKPOINTS / "1")
  assert (directory, step) == (str(workdir), 1)
  _assert_same(params, saved[1])
  _assert_same(_load(workdir, 1)[2], saved[1])
  for path in exports.values():
    directory, step, params = _load(path)
    assert (directory, step) == (str(path), 3)
    _assert_same(params, saved[3])
  abstract = model_state.build_local(_config()).abstract_params
  for source in (workdir, exports["orbax"]):  # config.train.init_from
    _assert_same(run_dir.load_params(str(source), abstract)[0], saved[3])


def test_paths_and_steps_that_disagree_are_refused(run, tmp_path):
  workdir, exports, _ = run
  with pytest.raises(run_dir.RunDirError, match="--step=3 contradicts the checkpoint path"):
    run_dir.resolve_path(str(workdir / checkpointing.CHECKPOINTS / "1"), 3)
  with pytest.raises(run_dir.RunDirError, match="is an export of step 3"):
    _load(exports["safetensors"], 1)
  with pytest.raises(FileNotFoundError, match=r"--step=2 not among the saved steps \[1, 3\]"):
    _load(workdir, 2)
  with pytest.raises(FileNotFoundError, match="no such directory"):
    run_dir.resolve_path(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="no config.json there"):
    run_dir.read_config(tmp_path)


def test_an_old_config_gets_the_fields_it_predates(run, tmp_path):
  workdir, _, _ = run
  config = json.loads((workdir / run_dir.CONFIG_FILE).read_text())
  del config["model"]["layer_norm_epsilon"], config["model"]["windowed_scales"]
  (tmp_path / run_dir.CONFIG_FILE).write_text(json.dumps(config))
  loaded = run_dir.read_config(tmp_path, attention_impl="chunked")
  assert loaded.model.layer_norm_epsilon == 1e-6 and loaded.model.windowed_scales is False
  assert loaded.model.attention_impl == "chunked"


def test_a_changed_parameter_file_fails_its_sha256_check_in_one_line(run, tmp_path):
  _, exports, _ = run
  export_dir = tmp_path / "changed"
  shutil.copytree(exports["safetensors"], export_dir)
  params_file = export_dir / run_dir.PARAMS_PATHS[run_dir.SAFETENSORS_FORMAT]
  data = bytearray(params_file.read_bytes())
  data[-1] ^= 1  # one bit of the last parameter
  params_file.write_bytes(bytes(data))
  run_dir.check_export_files(exports["safetensors"])  # the untouched export still passes
  with pytest.raises(run_dir.RunDirError) as error:
    _load(export_dir)
  assert str(error.value) == (f"{params_file} does not match its sha256 in manifest.json: "
                              "export again (perceivers-export ... --overwrite).")
  flags.FLAGS.unparse_flags()  # perceivers-sample in-process, as sampling_test runs it
  flags.FLAGS(["perceivers-sample", f"--checkpoint={export_dir}",
               f"--output_dir={tmp_path / 'out'}"])
  with pytest.raises(app.UsageError) as error:
    sample_cli.main(["perceivers-sample"])
  flags.FLAGS.unparse_flags()
  assert str(error.value).splitlines() == [f"{params_file} does not match its sha256 in "
                                           "manifest.json: export again (perceivers-export "
                                           "... --overwrite)."]
