"""Cached sampling throughput (SPEC 4, 6): tokens/s of `perceivers-sample`'s decode loop.

Builds the model of a config with random parameters (EOS suppressed, so every row runs the
full length), compiles and warms up, then times unconditional sampling of --num_tokens tokens
per row at each batch size (device synchronised). Prints a table and writes JSON.

  python benchmarks/sampling.py                                   # configs/tiny.py, CPU, ~1 min
  python benchmarks/sampling.py --config=configs/perceivers.py --num_tokens=2048   # GPU

SPEC 6 reference (google-research/perceiver-ar, paper size, H200): 411 tokens/s at batch 1,
856 at batch 16.
"""

import argparse
import importlib.util
import json
import pathlib
import platform
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from perceivers_jax.data import tokens
from perceivers_jax.model import perceivers as model_lib
from perceivers_jax.parallel import partitioning
from perceivers_jax.sampling import decode
from perceivers_jax.sampling import sampling

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = pathlib.Path(__file__).with_suffix(".json")


def load_config(spec: str):
  """configs/NAME.py[:variant] -> ConfigDict."""
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("bench_config", ROOT / path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant or None)


def build_model(config) -> model_lib.PerceiverS:
  """Random parameters, created on the device (jitted init); EOS made unreachable."""
  mesh = sampling.sampling_mesh(jax.devices()[:1])
  model = partitioning.create_sharded(
      lambda: model_lib.PerceiverS(config.model, rngs=nnx.Rngs(0)), mesh,
      config.logical_axis_rules)
  kernel = model.head.kernel  # zero-initialised: give the logits some spread.
  kernel.set_value(jax.random.normal(jax.random.key(1), kernel.get_value().shape,
                                     kernel.get_value().dtype) * 0.02)
  bias = model.head.bias
  bias.set_value(bias.get_value().at[tokens.EOS_ID].set(-1e9))
  return model


def time_batch(model, batch: int, num_tokens: int, sampling_config, repeats: int) -> dict:
  prompt = np.array([tokens.SOS_ID], np.int32)
  keys = jnp.stack([sampling.sample_key(0, i) for i in range(batch)])
  start = time.perf_counter()
  _, steps = sampling.generate(model, prompt, keys, num_tokens=num_tokens,
                               sampling=sampling_config)  # compile + warm-up
  compile_s = time.perf_counter() - start
  times = []
  for repeat in range(repeats):
    keys = jnp.stack([sampling.sample_key(repeat + 1, i) for i in range(batch)])
    start = time.perf_counter()
    _, steps = sampling.generate(model, prompt, keys, num_tokens=num_tokens,
                                 sampling=sampling_config)  # returns host arrays: synchronised
    times.append(time.perf_counter() - start)
  assert steps == num_tokens, f"stopped after {steps} of {num_tokens} steps"
  seconds = min(times)
  return {"batch": batch, "num_tokens": num_tokens, "seconds": seconds,
          "tokens_per_s": batch * num_tokens / seconds,
          "ms_per_token": 1e3 * seconds / num_tokens, "compile_and_first_s": compile_s}


def memory_stats() -> dict:
  stats = jax.devices()[0].memory_stats() or {}
  return {k: int(stats[k]) for k in ("peak_bytes_in_use", "bytes_limit") if k in stats}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/tiny.py", help="configs/NAME.py[:variant]")
  parser.add_argument("--num_tokens", type=int, default=192,
                      help="tokens per row (include latent resets: > N/2 + 1)")
  parser.add_argument("--batch_sizes", default="1,16", help="comma-separated")
  parser.add_argument("--repeats", type=int, default=2, help="timed runs per batch (best kept)")
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top_k", type=int, default=0)
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--min_p", type=float, default=0.0)
  parser.add_argument("--output", default=str(OUT), help="JSON results file")
  args = parser.parse_args()

  config = load_config(args.config)
  m = config.model
  sampling_config = decode.SamplingConfig(args.temperature, args.top_k, args.top_p,
                                          args.min_p)
  model = build_model(config)
  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  results = [time_batch(model, int(b), args.num_tokens, sampling_config, args.repeats)
             for b in args.batch_sizes.split(",")]
  device = jax.devices()[0]
  memory = memory_stats()

  print(f"cached sampling, {args.config}: L={m.max_length:,}, N={m.num_latents:,}, width "
        f"{m.embed_dim}, {m.num_latent_layers} latent layers, scales "
        f"{tuple(m.cross_attention_scales)}, {m.dtype}, {num_params / 1e6:.1f}M params; "
        f"{device.device_kind} ({device.platform}), jax {jax.__version__}")
  print(f"{'batch':>5s} {'tokens':>7s} {'tokens/s':>10s} {'ms/token':>9s} {'compile+1st s':>14s}")
  for r in results:
    print(f"{r['batch']:5d} {r['num_tokens']:7d} {r['tokens_per_s']:10.1f} "
          f"{r['ms_per_token']:9.2f} {r['compile_and_first_s']:14.1f}")
  if memory:
    print(f"device memory: peak {memory.get('peak_bytes_in_use', 0) / 2**30:.2f} GiB")
  pathlib.Path(args.output).write_text(json.dumps({
      "config": args.config, "model": m.to_dict(), "num_params": int(num_params),
      "device_kind": device.device_kind, "platform": device.platform,
      "jax_version": jax.__version__, "machine": platform.node(),
      "sampling": vars(args), "memory": memory, "results": results}, indent=2, default=str))
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
