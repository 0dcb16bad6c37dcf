"""Profiler traces of chosen steps (config.profile.steps; perceivers-sample --profile_steps).

jax.profiler writes a trace as LOGDIR/plugins/profile/RUN/HOST.xplane.pb: TensorBoard's
profile tab (tensorboard-plugin-profile) and XProf open it (`xprof --logdir=LOGDIR`), with
each step marked (`StepTraceAnnotation`). Consecutive chosen steps make one trace; the job
ends a trace early where other work follows a step (an evaluation, a checkpoint), so a trace
holds steps only. The first step a process runs compiles its program: it is never traced (a
warning says so), since its trace would show compilation, not the step. On several hosts
each host writes its own trace file.
"""

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any, ContextManager

from absl import logging
import jax

from perceivers_jax import config_base


def check_steps(steps: Iterable[Any], field: str) -> tuple[int, ...]:
  """`steps` as sorted step numbers; InputError naming `field` if one is not a positive int."""
  steps = tuple(steps)
  if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
    raise config_base.InputError(f"{field}={steps}: steps must be positive integers, e.g. "
                                 "(101, 102, 103).")
  return tuple(sorted(set(steps)))


class StepTracer:
  """Traces the chosen steps of a loop whose first step in this process is `first_step`."""

  def __init__(self, logdir: str, steps: Sequence[int], *, first_step: int, name: str):
    self._logdir, self._name = str(logdir), name
    self._steps = set(steps)
    if first_step in self._steps:
      logging.warning("Profile: %s %d is the first this process runs and compiles its program; "
                      "it is not traced (choose later ones).", name, first_step)
      self._steps.discard(first_step)
    self._tracing = False
    self._run_start = 0
    self.written: list[tuple[int, int]] = []  # (first, last) step of each trace written.

  def step(self, step: int) -> ContextManager:
    """Enter around step `step`'s work: starts a trace at a chosen step and marks the step."""
    if step in self._steps and not self._tracing:
      jax.profiler.start_trace(self._logdir)
      self._tracing, self._run_start = True, step
    if self._tracing:
      return jax.profiler.StepTraceAnnotation(self._name, step_num=step)
    return contextlib.nullcontext()

  def after(self, step: int, outputs: Any, *, more_work: bool = False) -> None:
    """After step `step`: ends the trace (once `outputs` are computed) unless the next step is
    chosen too and no other work (`more_work`) comes first."""
    if self._tracing and (more_work or step + 1 not in self._steps):
      jax.block_until_ready(outputs)
      self._stop(step)

  def _stop(self, last: int) -> None:
    jax.profiler.stop_trace()
    self._tracing = False
    self.written.append((self._run_start, last))
    logging.info("Profile of %s %d-%d written under %s/plugins/profile.", self._name,
                 self._run_start, last, self._logdir)

  def close(self, last_step: int) -> None:
    """Ends a trace still open (the loop stopped early)."""
    if self._tracing:
      self._stop(last_step)
