"""Training metrics to TensorBoard event files, `metrics.jsonl` and a readable log line.

TensorBoard files are written with tensorboardX, so TensorFlow is not needed. Only process 0
writes; other hosts get a writer whose calls do nothing. `workdir` may be a local path or a
gs:// URL (through etils.epath; tensorboardX then needs google-cloud-storage).
"""

import json
import math
import time
from typing import Any, Mapping

from absl import logging
from etils import epath
import jax
import numpy as np
import tensorboardX


def _scalar(value: Any) -> float:
  return float(np.asarray(value))


class MetricsWriter:
  """Writes scalar metrics under `workdir` (TensorBoard + JSON lines)."""

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self._enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self._enabled:
      workdir = epath.Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      self._tb = tensorboardX.SummaryWriter(logdir=str(workdir / "tensorboard"))
      self._jsonl = (workdir / "metrics.jsonl").open("a")

  def write_scalars(self, step: int, scalars: Mapping[str, Any], *, prefix: str = "") -> None:
    """Records `scalars` at `step`, names prefixed by `prefix` (e.g. "eval/")."""
    if not self._enabled:
      return
    values = {f"{prefix}{name}": _scalar(value) for name, value in scalars.items()}
    for name, value in values.items():
      self._tb.add_scalar(name, value, global_step=step)
    record = {"step": int(step), "time": time.time()}
    record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()

  def log_progress(self, step: int, num_steps: int, scalars: Mapping[str, Any]) -> str:
    """Logs and returns one readable line: `step 120/400 | loss 3.512 | ...`."""
    parts = [f"step {step}/{num_steps}"]
    for name, value in scalars.items():
      value = _scalar(value)
      if abs(value) >= 1e4 or (value and abs(value) < 1e-3):
        parts.append(f"{name} {value:.3e}")
      else:
        parts.append(f"{name} {value:.4g}")
    line = " | ".join(parts)
    if self._enabled:
      logging.info("%s", line)
    return line

  def flush(self) -> None:
    if self._enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self._enabled:
      self._tb.close()
      self._jsonl.close()
      self._enabled = False
