"""A sampling job's output directory, shared by every host of the job and by its reruns.

Files: per sample i, sample_{i:04d}.npy / .mid / .png / .json, each written atomically (a
temporary name renamed into place; `write_sample_files`) and the .json sidecar last, so a
sidecar means a complete sample;
run.json, the job's settings, which a rerun must repeat; samples.jsonl, the manifest (one line
per sample), rebuilt from the sidecars by process 0 at the end of every run.

Hosts: every process of a multi-host job runs the same code on the same directory, which all
hosts must mount (NFS, Lustre, a gcsfuse bucket; checked before anything compiles). What they
must agree on, which samples are still missing, each host reads and all combine with an
all-gather, so that every host runs the same batches; process 0 alone creates, cleans and
summarises the directory.
"""

import json
import os
import pathlib
import sys
import time
from typing import Any, Callable, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np
import tqdm

from perceivers_jax.data import piano_roll
from perceivers_jax.data import tokens

RUN_FILE = "run.json"
MANIFEST = "samples.jsonl"
TMP_SUFFIX = ".tmp"  # a file being written; left over only by a killed run.
SUFFIXES = (".mid", ".npy", ".png", ".json")  # a sample's files, the sidecar (.json) last.


class SamplingError(ValueError):
  """An invalid sampling request; the message names the setting (= its CLI flag)."""


def stem(output_dir: pathlib.Path, index: int) -> pathlib.Path:
  """sample_{index:04d}: sample `index`'s file names, less their suffix."""
  return output_dir / f"sample_{index:04d}"


def atomic_write(path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> None:
  """`write(temporary path)`, then a rename onto `path`: readers see all of it or nothing."""
  tmp = path.with_name(f"{path.name}.{jax.process_index()}{TMP_SUFFIX}")
  write(tmp)
  os.replace(tmp, path)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def any_host(flags: np.ndarray) -> np.ndarray:
  """Elementwise OR of a bool array over every process (the array itself on one process)."""
  if jax.process_count() == 1:
    return flags
  return np.asarray(multihost_utils.process_allgather(flags.astype(np.int32))).any(axis=0)


def _read_run(out: pathlib.Path) -> dict[str, Any] | None:
  file = out / RUN_FILE
  return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None


def open_output_dir(output_dir: str | os.PathLike, run: dict[str, Any]) -> pathlib.Path:
  """Readies `output_dir` for the run described by `run` (flag name -> value) on every host.

  Raises SamplingError, with the same message on every host, if the directory holds samples
  of other settings or if some host does not see the files process 0 writes there.
  """
  out = pathlib.Path(output_dir)
  existing = _read_run(out)
  if existing is not None and existing != run:
    name = next(k for k in sorted(set(run) | set(existing)) if run.get(k) != existing.get(k))
    raise SamplingError(
        f"--{name}={run.get(name)}: --output_dir={out} holds samples made with "
        f"--{name}={existing.get(name)} ({RUN_FILE}); rerun with the same flags to complete "
        "them, or use a new --output_dir.")
  _barrier("sampling: run.json read")  # before process 0 may write it.
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(f"*{TMP_SUFFIX}"):
      leftover.unlink()
    if existing is None:
      atomic_write(out / RUN_FILE, lambda p: p.write_text(json.dumps(run, indent=2,
                                                                     sort_keys=True)))
  _barrier("sampling: output dir ready")
  if any_host(np.array([_read_run(out) != run]))[0]:
    raise SamplingError(f"--output_dir={out}: not every host sees the {RUN_FILE} process 0 "
                        "wrote there; give a directory all hosts share (NFS, gcsfuse).")
  return out


def _complete(out: pathlib.Path, index: int) -> bool:
  base = stem(out, index)
  try:
    sidecar = json.loads(base.with_suffix(".json").read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return False
  return sidecar.get("sample_index") == index and all(
      base.with_suffix(suffix).is_file() for suffix in SUFFIXES)


def missing_samples(out: pathlib.Path, wanted: Sequence[int]) -> list[int]:
  """The samples of `wanted` not yet written completely by any host (the same on every host)."""
  wanted = sorted(set(wanted))
  done_W = any_host(np.array([_complete(out, index) for index in wanted], bool))
  return [index for index, done in zip(wanted, done_W) if not done]


class Progress:
  """Process 0's bar over the job's samples (every host moves in step: batches are global)."""

  def __init__(self, total: int, done: int):
    self._bar = tqdm.tqdm(total=total, initial=done, unit="sample", desc="sampling",
                          file=sys.stderr, smoothing=0, disable=jax.process_index() != 0)
    self._start = time.perf_counter()

  def advance(self, count: int) -> None:
    self._bar.update(count)

  def close(self) -> float:
    """Closes the bar; returns the seconds since it opened."""
    self._bar.close()
    return time.perf_counter() - self._start


def finish(out: pathlib.Path, generated: Sequence[int], seconds: float) -> str | None:
  """After every host has written its samples, process 0 rebuilds samples.jsonl from all the
  sidecars; returns (on process 0) the job's end line: samples/s and tokens/s of this run."""
  _barrier("sampling: all samples written")
  if jax.process_index() != 0:
    return None
  entries = []
  for sidecar_path in sorted(out.glob("sample_*.json")):
    sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    entries.append({
        "index": sidecar["sample_index"], "seed": sidecar["seed"],
        "files": [sidecar_path.with_suffix(suffix).name for suffix in SUFFIXES],
        "num_tokens": sidecar["num_tokens"], "num_generated": sidecar["num_generated"],
        "duration_seconds": sidecar["duration_seconds"],
        "eos_reached": sidecar["eos_reached"]})
  atomic_write(out / MANIFEST, lambda p: p.write_text(
      "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in entries)))
  new = set(generated)
  new_tokens = sum(entry["num_generated"] for entry in entries if entry["index"] in new)
  rate = lambda count: count / seconds if seconds > 0 else 0.0
  return (f"Sampled {len(new)} samples ({new_tokens} tokens) in {seconds:.1f} s on "
          f"{jax.process_count()} process(es) x {jax.local_device_count()} device(s): "
          f"{rate(len(new)):.2f} samples/s, {rate(new_tokens):.0f} tokens/s; "
          f"{len(entries)} samples in {out / MANIFEST}")


def _trim(prompt_P: np.ndarray, generated_T: np.ndarray) -> tuple[np.ndarray, bool]:
  """prompt + generated tokens up to and including EOS (or all); whether EOS was reached."""
  eos = np.flatnonzero(generated_T == tokens.EOS_ID)
  end = eos[0] + 1 if eos.size else len(generated_T)
  return np.concatenate([prompt_P, generated_T[:end]]).astype(np.int32), bool(eos.size)


def _save_npy(path: pathlib.Path, array: np.ndarray) -> None:
  with open(path, "wb") as f:  # a file object: np.save would append .npy to the name.
    np.save(f, array)


def write_sample_files(stem: pathlib.Path, prompt_P: np.ndarray, generated_T: np.ndarray, *,
                       max_note_seconds: float, sidecar: dict[str, Any]) -> dict[str, Any]:
  """Writes a sample's .npy (prompt + generated tokens up to EOS), .mid, .png (its piano roll,
  the prompt shaded), then, completing it, the .json `sidecar` with the token counts, duration
  and whether EOS was reached added; each file atomically. Returns the sidecar."""
  sequence, eos_reached = _trim(prompt_P, generated_T)
  atomic_write(stem.with_suffix(".npy"), lambda path: _save_npy(path, sequence))
  # The MIDI holds the notes as the tokeniser reads them: re-encoding first resolves
  # same-pitch overlaps (common in samples), whose NOTE_OFFs a MIDI reader would pair otherwise.
  notes = tokens.tokens_to_note_sequence(sequence, max_note_seconds)
  atomic_write(stem.with_suffix(".mid"), lambda path: tokens.tokens_to_midi_file(
      tokens.note_sequence_to_tokens(notes), path))
  atomic_write(stem.with_suffix(".png"), lambda path: piano_roll.write(
      notes, path, title=stem.name, primer_seconds=tokens.tokens_duration_seconds(prompt_P)))
  sidecar = dict(sidecar, num_tokens=int(len(sequence)),
                 num_generated=int(len(sequence) - len(prompt_P)),
                 prompt_tokens=int(len(prompt_P)),
                 duration_seconds=tokens.tokens_duration_seconds(sequence),
                 eos_reached=eos_reached)
  atomic_write(stem.with_suffix(".json"), lambda path: path.write_text(
      json.dumps(sidecar, indent=2, sort_keys=True), encoding="utf-8"))
  return sidecar
