"""Model sizes and step times: parameters, forward FLOPs, forward and train-step time per impl.

  python benchmarks/model_shapes.py --preset=paper --batch=1 --impls=xla,cudnn   # on a GPU
  python benchmarks/model_shapes.py --preset=small --impls=xla,chunked           # on CPU

Prints a table and writes benchmarks/model_shapes.json (backend and device named in it).
"""

import argparse
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
from flax import nnx

from perceivers_jax import config_base
from perceivers_jax import decode
from perceivers_jax import losses
from perceivers_jax import model as model_lib

PRESETS = {
    "paper": {},
    "small": dict(max_length=1024, num_latents=128, embed_dim=128, num_heads=4, head_dim=32,
                  num_latent_layers=2, cross_attention_scales=(0, 128)),
}


def _time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--impls", default="xla,chunked")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--decode_steps", type=int, default=256,
                      help="cached sampling steps timed per impl (0: skip)")
  parser.add_argument("--out", default=str(pathlib.Path(__file__).with_suffix(".json")))
  args = parser.parse_args()

  rows = []
  for impl in args.impls.split(","):
    cfg = config_base.base_config().model
    cfg.update(PRESETS[args.preset])
    cfg.attention_impl = impl
    cfg.dropout_rate = 0.0
    length, n = cfg.max_length, cfg.num_latents
    model = model_lib.PerceiverS(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    inputs = jax.random.randint(jax.random.key(0), (args.batch, length), 3, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(length), inputs.shape)
    batch = dict(inputs=inputs, positions=positions, targets=inputs)

    def loss(params, rest, batch):
      # Fresh Variables at this trace level: dropout advances its RNG count in them.
      m = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))
      logits = m(batch["inputs"], batch["positions"], deterministic=False)
      return losses.loss_fn(logits, batch, n, 1e-4)[0]

    forward = jax.jit(lambda p, r, b: nnx.merge(graphdef, p, r)(b["inputs"], b["positions"]))
    train = jax.jit(jax.value_and_grad(loss))
    flops = model_lib.forward_matmul_flops(cfg) * args.batch
    fwd_s = _time(forward, params, rest, batch, repeats=args.repeats)
    train_s = _time(train, params, rest, batch, repeats=args.repeats)
    sample_s = math.nan
    if args.decode_steps:
      prompt = jnp.full((args.batch, 1), 2, jnp.int32)  # [[SOS]]: unconditional
      run = lambda: decode.generate(model, prompt, num_steps=args.decode_steps,
                                    rng=jax.random.key(0))["tokens"]
      sample_s = _time(run, repeats=1)
    rows.append(dict(
        impl=impl, preset=args.preset, batch=args.batch,
        params=sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
        forward_gflop=flops / 1e9, forward_ms=fwd_s * 1e3, train_step_ms=train_s * 1e3,
        train_tflops_per_s=3 * flops / train_s / 1e12,
        predicted_tokens_per_s=args.batch * n / train_s,
        sampled_tokens_per_s=args.batch * args.decode_steps / sample_s))

  print(f"{'impl':8} {'params':>12} {'fwd GFLOP':>10} {'fwd ms':>9} {'train ms':>9} "
        f"{'TFLOP/s':>8} {'tok/s':>9} {'sample tok/s':>12}")
  for r in rows:
    print(f"{r['impl']:8} {r['params']:12,d} {r['forward_gflop']:10.1f} {r['forward_ms']:9.1f} "
          f"{r['train_step_ms']:9.1f} {r['train_tflops_per_s']:8.2f} "
          f"{r['predicted_tokens_per_s']:9.0f} {r['sampled_tokens_per_s']:12.0f}")
  result = dict(backend=jax.default_backend(), device=jax.devices()[0].device_kind, rows=rows)
  pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
