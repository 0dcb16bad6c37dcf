"""The time account of a job: the share of its wall time in each kind of work (MaxText's
goodput idea, computed locally).

The job wraps its work in spans of named categories (`with account.span("data_wait"): ...`);
spans do not nest. Compilation is found wherever it happens: jax reports the time span of
every trace, lowering and XLA compilation (`jax.monitoring`, events under
"/jax/core/compile/"), and the part of a span they cover moves from the span's category to
"compilation". "other" is the wall time no span covers (logging, progress lines), so the
shares add up to 1 by construction; that "other" stays small is what shows the spans cover
the job. The account also counts the XLA programs the job compiled or fetched from the
persistent compilation cache (`compilations`), those fetched (`cache_hits`), and the time to
the first step.

Device work is asynchronous: a span holds the host's time. A training loop that reads each
step's outputs one step late (so the device never waits) attributes the device's step time to
the span that waits for it, and fetches the next batch while the device runs the previous
step: its data waiting is then an upper bound of the time the device sat idle for data, and
its train-step time a lower bound of the device's.
"""

import collections
import contextlib
import threading
import time
from typing import Iterator

from jax import monitoring

COMPILATION = "compilation"
OTHER = "other"
_COMPILE_EVENTS = "/jax/core/compile/"
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def _covered(intervals: list[tuple[float, float]], start: float, end: float) -> float:
  """Seconds of [start, end] inside the union of `intervals` (which may overlap or nest)."""
  clipped = sorted((max(a, start), min(b, end)) for a, b in intervals if b > start and a < end)
  total, reach = 0.0, start
  for a, b in clipped:
    if b > reach:
      total += b - max(a, reach)
      reach = b
  return total


class TimeAccount:
  """Seconds per category of one process's job, from its creation until `summary()`."""

  def __init__(self, clock=time.time):
    self._clock = clock  # jax stamps its compile events with time.time().
    self._start = clock()
    self._seconds: dict[str, float] = collections.defaultdict(float)
    self._compile_intervals: list[tuple[float, float]] = []
    self._lock = threading.Lock()
    self._open = False
    self.compilations = 0
    self.cache_hits = 0
    self.time_to_first_step: float | None = None
    monitoring.register_event_time_span_listener(self._on_time_span)
    monitoring.register_event_listener(self._on_event)

  def _on_time_span(self, event: str, start: float, end: float, **_) -> None:
    if event.startswith(_COMPILE_EVENTS):
      with self._lock:
        self._compile_intervals.append((start, end))
        self.compilations += event == _BACKEND_COMPILE_EVENT

  def _on_event(self, event: str, **_) -> None:
    if event == _CACHE_HIT_EVENT:
      with self._lock:
        self.cache_hits += 1

  @contextlib.contextmanager
  def span(self, category: str) -> Iterator[None]:
    """Counts the time inside the block to `category`, its compilation to "compilation"."""
    if self._open:
      raise RuntimeError(f"time account: span {category!r} opened inside another span")
    self._open = True
    start = self._clock()
    try:
      yield
    finally:
      end = self._clock()
      self._open = False
      with self._lock:
        compiling = _covered(self._compile_intervals, start, end)
        # Later spans start after `end`: intervals ending before it are never needed again.
        self._compile_intervals = [iv for iv in self._compile_intervals if iv[1] > end]
      self._seconds[COMPILATION] += compiling
      self._seconds[category] += end - start - compiling

  def first_step_done(self) -> None:
    """Records the time to the first step (once)."""
    if self.time_to_first_step is None:
      self.time_to_first_step = self._clock() - self._start

  def summary(self) -> dict[str, float]:
    """{wall_seconds, CATEGORY_seconds, CATEGORY_share (adding up to 1), compilations,
    cache_hits, time_to_first_step_seconds}; "other" is the wall time outside every span."""
    wall = self._clock() - self._start
    seconds = dict(self._seconds)
    seconds[OTHER] = wall - sum(seconds.values())
    out = {"wall_seconds": wall, "compilations": self.compilations,
           "cache_hits": self.cache_hits}
    if self.time_to_first_step is not None:
      out["time_to_first_step_seconds"] = self.time_to_first_step
    for category, value in seconds.items():
      out[f"{category}_seconds"] = value
      out[f"{category}_share"] = value / wall if wall > 0 else 0.0
    return out

  def line(self) -> str:
    """One readable line: wall time, each category's share, compilations and cache hits."""
    s = self.summary()
    categories = sorted((k[:-len("_share")] for k in s if k.endswith("_share")),
                        key=lambda c: (c == OTHER, -s[f"{c}_share"]))
    shares = ", ".join(f"{c.replace('_', ' ')} {100 * s[f'{c}_share']:.1f}%" for c in categories)
    first = (f"; first step after {s['time_to_first_step_seconds']:.1f} s"
             if "time_to_first_step_seconds" in s else "")
    return (f"time account of this process ({s['wall_seconds']:.1f} s): {shares}{first}; "
            f"{s['compilations']} XLA programs, {s['cache_hits']} of them from the persistent "
            "compilation cache")

  def close(self) -> None:
    monitoring.unregister_event_time_span_listener(self._on_time_span)
    monitoring.unregister_event_listener(self._on_event)
