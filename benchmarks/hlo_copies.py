"""Copies in a compiled decode loop: which copy/transpose ops of a given size run per step.

Used by benchmarks/sampling.py (its copies columns) and tests/decode_test.py (no cache-sized
copy per decode step). Reads the optimised HLO text of `jit(...).lower(...).compile()`.
"""

import re

import numpy as np

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4,
                "u32": 4, "f64": 8, "s64": 8}


def _shape_bytes(shape: str) -> int:
  """Bytes of an HLO array type such as `f32[16,4,1024,32]{3,2,1,0}` (0 for tuples)."""
  m = re.match(r"(\w+)\[([\d,]*)\]", shape)
  if not m or m.group(1) not in _DTYPE_BYTES:
    return 0
  return int(np.prod([int(d) for d in m.group(2).split(",") if d])) * _DTYPE_BYTES[m.group(1)]


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
  """Optimised HLO text -> ({computation name: instruction lines}, entry name)."""
  comps, entry, name = {}, None, None
  for line in hlo.splitlines():
    header = re.match(r"(ENTRY )?%([\w.\-]+) .*\{$", line)
    if header and not line.startswith(" "):
      name = header.group(2)
      comps[name] = []
      entry = name if header.group(1) else entry
    elif name and line.startswith("  "):
      comps[name].append(line.strip())
  return comps, entry


def _instruction(line: str) -> tuple[str, str, str] | None:
  """An HLO instruction line -> (name, result type, opcode); tuple types may nest."""
  m = re.match(r"(?:ROOT )?%([\w.\-]+) = ", line)
  if not m:
    return None
  rest, depth = line[m.end():], 0
  for end, char in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if char == " " and depth == 0:
      break
  opcode = re.match(r"([\w\-]+)\(", rest[end + 1:])
  return (m.group(1), rest[:end], opcode.group(1)) if opcode else None


def cache_copies(hlo: str, min_bytes: int) -> dict[str, list[str]]:
  """Copies and transposes of >= min_bytes in a compiled decode loop, per plain step / reset.

  Walks the optimised HLO from its entry. A while loop without a known trip count is a decode
  loop (the layer scans have one); the innermost decode loop's body runs every plain step.
  Inside a step, a `conditional`'s branch 0 (lax.cond's false branch: the plain step) runs
  every step and its other branches at resets; everything else in a decode loop (an outer
  loop's body) runs once per reset. Fusions count as one op (named after their root, e.g.
  `transpose_copy_fusion`). Returns {"per_step": [...], "per_reset": [...]}, each entry
  `name shape`.
  """
  comps, entry = _computations(hlo)
  found = []  # (decode loop depth, on a reset branch, "name shape")
  depths = {0}  # of the decode loops seen

  def walk(comp: str, depth: int, reset_branch: bool) -> None:
    depths.add(depth)
    for line in comps.get(comp, ()):
      parsed = _instruction(line)
      if not parsed:
        continue
      name, shape, opcode = parsed
      if opcode in ("copy", "transpose") or (opcode == "fusion" and
                                             re.search("copy|transpose", name)):
        if depth and _shape_bytes(shape) >= min_bytes:
          found.append((depth, reset_branch, f"{name} {shape.split('{')[0]}"))
      if opcode == "while":
        body = re.search(r"body=%([\w.\-]+)", line).group(1)
        decode_loop = "known_trip_count" not in line
        walk(body, depth + decode_loop, reset_branch and not decode_loop)
      elif opcode == "conditional":
        branches = re.search(r"branch_computations=\{([^}]*)\}", line)
        if branches:
          names = [b.strip().lstrip("%") for b in branches.group(1).split(",")]
        else:
          names = [re.search(f"{key}=%([\\w.\\-]+)", line).group(1)
                   for key in ("false_computation", "true_computation")]
        for index, branch in enumerate(names):
          walk(branch, depth, reset_branch or index > 0)
      elif opcode == "call":
        walk(re.search(r"to_apply=%([\w.\-]+)", line).group(1), depth, reset_branch)

  walk(entry, 0, False)
  deepest = max(depths)
  per_step = [op for depth, reset, op in found if depth == deepest and not reset]
  per_reset = [op for depth, reset, op in found if depth < deepest or reset]
  return {"per_step": per_step, "per_reset": per_reset}
