r"""Paper-size PerceiverS compiled for TPU slices from this host: the largest global batch that
fits, per-chip peak, collectives per step and compile time (BUILD.md, "Compiling for TPU
topologies"). Needs libtpu (`pip install -e '.[tpu]'`; `make test` installs it).

  python benchmarks/tpu_compile_table.py                        # the BUILD.md table
  python benchmarks/tpu_compile_table.py --targets=v5p-32 --slices=1

Per target: FSDP over each slice's chips (config.mesh.fsdp=-1, data=1), data parallel across
slices (dcn_data), bf16 activations, the default remat (nothing_saveable), attention `auto`
(splash). Rows per chip r: the train step is compiled at r = 1 and 2, the peak extrapolated
linearly to the chip's HBM, and the predicted r compiled, re-fitted through each compile
(down after a miss until one fits, up after a fit while the larger one fits);
the table reports that last compile. `--effort` is XLA's exec_time_optimization_effort:
-1 (the default here) compiles about 3x faster on this CPU, with a peak within about 10% of
the default effort's (0) on v5p-8. Prints the table and writes
benchmarks/tpu_compile_table.json (after each target).
"""

import json
import pathlib
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# pylint: disable-next=g-import-not-at-top,wrong-import-position
from perceivers_jax.parallel import topology

_TARGETS = flags.DEFINE_list("targets", ["v4-8", "v5e-16", "v5p-32", "v6e-8", "v5e-16"],
                             "TPU targets (parallel/topology.py names).")
_SLICES = flags.DEFINE_list("slices", ["1", "1", "1", "1", "2"], "Slices per target.")
_CONFIG = flags.DEFINE_string("config", "configs/perceivers.py", "Config file.")
_OUTPUT = flags.DEFINE_string("output", "benchmarks/tpu_compile_table.json", "JSON output.")
_ROWS = flags.DEFINE_list("rows_per_chip", [], "Per target: compile at these rows per chip "
                          "instead of searching for the largest that fits.")
_EFFORT = flags.DEFINE_float("effort", -1.0, "XLA's exec_time_optimization_effort, -1 to 1.")


def _config(rows: int, devices: int):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("config_module", _CONFIG.value)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.mesh.update(data=1, fsdp=-1, dcn_data=-1)
  config.train.batch_size = config.eval.batch_size = rows * devices
  return config


def _compile(name: str, slices: int, rows: int, options=None) -> dict:
  from perceivers_jax.training import dry_run  # pylint: disable=g-import-not-at-top
  devices = topology.target(name).chips * slices
  start = time.perf_counter()
  report = dry_run.dry_run(_config(rows, devices), compile_topology=name, num_slices=slices,
                           compiler_options=options)
  report["wall_seconds"] = round(time.perf_counter() - start, 1)
  print(f"  {name} x{slices} rows/chip {rows}: peak {_peak(report) / 2**30:.2f} GiB "
        f"({report['does_not_fit'] or 'fits'}), compile {report['compile_seconds']} s"
        f" (effort {(options or {}).get('exec_time_optimization_effort', 0)})", flush=True)
  return report


def _peak(report: dict) -> float:
  """The per-chip peak; infinite where XLA refused the program for running out of HBM."""
  memory = report.get("compiled_memory_bytes_per_device")
  return memory["estimated_peak"] if memory else float("inf")


def _largest_batch(name: str, slices: int, given_rows: int = 0) -> dict:
  hbm = topology.target(name).hbm_bytes
  options = {"exec_time_optimization_effort": _EFFORT.value} if _EFFORT.value else None
  if given_rows:
    final = _compile(name, slices, given_rows, options)
    final["rows_per_chip"] = 0 if final["does_not_fit"] else given_rows
    return final
  final = one = _compile(name, slices, 1, options)
  if _peak(one) <= hbm:
    per_row = max(_peak(_compile(name, slices, 2, options)) - _peak(one), 1)
    rows = max(1, int(1 + (hbm - _peak(one)) // per_row))
    final = _compile(name, slices, rows, options) if rows > 1 else one
    while final["does_not_fit"] and rows > 1:  # the peak grew faster: re-fit through this miss
      per_row = (_peak(final) - _peak(one)) / (rows - 1)
      rows = max(1, min(rows - 1, int(1 + (hbm - _peak(one)) // per_row)) if per_row < float(
          "inf") else rows * 3 // 4)
      final = _compile(name, slices, rows, options)
    while not final["does_not_fit"] and rows > 1:  # the peak grew slower: try further
      more = int(1 + (hbm - _peak(one)) // ((_peak(final) - _peak(one)) / (rows - 1)))
      if more <= rows:
        break
      bigger = _compile(name, slices, more, options)
      if bigger["does_not_fit"]:
        break
      final, rows = bigger, more
  fits = not final["does_not_fit"]
  final["rows_per_chip"] = final["batch_size"] // final["devices"] if fits else 0
  return final


def main(argv):
  del argv
  topology.quiet_libtpu()
  results = []
  rows = [int(r) for r in _ROWS.value] or [0] * len(_TARGETS.value)
  for name, slices, given_rows in zip(_TARGETS.value, (int(s) for s in _SLICES.value), rows):
    report = _largest_batch(name, slices, given_rows)
    results.append({
        "target": name, "slices": slices, "chips": report["devices"], "mesh": report["mesh"],
        "largest_global_batch": report["batch_size"] if report["rows_per_chip"] else 0,
        "peak_bytes_per_chip": _peak(report), "hbm_bytes": topology.target(name).hbm_bytes,
        "collectives": report.get("collectives", {}), "kernels": report.get("kernels", {}),
        "compile_seconds": report["compile_seconds"],
        "train_flops_per_step": report["train_flops_per_step"]})
    pathlib.Path(_OUTPUT.value).write_text(json.dumps(results, indent=2, sort_keys=True))
  print("| target | chips | mesh | largest global batch | peak / chip | collectives per step "
        "| compile s |\n|" + "---|" * 7)
  for r in results:
    collectives = ", ".join(f"{kind} x{c['count']} ({c['bytes'] / 1e9:.2f} GB)"
                            for kind, c in r["collectives"].items())
    print(f"| {r['slices']} x {r['target']} | {r['chips']} | {r['mesh']} | "
          f"{r['largest_global_batch']} | {r['peak_bytes_per_chip'] / 2**30:.1f} of "
          f"{r['hbm_bytes'] / 2**30:.0f} GiB | {collectives} | {r['compile_seconds']} |")


if __name__ == "__main__":
  app.run(main)
