"""Training metrics to TensorBoard event files, `metrics.jsonl` and a readable log line
(images and audio to TensorBoard only).

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


def _drop_records_after(path: epath.Path, step: int) -> None:
  """Rewrites `path` without the records of steps > `step` (atomically: a temporary file is
  renamed over it). A torn last line (the process was killed mid-write) is dropped too."""
  kept = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if record.get("step", 0) <= step:
      kept.append(line + "\n")
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text("".join(kept))
  tmp.replace(path)


class MetricsWriter:
  """Writes scalar metrics under `workdir` (TensorBoard + JSON lines)."""

  def __init__(self, workdir: str, *, enabled: bool | None = None, resume_step: int | None = None):
    """`resume_step`: a training run (re)starting from that step first drops the records of
    later steps from metrics.jsonl (an interrupted run logged them; they are redone), so the
    file holds each step once; TensorBoard gets a purge marker (SessionLog START at
    resume_step + 1), so it discards the earlier event files' records of the redone steps."""
    self._enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self._enabled:
      workdir = epath.Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      self._tb = tensorboardX.SummaryWriter(
          logdir=str(workdir / "tensorboard"),
          purge_step=None if resume_step is None else resume_step + 1)
      path = workdir / "metrics.jsonl"
      if resume_step is not None and path.exists():
        _drop_records_after(path, resume_step)
      self._jsonl = path.open("a")

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

  def write_image(self, step: int, name: str, image_HWC: np.ndarray) -> None:
    """An RGB uint8 image [H, W, 3] (a piano roll) in TensorBoard's images tab."""
    if self._enabled:
      self._tb.add_image(name, np.asarray(image_HWC), global_step=step, dataformats="HWC")

  def write_audio(self, step: int, name: str, samples_T: np.ndarray, sample_rate: int) -> None:
    """Mono audio (float samples in [-1, 1]) in TensorBoard's audio tab."""
    if self._enabled:
      self._tb.add_audio(name, np.asarray(samples_T, np.float32), global_step=step,
                         sample_rate=sample_rate)

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
