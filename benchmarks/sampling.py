"""Cached sampling throughput: tokens/s of the decode loop, and its cache copies.

Builds the model of a config with random parameters (EOS suppressed, so every row runs the
full length), compiles and warms up, then times unconditional sampling of --num_tokens tokens
per row at each batch size (device synchronised). It also compiles the loop and counts, in
its optimised HLO, the copies/transposes of cache-sized buffers (at least one latent layer's
key cache) that run per plain decode step and per latent reset (`hlo_copies.py`).

With --baseline=REV, the decode module of git revision REV is imported from a temporary file
beside today's, and both run in this process, timed in alternation (A/B, best and median of
--repeats), so the two columns share the machine's load; --baseline_attention_impl gives the
baseline a model with the same parameters and another attention_impl. Prints a table and
writes JSON.

  python benchmarks/sampling.py                           # the tiny config, CPU, ~1 min
  python benchmarks/sampling.py --baseline=be0673f --baseline_attention_impl=xla \\
      --config.model.max_length=4096 --config.model.num_latents=256 \\
      --config.model.embed_dim=256 --config.model.num_heads=4 --config.model.head_dim=64 \\
      --config.model.num_latent_layers=4 "--config.model.cross_attention_scales=(0,256)" \\
      --num_tokens=320 --repeats=3                              # RESULTS.md's decode table
  python benchmarks/sampling.py --config=perceivers_jax/configs/perceivers.py \
      --num_tokens=2048   # GPU

The perceiver-ar reference (google-research/perceiver-ar, paper size, H200; RESULTS.md's GPU
table): 411 tokens/s at batch 1, 856 at batch 16.
"""

import importlib.util
import json
import pathlib
import platform
import statistics
import subprocess
import tempfile
import time

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from perceivers_jax.data import tokens
from perceivers_jax.model import perceivers as model_lib
from perceivers_jax.parallel import mesh as mesh_lib
from perceivers_jax.sampling import decode
from perceivers_jax.sampling import next_token
from perceivers_jax.sampling import sampling
from perceivers_jax.state import model_state
import hlo_copies  # benchmarks/hlo_copies.py, beside this script

ROOT = pathlib.Path(__file__).resolve().parents[1]
_CONFIG = config_flags.DEFINE_config_file("config", str(ROOT / "perceivers_jax/configs/tiny.py"),
                                          "Config file (perceivers_jax/configs/NAME.py[:variant]).")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 192,
                                   "Tokens per row (include latent resets: > N + 1).")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "16"], "Batch sizes.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs per batch and module (best kept).")
_BASELINE = flags.DEFINE_string("baseline", "", "Git revision whose decode module to time "
                                "against today's, in alternation (empty: today's only).")
_BASELINE_IMPL = flags.DEFINE_string("baseline_attention_impl", "", "The baseline's "
                                     "model.attention_impl (empty: the config's), on a model "
                                     "with the same parameters.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k filter (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Top-p filter (1 = off).")
_MIN_P = flags.DEFINE_float("min_p", 0.0, "Min-p filter (0 = off).")
_OUTPUT = flags.DEFINE_string("output", str(pathlib.Path(__file__).with_suffix(".json")),
                              "JSON results file.")

def baseline_decode(rev: str, directory: str):
  """The decode module of git revision `rev`, imported from a file under `directory`."""
  source = subprocess.run(["git", "show", f"{rev}:perceivers_jax/sampling/decode.py"],
                          cwd=ROOT, check=True, capture_output=True, text=True).stdout
  path = pathlib.Path(directory) / "decode_baseline.py"
  path.write_text(source)
  spec = importlib.util.spec_from_file_location("decode_baseline", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def build_model(config) -> model_lib.PerceiverS:
  """Random parameters, created on the device (jitted init); EOS made unreachable."""
  state = model_state.build(config, mesh_lib.data_mesh(jax.devices()[:1]))
  model = state.merge(*state.init())
  kernel = model.head.kernel  # zero-initialised: give the logits some spread.
  kernel.set_value(jax.random.normal(jax.random.key(1), kernel.get_value().shape,
                                     kernel.get_value().dtype) * 0.02)
  bias = model.head.bias
  bias.set_value(bias.get_value().at[tokens.EOS_ID].set(-1e9))
  return model


def _run(module, model, batch: int, num_tokens: int, sampling_config, seed: int) -> float:
  """Seconds for one unconditional `generate` call (host arrays returned: synchronised)."""
  prompt = np.full((batch, 1), tokens.SOS_ID, np.int32)
  keys = jnp.stack([sampling.sample_key(seed, i) for i in range(batch)])
  start = time.perf_counter()
  out = jax.device_get(module.generate(model, prompt, num_steps=num_tokens, keys_B=keys,
                                       sampling=sampling_config))
  seconds = time.perf_counter() - start
  assert out["num_steps"] == num_tokens, f"stopped after {out['num_steps']} of {num_tokens}"
  return seconds


def compiled_loop(module, model, batch: int, num_tokens: int, sampling_config):
  """The compiled `_generate` of `module` for unconditional rows (what `generate` runs)."""
  graphdef, state = nnx.split(model)
  n = model.num_latents
  return module._generate.lower(  # pylint: disable=protected-access
      graphdef, state, np.full((batch, 1), tokens.SOS_ID, np.int32), np.ones(batch, np.int32),
      jax.random.split(jax.random.key(0), batch), np.zeros(batch, np.int32),
      num_steps=num_tokens, sampling=sampling_config, num_reset_latents=n // 2,
      min_prompt_length=1, record_logits=False).compile()


def measure(modules: dict, batch: int, num_tokens: int, sampling_config,
            repeats: int) -> dict:
  """Per (module, model) of `modules`: compile cost, copies, and tokens/s of alternating
  timed runs."""
  result = {}
  for label, (module, model) in modules.items():
    cache_bytes = (batch * model.num_heads * model.num_latents * model.head_dim
                   * jnp.dtype(model.dtype).itemsize)
    compiled = compiled_loop(module, model, batch, num_tokens, sampling_config)
    memory = compiled.memory_analysis()
    start = time.perf_counter()
    _run(module, model, batch, num_tokens, sampling_config, 0)  # compile + warm-up
    result[label] = dict(compile_and_first_s=time.perf_counter() - start, times=[],
                         copies=hlo_copies.cache_copies(compiled.as_text(), cache_bytes),
                         temp_bytes=int(getattr(memory, "temp_size_in_bytes", 0)))
  for repeat in range(repeats):
    for label, (module, model) in modules.items():
      result[label]["times"].append(_run(module, model, batch, num_tokens, sampling_config,
                                         repeat + 1))
  for r in result.values():
    r.update(tokens_per_s=batch * num_tokens / min(r["times"]),
             median_tokens_per_s=batch * num_tokens / statistics.median(r["times"]),
             ms_per_step=1e3 * min(r["times"]) / num_tokens)
  return result


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  m = config.model
  sampling_config = next_token.SamplingConfig(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value,
                                          _MIN_P.value)
  model = build_model(config)
  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  with tempfile.TemporaryDirectory() as directory:
    modules = {"today": (decode, model)}
    if _BASELINE.value:
      baseline_model = model
      if _BASELINE_IMPL.value:
        baseline_config = config.copy_and_resolve_references()
        baseline_config.model.attention_impl = _BASELINE_IMPL.value
        baseline_model = build_model(baseline_config)
      modules = {f"baseline {_BASELINE.value}": (baseline_decode(_BASELINE.value, directory),
                                                 baseline_model),
                 "today": (decode, model)}
    results = {int(b): measure(modules, int(b), _NUM_TOKENS.value, sampling_config,
                               _REPEATS.value) for b in _BATCH_SIZES.value}
  device = jax.devices()[0]

  print(f"cached sampling: L={m.max_length:,}, N={m.num_latents:,}, width {m.embed_dim}, "
        f"{m.num_latent_layers} latent layers, scales {tuple(m.cross_attention_scales)}, "
        f"{m.dtype}, {m.attention_impl}, {num_params / 1e6:.1f}M params; {_NUM_TOKENS.value} "
        f"tokens per row; {device.device_kind} ({device.platform}), jax {jax.__version__}")
  print(f"{'module':>16s} {'batch':>5s} {'tokens/s best':>13s} {'median':>8s} "
        f"{'ms/step':>8s} {'copies/step':>11s} {'copies/reset':>12s} {'compile+1st s':>13s}")
  for batch, by_module in results.items():
    for label, r in by_module.items():
      print(f"{label:>16s} {batch:5d} {r['tokens_per_s']:13.1f} "
            f"{r['median_tokens_per_s']:8.1f} {r['ms_per_step']:8.2f} "
            f"{len(r['copies']['per_step']):11d} {len(r['copies']['per_reset']):12d} "
            f"{r['compile_and_first_s']:13.1f}")
      for op in r["copies"]["per_step"]:
        print(f"{'':>23s}per step: {op}")
  pathlib.Path(_OUTPUT.value).write_text(json.dumps({
      "model": m.to_dict(), "num_params": int(num_params), "device_kind": device.device_kind,
      "platform": device.platform, "jax_version": jax.__version__, "machine": platform.node(),
      "num_tokens": _NUM_TOKENS.value, "sampling": str(sampling_config),
      "results": results}, indent=2, default=str))
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
