"""Train-step speed of a config on whatever backend jax finds: step time, tokens/s, MFU, memory.

Builds the model sharded over all local devices (config.mesh), warms up (compilation), then
times steps with device sync and reports medians. Tokens/s counts predicted slots (batch x N,
as SPEC 6), over all chips and per chip; TFLOP/s and MFU use 3 x forward matmul FLOPs per window
(`perceivers_jax.training.flops.train_flops_per_window`, every cross-attention layer included) and the
device's peak (`flops.PEAK_TFLOPS`, or --peak_tflops). Batches are windows of random tokens
with real window structure (left padding, positions), so masks and gathers are exercised.

  python benchmarks/train_step.py --config=configs/tiny.py                    # CPU
  python benchmarks/train_step.py --config=configs/perceivers.py \\
      --config.model.attention_impl=cudnn --config.train.batch_size=8           # GPU, paper size

With --ab_windowed the same config is also built with windowed_scales=False (every
cross-attention layer keyed over all L inputs, masked: the code path before windowed sliding
scales) and the two are timed interleaved in one process, each with its compiled FLOPs
(cost_analysis) and memory (memory_analysis):

  python benchmarks/train_step.py --config=configs/tiny.py --ab_windowed \
      --config.model.max_length=4096 --config.model.num_latents=256 \
      --config.model.embed_dim=256 --config.model.num_heads=4 --config.model.head_dim=64 \
      --config.model.num_latent_layers=4 --config.model.cross_attention_scales=0,256 \
      --config.train.batch_size=2

Prints a table row per variant and writes benchmarks/train_step.json (or --output).
"""

import json
import pathlib
import platform
import statistics
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file to benchmark.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps (the first compiles).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device (0: table/unknown).")
_AB_WINDOWED = flags.DEFINE_bool("ab_windowed", False,
                                 "Also time windowed_scales=False, interleaved (A/B).")
_OUTPUT = flags.DEFINE_string("output", str(pathlib.Path(__file__).with_suffix(".json")),
                              "JSON file to write.")


def _batch(config, rng: np.random.Generator) -> dict[str, np.ndarray]:
  from perceivers_jax.data import tokens  # pylint: disable=g-import-not-at-top
  from perceivers_jax.data import windows  # pylint: disable=g-import-not-at-top
  length, latents = config.model.max_length, config.model.num_latents
  rows = []
  for _ in range(config.train.batch_size // jax.process_count()):
    piece = rng.integers(3, tokens.VOCAB_SIZE, size=2 * length).astype(np.int32)
    piece[0], piece[-1] = tokens.SOS_ID, tokens.EOS_ID
    rows.append(windows.random_window(piece, rng, config.data.windows, max_length=length,
                                      num_latents=latents, padding_side=config.data.padding_side))
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _peak_memory_bytes() -> int | None:
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  return max(peaks) if all(p is not None for p in peaks) else None


def _compiled_figures(trainer, state, rest, batch) -> dict[str, float | None]:
  """FLOPs (XLA cost_analysis) and bytes (memory_analysis) of the compiled train step."""
  compiled = trainer.train_step.lower(state, rest, batch).compile()
  cost = compiled.cost_analysis() or {}
  memory = compiled.memory_analysis()
  peak = None if memory is None else (
      memory.argument_size_in_bytes + memory.output_size_in_bytes
      - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  return {"compiled_flops_per_step": cost.get("flops"), "compiled_peak_bytes": peak,
          "compiled_temp_bytes": None if memory is None else memory.temp_size_in_bytes}


def _kernels(config) -> list[str]:
  """The kernel each cross-attention layer's train-step forward resolved to on this backend."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from perceivers_jax.model import perceivers  # pylint: disable=g-import-not-at-top
  model = nnx.eval_shape(lambda: perceivers.PerceiverS(
      config.model, rngs=nnx.Rngs(0), left_padded_windows=config.data.padding_side == "left"))
  return [layer.attention.window_impl for layer in model.cross_layers]


def _variant(config, name: str, rng_seed: int = 0) -> dict:
  from perceivers_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from perceivers_jax.training import train  # pylint: disable=g-import-not-at-top
  trainer = train.build_trainer_for(config)
  state, rest = trainer.init_fn()
  batch = input_pipeline.to_global_arrays(_batch(config, np.random.default_rng(rng_seed)),
                                          trainer.batch_sharding)
  return {"name": name, "config": config, "trainer": trainer, "state": state, "rest": rest,
          "batch": batch, "times": [],
          **_compiled_figures(trainer, state, rest, batch)}


def _step(v: dict) -> float:
  start = time.perf_counter()
  v["state"], v["metrics"] = v["trainer"].train_step(v["state"], v["rest"], v["batch"])
  jax.block_until_ready((v["state"], v["metrics"]))
  return time.perf_counter() - start


def _result(v: dict) -> dict:
  from perceivers_jax.training import flops  # pylint: disable=g-import-not-at-top
  config, trainer, times = v["config"], v["trainer"], v["times"]
  step_s = statistics.median(times)
  step_flops = flops.train_flops_per_window(config.model) * config.train.batch_size
  peak = _PEAK.value * 1e12 or flops.peak_flops_per_device(config)
  tflops = step_flops / step_s / jax.device_count() / 1e12
  return {
      "variant": v["name"],
      "device": jax.devices()[0].device_kind,
      "num_devices": jax.device_count(),
      "jax_version": jax.__version__,
      "python": platform.python_version(),
      "config": {"L": config.model.max_length, "N": config.model.num_latents,
                 "width": config.model.embed_dim, "latent_layers": config.model.num_latent_layers,
                 "scales": list(config.model.cross_attention_scales),
                 "windowed_scales": config.model.windowed_scales,
                 "batch_size": config.train.batch_size, "microbatches": config.train.microbatches,
                 "dtype": config.model.dtype, "attention_impl": config.model.attention_impl,
                 "cross_attention_kernels": _kernels(config),
                 "remat_policy": config.model.remat_policy, "mesh": dict(trainer.mesh.shape)},
      "num_params": trainer.num_params,
      "step_time_s": step_s,
      "step_time_s_all": times,
      "tokens_per_s": config.train.batch_size * config.model.num_latents / step_s,
      # Each chip runs batch / chips windows (data x fsdp split the batch).
      "batch_per_device": config.train.batch_size / jax.device_count(),
      "tokens_per_s_per_device": (config.train.batch_size * config.model.num_latents / step_s
                                  / jax.device_count()),
      "formula_flops_per_window": flops.train_flops_per_window(config.model),
      "compiled_flops_per_window": (v["compiled_flops_per_step"] / config.train.batch_size
                                    if v["compiled_flops_per_step"] else None),
      "compiled_peak_bytes": v["compiled_peak_bytes"],
      "tflops_per_s_per_device": tflops,
      "mfu": tflops * 1e12 / peak if peak else None,
      "peak_memory_bytes": _peak_memory_bytes(),
      "final_loss": float(v["metrics"]["loss"]),
  }


def main(argv):
  del argv
  config = _CONFIG.value
  variants = [_variant(config, "windowed" if config.model.windowed_scales else "masked full")]
  if _AB_WINDOWED.value:
    other = config.copy_and_resolve_references()
    with other.unlocked():
      other.model.windowed_scales = not config.model.windowed_scales
    variants.append(_variant(other, "windowed" if other.model.windowed_scales else "masked full"))
  # Interleaved: step i of every variant runs before step i + 1 of any, so load drifts on a
  # shared machine hit them alike.
  for i in range(_WARMUP.value + _STEPS.value):
    for v in variants:
      elapsed = _step(v)
      if i >= _WARMUP.value:
        v["times"].append(elapsed)
  results = [_result(v) for v in variants]
  print("| variant | device | L | N | batch | batch per chip | step ms | tokens/s | "
        "tokens/s per chip | formula GFLOP/window | compiled GFLOP/window | compiled peak MB | "
        "MFU |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    c = r["config"]
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
    compiled = (f"{r['compiled_flops_per_window'] / 1e9:.1f}" if r["compiled_flops_per_window"]
                else "n/a")
    peak_mb = f"{r['compiled_peak_bytes'] / 1e6:.0f}" if r["compiled_peak_bytes"] else "n/a"
    print(f"| {r['variant']} | {r['device']} x{r['num_devices']} | {c['L']} | {c['N']} | "
          f"{c['batch_size']} | {r['batch_per_device']:g} | {1e3 * r['step_time_s']:.1f} | "
          f"{r['tokens_per_s']:.0f} | {r['tokens_per_s_per_device']:.0f} | "
          f"{r['formula_flops_per_window'] / 1e9:.1f} | {compiled} | {peak_mb} | {mfu} |")
  pathlib.Path(_OUTPUT.value).write_text(
      json.dumps(results if len(results) > 1 else results[0], indent=2) + "\n")


if __name__ == "__main__":
  app.run(main)
