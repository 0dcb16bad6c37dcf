"""Tokenising MIDI files in worker processes, where one odd file costs only itself.

A file over a cap (`Limits`) is skipped after parsing, before the costly quantisation and
Performance encoding. A worker that dies (killed for memory, a segfault in a parser) breaks
its process pool: the files then in flight are rerun one per fresh process, so the file that
kills its process again is reported with the signal, the others are kept, and the build goes
on with a new pool.
"""

import concurrent.futures
from concurrent.futures import process as futures_process
import dataclasses
import multiprocessing
import os
import signal

import numpy as np
import tqdm

from perceivers_jax.data import tokens as tokens_lib

# MAESTRO v3.0.0 holds 1,276 performances, 198.7 h and about 7.0M notes (on average 9.3 min
# and 5,500 notes a piece). The 10 real pieces of the tests play 7-14 notes/s; the longest,
# Maestro_6, lasts 2,342 s, and Maestro_7 holds the most notes, 20,450. MAESTRO's longest
# performances last well under an hour, so even at 25 notes/s a piece stays below 90,000
# notes: the caps below leave every real piece more than 2x under them, while a corrupt or
# generated file that would take gigabytes (millions of notes, days of events) is skipped.
DEFAULT_MAX_NOTES = 200_000
DEFAULT_MAX_SECONDS = 3 * 3600.0
# Test-only: a worker tokenising a file of this base name SIGKILLs itself, as the kernel's
# OOM killer would (tests/builder_test.py); never set outside tests.
DIE_ON_ENV = "PERCEIVERS_TEST_WORKER_DIES_ON"

Result = tuple[np.ndarray | None, str]  # (tokens, "") or (None, reason)


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-file caps; a file over one is skipped and reported (0 = no cap)."""

  max_notes: int = DEFAULT_MAX_NOTES
  max_seconds: float = DEFAULT_MAX_SECONDS

  def __post_init__(self):
    if self.max_notes < 0 or self.max_seconds < 0:
      raise ValueError(f"max_notes={self.max_notes} and max_seconds={self.max_seconds} must "
                       "be >= 0 (0 = no cap)")

  def excess(self, num_notes: int, seconds: float) -> str:
    """Why a piece is over a cap ("" if it is not)."""
    if self.max_notes and num_notes > self.max_notes:
      return f"{num_notes:,} notes, over the cap of {self.max_notes:,} (--max_notes)"
    if self.max_seconds and seconds > self.max_seconds:
      return f"{seconds:,.0f} s long, over the cap of {self.max_seconds:,.0f} s (--max_seconds)"
    return ""


def tokenise(path: str, limits: Limits) -> Result:
  """One file -> (tokens, "") or (None, reason naming the file); never raises."""
  if not os.path.isfile(path):
    return None, f"{path}: file listed but missing"
  if os.environ.get(DIE_ON_ENV) == os.path.basename(path):
    os.kill(os.getpid(), signal.SIGKILL)
  try:
    ns = tokens_lib.load_note_sequence(path)
    over = limits.excess(len(ns.notes), ns.total_time)
    if over:
      return None, f"{path}: {over}"
    return tokens_lib.note_sequence_to_tokens(ns), ""
  except tokens_lib.MidiError as e:
    return None, str(e)
  except Exception as e:  # pylint: disable=broad-except
    # One odd file must never abort a build of thousands.
    return None, f"{path}: {type(e).__name__}: {e}"


def _tokenise_into(connection, path: str, limits: Limits) -> None:
  connection.send(tokenise(path, limits))


def _spawn():
  # spawn, not fork: the caller may have started threads (JAX, Grain).
  return multiprocessing.get_context("spawn")


def _death_reason(path: str, exitcode: int | None) -> str:
  if exitcode is not None and exitcode < 0:
    how = f"was killed by {signal.Signals(-exitcode).name}"
  else:
    how = f"exited with code {exitcode}"
  return (f"{path}: the worker process tokenising it {how} (out of memory? lower "
          "--max_notes/--max_seconds to skip such files before tokenising)")


def tokenise_alone(path: str, limits: Limits) -> Result:
  """`tokenise` in a process of its own; a dying process gives (None, why it died)."""
  receiver, sender = _spawn().Pipe(duplex=False)
  process = _spawn().Process(target=_tokenise_into, args=(sender, path, limits))
  process.start()
  sender.close()  # so recv() sees EOF when the child dies
  try:
    result = receiver.recv()
  except EOFError:
    result = None
  process.join()
  return result if result is not None else (None, _death_reason(path, process.exitcode))


def tokenise_files(paths: list[str], limits: Limits, num_workers: int) -> list[Result]:
  """`tokenise` of each path in `num_workers` processes, in order.

  At most `num_workers` files are in flight, so a broken pool names its suspects.
  """
  if num_workers < 1:
    raise ValueError(f"num_workers must be >= 1, got {num_workers}")
  results: dict[int, Result] = {}
  todo = list(range(len(paths)))[::-1]  # popped from the end: in order
  with tqdm.tqdm(total=len(paths), desc="tokenising", unit="piece") as progress:
    while todo:
      in_flight: dict[concurrent.futures.Future, int] = {}
      try:
        with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=_spawn()) as pool:
          while todo or in_flight:
            while todo and len(in_flight) < num_workers:
              i = todo.pop()
              in_flight[pool.submit(tokenise, paths[i], limits)] = i
            done, _ = concurrent.futures.wait(
                in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
              result = future.result()  # BrokenProcessPool if a worker died
              results[in_flight.pop(future)] = result
              progress.update()
      except futures_process.BrokenProcessPool:
        # The dead worker held one of these; alone, the others finish and it dies again.
        for i in sorted(in_flight.values()):
          results[i] = tokenise_alone(paths[i], limits)
          progress.update()
  return [results[i] for i in range(len(paths))]
