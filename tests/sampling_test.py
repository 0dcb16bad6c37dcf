"""perceivers-sample on a tiny model trained for two steps: files, per-sample seeds, greedy
limits, primer continuation past L, MIDI round trip, fast failures, batch over devices, flags
derived from the settings, reruns that complete a killed run."""

import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

from absl import app
from absl import flags
from flax import nnx
import jax
import note_seq
import numpy as np
import pytest

from perceivers_jax.cli import sample as sample_cli
from perceivers_jax.data import tokens
from perceivers_jax.sampling import next_token
from perceivers_jax.sampling import job
from perceivers_jax.sampling import listening_page
from perceivers_jax.sampling import sampling
from perceivers_jax.state import export
from perceivers_jax.state import run_dir
from perceivers_jax.training import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
L = 64


def _tiny_config():
  spec = importlib.util.spec_from_file_location("tiny", ROOT / "perceivers_jax/configs/tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.update(dict(max_length=L, num_latents=16, embed_dim=32, num_heads=2, head_dim=16,
                           cross_attention_scales=(0, 8)))
  config.train.update(dict(batch_size=2, num_steps=2, warmup_steps=0))
  config.eval.update(dict(every_steps=2, max_batches=1, batch_size=2))
  config.checkpoint.every_steps = 2
  config.log_every_steps = 1
  return config


@pytest.fixture(scope="module")
def workdir(maestro_paths, tmp_path_factory) -> str:
  """A training workdir: two steps on the opening of a real performance."""
  piece = tokens.midi_file_to_tokens(maestro_paths[0])[:600]
  path = tmp_path_factory.mktemp("workdir")
  train.train_and_evaluate(_tiny_config(), str(path), train_source=[{"tokens": piece}],
                           eval_source=[{"tokens": piece[:200]}])
  return str(path)


@pytest.fixture(scope="module")
def loaded(workdir):
  return sampling.load_model(workdir)


def _cli(*argv: str) -> None:
  """Runs `perceivers-sample ARGV` in-process (absl flags re-parsed each time)."""
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["perceivers-sample", *argv])
  sample_cli.main(["perceivers-sample"])


def _notes_of_tokens(sequence) -> np.ndarray:
  return tokens.quantized_notes(tokens.tokens_to_note_sequence(sequence))


def _notes_of_midi(path) -> np.ndarray:
  return tokens.quantized_notes(tokens.load_note_sequence(path))


def test_cli_writes_samples_and_regenerates_one_alone(workdir, tmp_path):
  common = ("--num_samples=3", "--batch_size=2", "--num_tokens=40", "--seed=7")
  _cli(f"--workdir={workdir}", f"--output_dir={tmp_path / 'all'}", "--profile_steps=2",
       *common)
  names = sorted(os.listdir(tmp_path / "all"))
  assert names == sorted([f"sample_{i:04d}.{ext}" for i in range(3)
                          for ext in ("json", "mid", "npy", "png")]
                         + [job.RUN_FILE, job.MANIFEST, "index.html", sampling.PROFILE_DIR])
  # The second batch's profiler trace (the first compiles and is never traced).
  assert len(list((tmp_path / "all" / sampling.PROFILE_DIR).glob(
      "plugins/profile/*/*.xplane.pb"))) == 1
  runs = []
  for i in range(3):
    stem = tmp_path / "all" / f"sample_{i:04d}"
    sequence = np.load(stem.with_suffix(".npy"))
    sidecar = json.loads(stem.with_suffix(".json").read_text())
    assert sequence[0] == tokens.SOS_ID and sequence.dtype == np.int32
    assert sidecar["sample_index"] == i and sidecar["seed"] == 7
    assert sidecar["batch_slot"] == i % 2 and sidecar["checkpoint_step"] == 2
    assert sidecar["checkpoint_path"] == workdir and sidecar["primer"] is None
    assert sidecar["num_tokens"] == len(sequence) == 1 + sidecar["num_generated"]
    assert sidecar["eos_reached"] == (sequence[-1] == tokens.EOS_ID)
    assert sidecar["eos_reached"] or sidecar["num_generated"] == 40
    assert (sequence[1:-1] >= 3).all()  # no PAD/SOS/EOS inside
    assert sidecar["duration_seconds"] == pytest.approx(tokens.tokens_duration_seconds(sequence))
    assert "--sample_index=%d" % i in sidecar["regenerate"]
    # The MIDI file holds exactly the notes the tokens decode to.
    np.testing.assert_array_equal(_notes_of_midi(stem.with_suffix(".mid")),
                                  _notes_of_tokens(sequence))
    runs.append(sequence)
  assert not np.array_equal(runs[0], runs[1])  # each sample has its own seed.

  # Samples 2 (the padded last batch) and 1 (slot 1 of the first), regenerated alone, through
  # a checkpoint path this time.
  _cli(f"--checkpoint={workdir}/checkpoints/2", f"--output_dir={tmp_path / 'again'}",
       "--sample_index=2", "--sample_index=1", *common)
  assert sorted(os.listdir(tmp_path / "again")) == sorted([
      f"sample_{i:04d}.{ext}" for i in (1, 2) for ext in ("json", "mid", "npy", "png")] + [
          job.RUN_FILE, job.MANIFEST, "index.html"])
  for i in (1, 2):
    np.testing.assert_array_equal(np.load(tmp_path / "again" / f"sample_{i:04d}.npy"), runs[i])

  # A params-only export samples the same pieces.
  export.export(workdir, str(tmp_path / "export"))
  _cli(f"--checkpoint={tmp_path / 'export'}", f"--output_dir={tmp_path / 'exported'}",
       "--sample_index=0", *common)
  np.testing.assert_array_equal(np.load(tmp_path / "exported" / "sample_0000.npy"), runs[0])
  sidecar = json.loads((tmp_path / "exported" / "sample_0000.json").read_text())
  assert sidecar["checkpoint_step"] == 2


@pytest.mark.parametrize("argv,flag", [
    (("--num_tokens=0",), "--num_tokens"),
    (("--batch_size=0",), "--batch_size"),
    (("--top_p=0",), "--top_p"),
    (("--top_p=1.5",), "--top_p"),
    (("--temperature=-0.5",), "--temperature"),
    (("--min_p=1.5",), "--min_p"),
    (("--sample_index=3",), "--sample_index"),
    (("--primer_seconds=5",), "--primer_seconds"),  # without --primer
    (("--max_note_seconds=-1",), "--max_note_seconds"),
    (("--primer={primer}", "--primer_seconds=60"), "--primer_seconds"),  # > L tokens
    (("--max_seconds=-1",), "--max_seconds"),
    (("--primer={primer}", "--primer_seconds=1.5", "--max_seconds=1"), "--max_seconds"),
    (("--primer={workdir}/none.mid",), "--primer"),
    (("--step=5",), "--step"),
    (("--workdir={workdir}/missing",), "--workdir"),
    (("--checkpoint={workdir}",), "--workdir"),  # both given
])
def test_invalid_requests_fail_before_loading(argv, flag, workdir, maestro_paths, tmp_path,
                                              monkeypatch):
  def never(*args, **kwargs):
    raise AssertionError("restored or compiled before validating the request")
  monkeypatch.setattr(sampling.model_state, "build", never)
  monkeypatch.setattr(sampling.decode, "generate", never)
  argv = [a.format(workdir=workdir, primer=maestro_paths[0]) for a in argv]
  if not any(a.startswith("--workdir") for a in argv):
    argv.append(f"--workdir={workdir}")
  with pytest.raises(app.UsageError, match=flag):
    _cli(f"--output_dir={tmp_path}", "--num_samples=3", *argv)
  assert not os.listdir(tmp_path)


def test_greedy_limits(loaded):
  model = nnx.clone(loaded[0])
  # Logits of order 1 (the trained head is still nearly zero), so near-ties are rare.
  kernel = model.head.kernel
  kernel.set_value(jax.random.normal(jax.random.key(1), kernel.get_value().shape) * 0.2)
  prompt = np.array([tokens.SOS_ID], np.int32)

  def run(seed, **sampling_kwargs):
    keys = jax.numpy.stack([sampling.sample_key(seed, i) for i in range(2)])
    out, _ = sampling.generate(model, prompt, keys, num_tokens=40,
                               sampling=next_token.SamplingConfig(**sampling_kwargs))
    return out

  greedy = run(0, temperature=0.0)
  np.testing.assert_array_equal(run(0, temperature=0.0), greedy)
  np.testing.assert_array_equal(run(5, temperature=0.0), greedy)  # the seed plays no part
  np.testing.assert_array_equal(greedy[0], greedy[1])
  np.testing.assert_array_equal(run(3, top_k=1), greedy)
  np.testing.assert_array_equal(run(3, temperature=1e-4), greedy)
  sampled = run(3, temperature=1.0)
  assert not np.array_equal(sampled[0], sampled[1])  # rows draw with their own keys


def test_primer_continuation_past_context(loaded, maestro_paths, tmp_path):
  model, config, step = loaded
  primer = maestro_paths[1]
  settings = sampling.SampleSettings(num_samples=2, batch_size=2, num_tokens=80, seed=1,
                                     primer=str(primer), primer_seconds=1.5)
  sidecars = sampling.sample_to_dir(model, config, settings, tmp_path, checkpoint_step=step,
                                    checkpoint_path="workdir")
  piece = tokens.midi_file_to_tokens(primer)
  prompt = sampling.primer_prompt(primer, 1.5)
  size = len(prompt)
  assert 10 < size <= L
  # The cut: a prefix of the piece (EOS dropped), at most 1.5 s long; the next token is the
  # time shift that would pass 1.5 s.
  np.testing.assert_array_equal(prompt, piece[:size])
  assert tokens.tokens_duration_seconds(prompt) <= 1.5 < tokens.tokens_duration_seconds(
      piece[:size + 1])
  notes = tokens.quantized_notes(tokens.load_note_sequence(primer))
  end_step = round(tokens.tokens_duration_seconds(prompt) * tokens.STEPS_PER_SECOND)
  primer_notes = {tuple(n) for n in notes if n[1] <= end_step}
  assert primer_notes
  for i, sidecar in enumerate(sidecars):
    sequence = np.load(tmp_path / f"sample_{i:04d}.npy")
    np.testing.assert_array_equal(sequence[:size], prompt)
    assert sidecar["prompt_tokens"] == size and sidecar["primer_seconds"] == 1.5
    assert sidecar["num_tokens"] > L  # generation went on past the context
    midi_notes = _notes_of_midi(tmp_path / f"sample_{i:04d}.mid")
    np.testing.assert_array_equal(midi_notes, _notes_of_tokens(sequence))
    assert primer_notes <= {tuple(n) for n in midi_notes}  # the primer's notes, unchanged


def test_rows_stop_at_their_own_eos(loaded, tmp_path):
  model, config, _ = loaded
  model = nnx.clone(model)
  bias = model.head.bias
  bias.set_value(bias.get_value().at[tokens.EOS_ID].set(4.0))  # p(EOS) about 0.12 a step
  settings = sampling.SampleSettings(num_samples=2, batch_size=2, num_tokens=40, seed=3)
  sidecars = sampling.sample_to_dir(model, config, settings, tmp_path, checkpoint_step=2,
                                    checkpoint_path="workdir")
  lengths = []
  for i, sidecar in enumerate(sidecars):
    sequence = np.load(tmp_path / f"sample_{i:04d}.npy")
    assert sidecar["eos_reached"] and sequence[-1] == tokens.EOS_ID
    assert (sequence[1:-1] >= 3).all()  # nothing after the EOS was kept
    lengths.append(len(sequence))
  assert lengths[0] != lengths[1]  # one row went on after the other had ended


def test_untrained_model_samples(loaded, tmp_path):
  _, config, _ = loaded
  model = sampling.untrained_model(config)
  assert not np.asarray(model.head.kernel.get_value()).any()  # zero-initialised head
  settings = sampling.SampleSettings(num_samples=2, batch_size=2, num_tokens=40)
  sidecars = sampling.sample_to_dir(model, config, settings, tmp_path, checkpoint_step=0,
                                    checkpoint_path="(untrained)")
  assert [s["sample_index"] for s in sidecars] == [0, 1]
  assert all(s["num_tokens"] > 1 for s in sidecars)


def test_batch_plan():
  assert sampling.batch_plan(range(5), 2) == [[0, 1], [2, 3], [4, 4]]
  assert sampling.batch_plan([3], 4) == [[3, 3, 3, 3]]
  assert sampling.batch_plan([5, 1], 2) == [[1, 1], [5, 5]]


_SHARDED = r"""
import json, sys
import jax, numpy as np
from perceivers_jax.parallel import mesh as mesh_lib
from perceivers_jax.sampling import next_token
from perceivers_jax.sampling import sampling
prompt = np.array([2], np.int32)
keys = jax.numpy.stack([sampling.sample_key(0, i) for i in range(3)])
out = {}
for name, devices in (("one", jax.devices()[:1]), ("two", jax.devices())):
  model, _, _ = sampling.load_model(sys.argv[1], mesh=mesh_lib.data_mesh(devices))
  leaf = jax.tree.leaves(model.head.kernel.get_value())[0]
  tokens, _ = sampling.generate(model, prompt, keys, num_tokens=20,
                                sampling=next_token.SamplingConfig())
  out[name] = {"tokens": tokens.tolist(), "devices": len(leaf.sharding.device_set)}
print("RESULT" + json.dumps(out))
"""


def test_batch_split_over_devices_gives_the_same_samples(workdir):
  """3 rows over 2 simulated devices (padded to 4) equal the single-device samples."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _SHARDED, workdir], capture_output=True,
                          text=True, timeout=300, env=env, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.split("RESULT", 1)[1])
  assert out["one"]["devices"] == 1 and out["two"]["devices"] == 2
  assert np.array(out["two"]["tokens"]).shape == (3, 20)
  assert out["one"]["tokens"] == out["two"]["tokens"]


def test_max_seconds_bounds_every_written_piece(workdir, tmp_path):
  _cli(f"--workdir={workdir}", f"--output_dir={tmp_path}", "--num_samples=2", "--batch_size=2",
       "--num_tokens=200", "--max_seconds=0.5", "--end_seconds=0.2")
  for i in range(2):
    sequence = np.load(tmp_path / f"sample_{i:04d}.npy")
    sidecar = json.loads((tmp_path / f"sample_{i:04d}.json").read_text())
    assert tokens.tokens_duration_seconds(sequence) <= 0.5
    assert sidecar["settings"]["max_seconds"] == 0.5 and "--max_seconds=0.5" in sidecar["regenerate"]
    midi = note_seq.midi_file_to_note_sequence(str(tmp_path / f"sample_{i:04d}.mid"))
    assert midi.total_time <= 0.5 + 1e-6


def test_flags_are_the_settings_fields():
  """Each field of SampleSettings and of next_token.SamplingConfig is a flag, with its default and
  help; flag values round-trip."""
  fields = sampling.SampleSettings.flag_fields()
  assert {"num_samples", "seed", "primer", "top_p", "end_eos_nats_per_second"} <= {
      f.name for f in fields}
  for field in fields:
    flag = flags.FLAGS[field.name]
    assert flag.default == field.default and flag.help == field.metadata["help"]
  settings = sampling.SampleSettings.from_flag_values(dict(
      num_samples=3, top_k=5, end_seconds=2.0, primer="x.mid", primer_seconds=1.5))
  assert settings.sampling == next_token.SamplingConfig(top_k=5, end_seconds=2.0)
  assert sampling.SampleSettings.from_flag_values(settings.flag_values()) == settings
  with pytest.raises(sampling.SamplingError, match=r"^--min_p=2: must be in \[0, 1\]"):
    sampling.SampleSettings.from_flag_values(dict(min_p=2))


def test_rerun_writes_only_the_missing_samples(loaded, tmp_path, capsys):
  model, config, step = loaded
  settings = sampling.SampleSettings(num_samples=5, batch_size=2, num_tokens=30, seed=4)

  def run(settings=settings):
    return sampling.sample_to_dir(model, config, settings, tmp_path, checkpoint_step=step,
                                  checkpoint_path="workdir")

  assert [s["sample_index"] for s in run()] == [0, 1, 2, 3, 4]
  names = {p.name for p in tmp_path.iterdir()}
  # 5 samples in batches of 2: the padded slot of the last batch is not written.
  assert names == {f"sample_{i:04d}{suffix}" for i in range(5) for suffix in job.SUFFIXES} | {
      job.RUN_FILE, job.MANIFEST, listening_page.INDEX}
  before = {i: np.load(job.stem(tmp_path, i).with_suffix(".npy")) for i in range(5)}
  # What a killed run leaves: sample 3's sidecar half-written (a temporary file), sample 4
  # not started, no manifest.
  job.stem(tmp_path, 3).with_suffix(".json").rename(tmp_path / "sample_0003.json.0.tmp")
  for suffix in job.SUFFIXES:
    job.stem(tmp_path, 4).with_suffix(suffix).unlink()
  (tmp_path / job.MANIFEST).unlink()
  kept = {i: job.stem(tmp_path, i).with_suffix(".json").stat().st_mtime_ns for i in range(3)}
  capsys.readouterr()

  assert [s["sample_index"] for s in run()] == [3, 4]
  assert re.search(r"^Sampled 2 samples \(\d+ tokens\) in .* samples/s, \d+ tokens/s; 5 samples",
                   capsys.readouterr().out, re.M)
  assert {p.name for p in tmp_path.iterdir()} == names  # the temporary file is gone.
  for i in range(5):
    np.testing.assert_array_equal(np.load(job.stem(tmp_path, i).with_suffix(".npy")), before[i])
  for i, mtime in kept.items():
    assert job.stem(tmp_path, i).with_suffix(".json").stat().st_mtime_ns == mtime
  manifest = [json.loads(line) for line in (tmp_path / job.MANIFEST).read_text().splitlines()]
  assert [m["index"] for m in manifest] == list(range(5))
  for m in manifest:
    assert m["num_tokens"] == len(before[m["index"]]) and m["seed"] == 4
    assert m["files"] == [job.stem(tmp_path, m["index"]).with_suffix(s).name
                          for s in job.SUFFIXES]
    assert m["duration_seconds"] == pytest.approx(
        tokens.tokens_duration_seconds(before[m["index"]]))
  assert not run()  # complete: nothing left to do.
  # Another batch size completes the same job (tokens do not depend on it); other settings
  # would mix two jobs in one directory.
  assert not run(dataclasses.replace(settings, batch_size=4))
  with pytest.raises(sampling.SamplingError, match=r"^--seed=9: .* --seed=4 \(run.json\)"):
    run(dataclasses.replace(settings, seed=9))


def test_attention_impl_is_chosen_at_load_not_taken_from_config_json(workdir, tmp_path, caplog):
  """A config.json saying `cudnn` samples on CPU with --attention_impl=auto or xla (no
  fallback warning: the flag replaces the stored kernel); an export records the choice."""
  cudnn = tmp_path / "cudnn"
  shutil.copytree(workdir, cudnn)
  config = json.loads((cudnn / "config.json").read_text())
  config["model"]["attention_impl"] = "cudnn"
  (cudnn / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
  for impl in ("auto", "xla"):
    caplog.clear()
    _cli(f"--workdir={cudnn}", f"--output_dir={tmp_path / impl}", "--num_samples=2",
         "--batch_size=2", "--num_tokens=20", f"--attention_impl={impl}")
    assert len((tmp_path / impl / job.MANIFEST).read_text().splitlines()) == 2
    assert "attention_impl='cudnn'" not in caplog.text
  model, loaded_config, _ = sampling.load_model(str(cudnn), attention_impl="chunked")
  assert loaded_config.model.attention_impl == "chunked"
  assert {layer.attention.impl for layer in model.cross_layers} == {"chunked"}
  with pytest.raises(run_dir.RunDirError, match="--attention_impl='splash!'"):
    run_dir.read_config(str(cudnn), "splash!")
  # Choice: an export's config.json records --attention_impl (default auto: backend-neutral).
  manifest = export.export(str(cudnn), str(tmp_path / "export"))
  assert manifest["config"]["model"]["attention_impl"] == "auto"
  exported = run_dir.read_config(tmp_path / "export")
  assert exported.model.attention_impl == "auto"
  export.export(str(cudnn), str(tmp_path / "export_xla"), attention_impl="xla")
  assert run_dir.read_config(str(tmp_path / "export_xla")).model.attention_impl == "xla"
  with pytest.raises(ValueError, match="--attention_impl='splash!'"):
    export.export(str(cudnn), str(tmp_path / "bad"), attention_impl="splash!")
