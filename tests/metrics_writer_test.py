"""Metrics after a resume: each step once in metrics.jsonl, and a TensorBoard purge marker."""

import json
import pathlib
import struct

from tensorboardX.proto import event_pb2

from perceivers_jax.training import metrics_writer


def _events(logdir: pathlib.Path) -> list[event_pb2.Event]:
  """Every event of every TFRecord event file under `logdir`, file by file in name order."""
  events = []
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[offset + 12:offset + 12 + length])
      events.append(event)
      offset += 12 + length + 4
  return events


def test_resume_writes_each_step_once_and_purges_redone_tensorboard_steps(tmp_path):
  first = metrics_writer.MetricsWriter(str(tmp_path), enabled=True, resume_step=None)
  for step in range(1, 9):
    first.write_scalars(step, {"loss": float(step)}, prefix="train/")
  first.close()  # Killed after step 8; the last checkpoint was step 5.

  resumed = metrics_writer.MetricsWriter(str(tmp_path), enabled=True, resume_step=5)
  for step in range(6, 11):
    resumed.write_scalars(step, {"loss": 10.0 * step}, prefix="train/")
  resumed.close()

  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(1, 11))
  # TensorBoard drops earlier records at or after a SessionLog START's step (purge_step).
  starts = [e.step for e in _events(tmp_path / "tensorboard")
            if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START]
  assert starts == [6]
