"""A training run's start with and without jax's persistent compilation cache: the time to the
first step, the XLA programs compiled or read, and those read from the cache (the time
account's figures, perceivers_jax/runtime/time_account.py).

One workdir, each start a fresh process: start 1 (an empty cache) trains one step; then the
run is resumed for one more step at a time, alternating the cache off (everything compiles)
and on (start 1's programs are read), `--rounds` times. Training data: random tokens in
real windows; validation: one batch. jax's default threshold applies (programs compiling
for 1 s or more are written; --min_compile_seconds changes it).

  python benchmarks/compilation_cache.py --config=perceivers_jax/configs/tiny.py
  python benchmarks/compilation_cache.py --config=perceivers_jax/configs/tiny.py \
      --config.model.max_length=4096 --config.model.num_latents=256 \
      --config.model.embed_dim=256 --config.model.num_heads=4 --config.model.head_dim=64 \
      --config.model.num_latent_layers=4 --config.model.cross_attention_scales=0,256 \
      --config.train.batch_size=2 --config.eval.batch_size=2 --rounds=1

Prints a table row per start and writes benchmarks/compilation_cache.json (or --output).
"""

import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file to start.",
                                          lock_config=True)
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Pairs of later starts (cache off, cache on).")
_MIN_SECONDS = flags.DEFINE_float("min_compile_seconds", 1.0,
                                  "config.compilation_cache_min_compile_seconds.")
_OUTPUT = flags.DEFINE_string("output", str(pathlib.Path(__file__).with_suffix(".json")),
                              "JSON file to write.")
_CHILD = flags.DEFINE_string("child", None, "(internal) run one start: WORKDIR,CACHE,STEPS.")


def _pieces(config, count: int, seed: int) -> list[dict[str, np.ndarray]]:
  from perceivers_jax.data import tokens  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  pieces = []
  for _ in range(count):
    piece = rng.integers(3, tokens.VOCAB_SIZE, size=2 * config.model.max_length).astype(np.int32)
    piece[0], piece[-1] = tokens.SOS_ID, tokens.EOS_ID
    pieces.append({"tokens": piece})
  return pieces


def _start(config, workdir: str, cache: str, steps: int) -> None:
  """One start (in this process): resume `workdir` (or begin it) and train to `steps`."""
  from perceivers_jax.training import train  # pylint: disable=g-import-not-at-top
  with config.unlocked():
    config.train.num_steps = steps
    config.eval.every_steps = config.checkpoint.every_steps = config.log_every_steps = 1
    config.eval.max_batches = 1
    config.compilation_cache_dir = cache
    config.compilation_cache_min_compile_seconds = _MIN_SECONDS.value
  train.train_and_evaluate(config, workdir, train_source=_pieces(config, 4, 0),
                           eval_source=_pieces(config, 1, 1))


def _last_account(workdir: str) -> dict[str, float]:
  records = [json.loads(line) for line in
             (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  last = [r for r in records if "time/wall_seconds" in r][-1]
  return {k[len("time/"):]: v for k, v in last.items() if k.startswith("time/")}


def main(argv):
  del argv
  if _CHILD.value:
    workdir, cache, steps = _CHILD.value.split(",")
    _start(_CONFIG.value, workdir, cache, int(steps))
    return
  forwarded = [a for a in sys.argv[1:] if a.startswith("--config")]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    workdir, cache = os.path.join(tmp, "run"), os.path.join(tmp, "cache")
    plan = [("first start, empty cache", cache)]
    plan += [start for _ in range(_ROUNDS.value)
             for start in (("later start, cache off", "off"), ("later start, cache on", cache))]
    for steps, (label, cache_setting) in enumerate(plan, start=1):
      subprocess.run([sys.executable, __file__, *forwarded, f"--min_compile_seconds="
                      f"{_MIN_SECONDS.value}", f"--child={workdir},{cache_setting},{steps}"],
                     check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
      account = _last_account(workdir)
      rows.append({"start": label, **{k: account[k] for k in (
          "time_to_first_step_seconds", "compilation_seconds", "compilations", "cache_hits",
          "wall_seconds")}})
    entries = sorted(os.listdir(cache))
  result = {"machine": platform.node(), "load_average": os.getloadavg(),
            "min_compile_seconds": _MIN_SECONDS.value, "cached_programs": entries,
            "argv": sys.argv[1:], "starts": rows}
  pathlib.Path(_OUTPUT.value).write_text(json.dumps(result, indent=1))
  print("| start | time to first step | compilation (whole start) | XLA programs | from the "
        "cache |")
  for row in rows:
    print(f"| {row['start']} | {row['time_to_first_step_seconds']:.1f} s | "
          f"{row['compilation_seconds']:.1f} s | {row['compilations']:.0f} | "
          f"{row['cache_hits']:.0f} |")


if __name__ == "__main__":
  app.run(main)
