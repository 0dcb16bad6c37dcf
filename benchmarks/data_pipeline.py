"""Input-pipeline throughput at the paper's size (L=32,768, N=1,024) on real MAESTRO pieces.

Builds `maestro_performance/folder_full` from the 10 real pieces in a temporary data_dir
(ArrayRecord), then times, for a few seconds each: random effective and baseline training
windows from that ArrayRecord source and from the same tokens in memory, and the
sequential eval windows. Prints a table and writes benchmarks/data_pipeline.json.

  python benchmarks/data_pipeline.py [--seconds 8] [--batch_size 8]
"""

import argparse
import json
import os
import pathlib
import platform
import shutil
import tempfile
import time


from data_prep import fetch_maestro_samples
from data_prep import maestro_performance
from perceivers_jax import config_base
from perceivers_jax.data import input_pipeline

OUT = pathlib.Path(__file__).with_suffix(".json")


def _time_batches(batches, seconds: float) -> dict:
  """Pulls batches for about `seconds` (after one warm-up batch); windows/s and MB/s."""
  batch = next(batches)
  rows, bytes_, count = 0, 0, 0
  start = time.perf_counter()
  while time.perf_counter() - start < seconds:
    try:
      batch = next(batches)
    except StopIteration:
      break
    rows += len(batch["inputs"])
    bytes_ += sum(v.nbytes for v in batch.values())
    count += 1
  elapsed = time.perf_counter() - start
  return {"batches": count, "windows_per_s": rows / elapsed,
          "mb_per_s": bytes_ / elapsed / 2**20, "seconds": elapsed}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--seconds", type=float, default=8.0, help="timing per case")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--read_threads", type=int, default=8)
  args = parser.parse_args()

  config = config_base.base_config()
  config.train.batch_size = config.eval.batch_size = args.batch_size
  config.data.read_threads = args.read_threads
  L, N = config.model.max_length, config.model.num_latents

  with tempfile.TemporaryDirectory() as tmp:
    manual = pathlib.Path(tmp) / "midi"
    manual.mkdir()
    for path in fetch_maestro_samples.fetch():
      shutil.copy(path, manual / path.name)
    start = time.perf_counter()
    builder, report = maestro_performance.build(manual, pathlib.Path(tmp) / "tfds",
                                                "folder_full", num_workers=os.cpu_count())
    build_s = time.perf_counter() - start
    source = builder.as_data_source(split="+".join(
        s for s, n in report["pieces_per_split"].items() if n))
    in_memory = [{"tokens": source[i]["tokens"]} for i in range(len(source))]
    lengths = [len(r["tokens"]) for r in in_memory]

    results = {}
    cases = [("effective, ArrayRecord", "effective", source),
             ("effective, in memory", "effective", in_memory),
             ("baseline, ArrayRecord", "baseline", source)]
    for name, kind, data in cases:
      config.data.windows = kind
      batches = input_pipeline.make_train_iterator(config, data, seed=0, process_index=0,
                                                   process_count=1)
      results[name] = _time_batches(batches, args.seconds)
    eval_batches = iter(input_pipeline.make_eval_batches(
        config, source, process_index=0, process_count=1, lengths=lengths))
    results["sequential eval, ArrayRecord"] = _time_batches(eval_batches, args.seconds)

  print(f"input pipeline, L={L:,}, N={N:,}, batch {args.batch_size}, "
        f"{len(lengths)} real pieces ({sum(lengths):,} tokens), {os.cpu_count()} CPUs, "
        f"{args.read_threads} read threads; dataset build {build_s:.1f} s")
  print(f"{'case':32s} {'windows/s':>10s} {'MB/s':>9s} {'batches':>8s}")
  for name, r in results.items():
    print(f"{name:32s} {r['windows_per_s']:10.1f} {r['mb_per_s']:9.1f} {r['batches']:8d}")
  OUT.write_text(json.dumps({
      "max_length": L, "num_latents": N, "batch_size": args.batch_size,
      "pieces": len(lengths), "tokens": int(sum(lengths)), "cpus": os.cpu_count(),
      "read_threads": args.read_threads, "machine": platform.node(),
      "build_seconds": build_s, "results": results}, indent=2))
  print(f"wrote {OUT}")


if __name__ == "__main__":
  main()
