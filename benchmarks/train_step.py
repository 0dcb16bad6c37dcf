"""Train-step speed of a config on whatever backend jax finds: step time, tokens/s, MFU, memory.

Builds the model sharded over all local devices (config.mesh), warms up (compilation), then
times steps with device sync and reports medians. Tokens/s counts predicted slots (batch x N,
as SPEC 6); TFLOP/s and MFU use 3 x forward matmul FLOPs per window
(`perceivers_jax.training.flops.train_flops_per_window`, every cross-attention layer included) and the
device's peak (`flops.PEAK_TFLOPS`, or --peak_tflops). Batches are windows of random tokens
with real window structure (left padding, positions), so masks and gathers are exercised.

  python benchmarks/train_step.py --config=configs/tiny.py                    # CPU
  python benchmarks/train_step.py --config=configs/perceivers.py \\
      --config.model.attention_impl=cudnn --config.train.batch_size=8           # GPU, paper size

Prints a table row and writes benchmarks/train_step.json (or --output).
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


def main(argv):
  del argv
  from perceivers_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from perceivers_jax.training import flops  # pylint: disable=g-import-not-at-top
  from perceivers_jax.training import train  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  trainer = train.build_trainer_for(config)
  state, rest = trainer.init_fn()
  batch = input_pipeline.to_global_arrays(_batch(config, np.random.default_rng(0)),
                                          trainer.batch_sharding)
  times = []
  for i in range(_WARMUP.value + _STEPS.value):
    start = time.perf_counter()
    state, metrics = trainer.train_step(state, rest, batch)
    jax.block_until_ready((state, metrics))
    if i >= _WARMUP.value:
      times.append(time.perf_counter() - start)

  step_s = statistics.median(times)
  step_flops = flops.train_flops_per_window(config.model) * config.train.batch_size
  peak = _PEAK.value * 1e12 or flops.peak_flops_per_device(config)
  tflops = step_flops / step_s / jax.device_count() / 1e12
  result = {
      "device": jax.devices()[0].device_kind,
      "num_devices": jax.device_count(),
      "jax_version": jax.__version__,
      "python": platform.python_version(),
      "config": {"L": config.model.max_length, "N": config.model.num_latents,
                 "width": config.model.embed_dim, "latent_layers": config.model.num_latent_layers,
                 "scales": list(config.model.cross_attention_scales),
                 "batch_size": config.train.batch_size, "microbatches": config.train.microbatches,
                 "dtype": config.model.dtype, "attention_impl": config.model.attention_impl,
                 "remat_policy": config.model.remat_policy, "mesh": dict(trainer.mesh.shape)},
      "num_params": trainer.num_params,
      "step_time_s": step_s,
      "step_time_s_all": times,
      "tokens_per_s": config.train.batch_size * config.model.num_latents / step_s,
      "tflops_per_s_per_device": tflops,
      "mfu": tflops * 1e12 / peak if peak else None,
      "peak_memory_bytes": _peak_memory_bytes(),
      "final_loss": float(metrics["loss"]),
  }
  mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] else "n/a"
  memory = (f"{result['peak_memory_bytes'] / 2**30:.1f} GiB" if result["peak_memory_bytes"]
            else "n/a")
  print("| device | L | N | batch | step ms | tokens/s | TFLOP/s/dev | MFU | peak mem |")
  print("|---|---|---|---|---|---|---|---|---|")
  print(f"| {result['device']} x{result['num_devices']} | {config.model.max_length} | "
        f"{config.model.num_latents} | {config.train.batch_size} | {1e3 * step_s:.1f} | "
        f"{result['tokens_per_s']:.0f} | {tflops:.3f} | {mfu} | {memory} |")
  pathlib.Path(_OUTPUT.value).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
  app.run(main)
