"""What a compiled program costs per device, read from the executable and its optimised HLO.

Used by the dry runs of training and sampling (`--dry_run`, `--compile_topology`):
  memory(compiled, hbm_bytes)  argument / output / temporary bytes per device, the peak, and
                               the share of the chip's HBM it takes;
  collectives(hlo_text)        all-reduce, all-gather, reduce-scatter, all-to-all and
                               collective-permute ops: count and bytes per execution, loop
                               bodies counted once per iteration;
  kernels(hlo_text)            custom calls: Mosaic kernels (`tpu_custom_call`, by kernel
                               name, e.g. splash_mha_fwd...) and cuDNN's (`__cudnn$fmha...`);
  largest_buffers(hlo_text)    the largest arrays the program materialises and the model code
                               that makes them;
  compile_report(lowered, ...) all of them for one program as the dry runs print it, and
                               `does_not_fit`: one line when it exceeds the chip's HBM.
Loops: a `while` whose condition compares its counter with one constant (what lax.scan and
fori_loop compile to) runs that many times; a loop with a data-dependent end (the sampler's
decode loop) is counted once per iteration of it, and reported as such.
"""

import collections
import json
import math
import re
import time
from typing import Any

from perceivers_jax import config_base

# `%name = f32[8,1024]{1,0} op(...), ..., metadata={op_name="jit(step)/..."}` in optimised HLO.
_HLO_VALUE = re.compile(r"^\s*(?:ROOT )?%\S+ = (\w+)\[([\d,]*)\]\S* ([\w-]+)\(")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([\w-]+)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) ")
_SHAPE = re.compile(r"\b(pred|[sfu]\d+|bf16)\[([\d,]*)\]")
_CALLED = re.compile(r"\b(?:calls|to_apply|true_computation|false_computation)=%([\w.-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_WHILE = re.compile(r"condition=%([\w.-]+), body=%([\w.-]+)")
_CONSTANT = re.compile(r"\b[su](?:32|64)\[\]\S* constant\((\d+)\)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_GROUPS = re.compile(r"replica_groups=\{((?:\{[^}]*\},?)*)\}")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all")


def _value_bytes(dtype: str, dims: str) -> int:
  return math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dtype, 0)


def _shapes_bytes(text: str) -> int:
  """Bytes of every array shape in an instruction's result type (tuples summed)."""
  return sum(_value_bytes(dtype, dims) for dtype, dims in _SHAPE.findall(text))


def _tuple_elements(result: str) -> list[str]:
  """The top-level elements of a tuple type `(a, (b, c), d)`; [result] if it is no tuple."""
  result = result.strip()
  if not result.startswith("("):
    return [result]
  elements, depth, start = [], 0, 1
  for i, char in enumerate(result):
    if char in "({[":
      depth += 1
    elif char in ")}]":
      depth -= 1
    if (char == "," and depth == 1) or depth == 0:
      elements.append(result[start:i])
      start = i + 1
    if depth == 0:
      break
  return elements


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
  """{computation name: its instruction lines}, and the ENTRY computation's name. An
  instruction whose attributes span lines (a Mosaic kernel's backend config) is one line."""
  bodies: dict[str, list[str]] = {}
  entry, current = "", None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and line.rstrip().endswith("{"):
      current = header.group(1)
      bodies[current] = []
      entry = current if line.startswith("ENTRY") else entry
    elif line.rstrip() == "}":
      current = None
    elif current is not None and line[:1].isspace():
      bodies[current].append(line)
    elif current is not None and bodies[current]:  # a continuation of the last instruction
      bodies[current][-1] += line
  return bodies, entry


def _trip_count(condition: list[str]) -> int | None:
  constants = [int(c) for line in condition for c in _CONSTANT.findall(line)]
  return constants[0] if len(constants) == 1 else None


def _executions(bodies: dict[str, list[str]], entry: str) -> dict[str, tuple[int, bool]]:
  """Per computation: how often one run of the program executes it, and whether a loop of
  unknown trip count (counted once) encloses it."""
  runs: dict[str, tuple[int, bool]] = {entry: (1, False)}
  pending = [entry]
  while pending:
    name = pending.pop()
    count, unknown = runs[name]
    for line in bodies.get(name, ()):
      calls = [(callee, 1, False) for callee in _CALLED.findall(line)]
      for group in _BRANCHES.findall(line):
        calls += [(callee.strip().lstrip("%"), 1, False) for callee in group.split(",")]
      loop = _WHILE.search(line)
      if loop:
        trips = _trip_count(bodies.get(loop.group(1), []))
        calls.append((loop.group(2), trips or 1, trips is None))
      for callee, factor, loop_unknown in calls:
        if callee in bodies:
          old_count, old_unknown = runs.get(callee, (0, False))
          runs[callee] = (old_count + count * factor, old_unknown or unknown or loop_unknown)
          pending.append(callee)
  return runs


def _instructions(hlo_text: str):
  """(opcode, name, result type, line, executions, in a loop of unknown trip count) of every
  instruction outside fusion bodies."""
  bodies, entry = _computations(hlo_text)
  for computation, (count, unknown) in _executions(bodies, entry).items():
    for line in bodies[computation]:
      match = _INSTRUCTION.match(line)
      if match:
        name, result, opcode, _ = match.groups()
        yield opcode, name, result, line, count, unknown


def collectives(hlo_text: str) -> dict[str, dict[str, Any]]:
  """{kind: {count, bytes, in_unknown_loops}} per execution of the program: `bytes` sums each
  op's result size on one device (for an all-reduce the reduced buffer, for an all-gather
  what it gathers), times the iterations of the loops around it; async pairs count once
  (at -start), ops over one-device groups not at all. `in_unknown_loops`: ops inside a
  data-dependent loop, counted once."""
  found: dict[str, dict[str, Any]] = {}
  for opcode, _, result, line, count, unknown in _instructions(hlo_text):
    kind = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
    if kind not in COLLECTIVES or _moves_nothing(line):
      continue
    entry = found.setdefault(kind, {"count": 0, "bytes": 0, "in_unknown_loops": 0})
    entry["count"] += count
    if opcode.endswith("-start") and kind != "all-reduce":
      result = _tuple_elements(result)[1]  # (operands, results, [context]): the results
    entry["bytes"] += count * _shapes_bytes(result)
    entry["in_unknown_loops"] += int(unknown)
  return dict(sorted(found.items()))


def _moves_nothing(line: str) -> bool:
  """A collective over groups of one device each (a shard_map's transpose sums over mesh axes
  of size 1 so): no data moves."""
  groups = _GROUPS.search(line)
  return bool(groups) and all("," not in g for g in re.findall(r"\{([^}]*)\}", groups.group(1)))


def kernels(hlo_text: str) -> dict[str, int]:
  """{kernel: calls per execution} of the program's Mosaic and cuDNN custom calls (Mosaic
  kernels by name, e.g. splash_mha_fwd_segmented_residuals)."""
  calls: collections.Counter = collections.Counter()
  for opcode, name, _, line, count, _ in _instructions(hlo_text):
    if opcode != "custom-call":
      continue
    target = re.search(r'custom_call_target="([^"]*)"', line)
    target = target.group(1) if target else ""
    if target == "tpu_custom_call":
      calls[f"mosaic:{name.rsplit('.', 1)[0]}"] += count
    elif "cudnn" in target.lower():
      calls[f"cudnn:{target}"] += count
  return dict(sorted(calls.items()))


def memory(compiled, hbm_bytes: int | None = None) -> dict[str, Any] | None:
  """Bytes per device of a compiled program (its memory_analysis) and, given the chip's HBM,
  the share the peak takes. Donated arguments alias outputs: peak = arguments + outputs -
  aliased + temporaries."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  report: dict[str, Any] = {name: int(getattr(analysis, f"{name}_size_in_bytes")) for name in (
      "argument", "output", "temp", "alias", "generated_code")}
  report["estimated_peak"] = (report["argument"] + report["output"] - report["alias"]
                              + report["temp"])
  if hbm_bytes:
    report["hbm"] = hbm_bytes
    report["peak_fraction_of_hbm"] = round(report["estimated_peak"] / hbm_bytes, 3)
  return report


def flops(compiled) -> float | None:
  """FLOPs XLA counts for one execution (its cost_analysis); Mosaic kernels are opaque to it
  and count nothing."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def largest_buffers(hlo_text: str, top: int = 10) -> list[dict[str, Any]]:
  """The largest array shapes materialised by an optimised HLO module, biggest first.

  Values inside fusions are skipped (they live in registers, not buffers). Each entry: the
  shape, the bytes of one such value, how many instructions produce one, and the jax ops
  (model code) that most often produce it. These are candidates, not a liveness analysis:
  the peak holds some of them at once.
  """
  counts: dict[str, int] = collections.Counter()
  sources: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  bodies, _ = _computations(hlo_text)
  for computation, lines in bodies.items():
    if "fused" in computation or "fusion" in computation:
      continue
    for line in lines:
      match = _HLO_VALUE.match(line)
      if not match or match.group(1) not in _DTYPE_BYTES:
        continue
      dtype, dims, opcode = match.groups()
      if opcode in ("parameter", "constant", "bitcast", "get-tuple-element", "tuple"):
        continue
      shape = f"{dtype}[{dims}]"
      counts[shape] += 1
      op_name = _OP_NAME.search(line)
      # The last few name parts say which model code asked for the value.
      sources[shape]["/".join(op_name.group(1).split("/")[-3:]) if op_name else opcode] += 1
  ranked = sorted(counts, key=lambda shape: -_value_bytes(*shape[:-1].split("[")))[:top]
  return [{"shape": shape, "bytes": _value_bytes(*shape[:-1].split("[")),
           "count": counts[shape], "jax_ops": [name for name, _ in sources[shape].most_common(3)]}
          for shape in ranked]


def compile_report(lowered, *, hbm_bytes: int | None, knobs: str,
                   compiler_options: dict[str, Any] | None = None) -> dict[str, Any]:
  """Compiles `lowered` and reports everything above (as the dry runs print it), with
  `does_not_fit`: None, or one line when the peak exceeds the chip's HBM (from the memory
  analysis, or from the compiler refusing the program: XLA:TPU runs out of HBM while
  compiling) naming the largest buffers and `knobs`, what helps."""
  start = time.perf_counter()
  try:
    executable = lowered.compile(compiler_options)
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return {"compile_seconds": round(time.perf_counter() - start, 2),
            "does_not_fit": _out_of_memory_line(str(e), knobs)}
  report: dict[str, Any] = {"compile_seconds": round(time.perf_counter() - start, 2)}
  text = executable.as_text()
  report.update(compiled_memory_bytes_per_device=memory(executable, hbm_bytes),
                xla_flops_per_device=flops(executable), collectives=collectives(text),
                kernels=kernels(text), largest_buffers=largest_buffers(text))
  report["does_not_fit"] = _too_big_line(report, knobs)
  return report


def _out_of_memory_line(message: str, knobs: str) -> str:
  """XLA's out-of-HBM error in one line: its usage line and, when it lists them, its largest
  allocations."""
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  usage = next((line for line in lines if line.startswith("Used ")), lines[0])
  usage = usage.removeprefix("RESOURCE_EXHAUSTED:").strip().rstrip(".")
  shapes = [line[len("Shape: "):] for line in lines if line.startswith("Shape: ")][:3]
  biggest = f"; largest buffers {', '.join(shapes)}" if shapes else ""
  return f"does not fit: XLA per chip: {usage}{biggest}; {knobs}"


def _too_big_line(report: dict[str, Any], knobs: str) -> str | None:
  memory_report = report.get("compiled_memory_bytes_per_device") or {}
  hbm = memory_report.get("hbm")
  if not hbm or memory_report["estimated_peak"] <= hbm:
    return None
  biggest = ", ".join(f"{b['shape']} x{b['count']} ({b['jax_ops'][0] if b['jax_ops'] else '?'})"
                      for b in report.get("largest_buffers", [])[:3])
  return (f"does not fit: peak {memory_report['estimated_peak'] / 2**30:.1f} GiB per chip "
          f"against {hbm / 2**30:.0f} GiB of HBM; largest buffers {biggest}; {knobs}")


def print_report(report: dict[str, Any]) -> None:
  """Prints a dry run's report as one JSON line; a program that does not fit then ends with
  its one line (an InputError: `error: does not fit ...`, exit status 1)."""
  print(json.dumps(report, sort_keys=True), flush=True)
  if report.get("does_not_fit"):
    raise config_base.InputError(report["does_not_fit"])
