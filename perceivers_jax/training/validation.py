"""The validation pass: NLL, accuracy and NLL by target position on validation windows.

A piece is [SOS, t_1, t_2, ...]: target t_p sits at position p, with p inputs before it.
By position (`position_ranges`): log-spaced buckets from the first target (`nll_pos_1_2`,
`nll_pos_2_4`, ... `nll_pos_32768_inf`), each piece's first k targets (`nll_first_16`,
`_128`, `_512`: where Perceiver AR's baseline windows never put a target) and the targets
with a full context of L inputs (`nll_full_context`, positions >= L).

`make_eval_step` jits the summed losses of one batch for a model state (the Trainer holds
one); `run_evaluation` runs it over this host's sequential validation windows
(`eval_batches`); `evaluate(config, workdir)` is the one-off evaluation of a saved checkpoint
(`perceivers-train --mode=eval`), which restores the parameters only. `make_token_nll_step`
and `token_nll` are the same pass per target (whole-piece surprisal, perceivers-score).
`PeriodicEvaluator` is what the training loop runs besides this pass (the music evaluator).
"""

import dataclasses
import math
import time
from typing import Any, Callable, Iterable, Mapping, Protocol

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import ml_collections
import numpy as np

from perceivers_jax.data import input_pipeline
from perceivers_jax.model import losses
from perceivers_jax.parallel import partitioning
from perceivers_jax.state import model_state
from perceivers_jax.state import run_dir
from perceivers_jax.training import config_validation
from perceivers_jax.training import metrics_writer

Batch = dict[str, Any]
EvalStep = Callable[[Any, nnx.State, Batch], dict[str, jax.Array]]
_RANGE_SUM, _RANGE_COUNT = "nll_sum/", "count/"

# Bucket edges 1, 2, 4, ... up to 2**15 (the paper's L) or L if larger, then infinity.
MIN_LAST_EDGE = 2**15
FIRST_TARGETS = (16, 128, 512)  # nll_first_k: each piece's first k targets


def position_ranges(max_length: int) -> list[tuple[str, float, float]]:
  """(metric name, low, high) of each target-position range [low, high) the evaluation
  reports (module doc): the log-spaced buckets, the first-k prefixes, the full-context part."""
  edges = [1]
  while edges[-1] < max(MIN_LAST_EDGE, max_length):
    edges.append(2 * edges[-1])
  edges.append(math.inf)
  ranges = [(f"nll_pos_{low}_{'inf' if math.isinf(high) else high}", low, high)
            for low, high in zip(edges[:-1], edges[1:])]
  ranges += [(f"nll_first_{k}", 1, k + 1) for k in FIRST_TARGETS]
  return ranges + [("nll_full_context", max_length, math.inf)]


class Evaluator(Protocol):
  """What `run_evaluation` needs (a Trainer is one)."""
  eval_step: EvalStep
  batch_sharding: NamedSharding


class PeriodicEvaluator(Protocol):
  """Work the loop runs besides the validation pass, as big_vision's evaluators: the music
  evaluator (perceivers_jax/watch/music.py) is one. Called on every host alike."""
  name: str  # its TensorBoard prefix and time-account category
  every_steps: int  # it runs at multiples of it and after the last step

  def run(self, step: int, model: nnx.Module) -> None:
    """Evaluates `model` (the parameters of `step`); the work no other host needs may go on
    in the background after it returns."""

  def log_finished(self, writer: metrics_writer.MetricsWriter, *, wait: bool = False) -> None:
    """Writes the scalars (and images, audio) of the evaluations finished by now at their
    steps; with `wait`, waits for the unfinished ones first."""


def _window_step(model: model_state.ModelState, batch_sharding: NamedSharding,
                 reduce: Callable[[dict[str, jax.Array]], dict[str, jax.Array]]) -> EvalStep:
  """The jitted (params, rest, batch) -> `reduce` of the per-target losses of the windows."""
  num_latents = model.config.model.num_latents

  def window_step(params, rest, batch):
    logits_BNV = model.merge(params, rest)(batch["inputs"], batch["positions"],
                                           deterministic=True)
    return reduce(losses.token_losses(logits_BNV, batch, num_latents, 0.0))

  jitted = jax.jit(window_step,
                   in_shardings=(model.param_shardings, model.rest_shardings, batch_sharding),
                   out_shardings=NamedSharding(model.mesh, PartitionSpec()))
  return partitioning.InMesh(jitted, model.mesh, tuple(model.config.logical_axis_rules))


def _summed(per: dict[str, jax.Array],
            ranges: list[tuple[str, float, float]]) -> dict[str, jax.Array]:
  """Summed NLL, accuracy and count, and the NLL and count per position range."""
  out = losses.sum_losses(per)
  del out["z_loss"]
  positions_BN = per["positions_BN"]  # -1 where there is no target.
  for index, (name, low, high) in enumerate(ranges):
    in_range_BN = (positions_BN >= low) & (positions_BN < high)
    # The index keeps position order through jax's sorting of dict keys.
    out[f"{_RANGE_SUM}{index:03d}/{name}"] = jnp.where(in_range_BN, per["nll_BN"], 0.0).sum()
    out[f"{_RANGE_COUNT}{index:03d}/{name}"] = in_range_BN.sum().astype(jnp.float32)
  return out


def make_eval_step(model: model_state.ModelState, batch_sharding: NamedSharding) -> EvalStep:
  """The jitted (params, rest, batch) -> summed NLL, accuracy, count, and NLL and count per
  position range (`position_ranges`)."""
  ranges = position_ranges(model.config.model.max_length)
  return _window_step(model, batch_sharding, lambda per: _summed(per, ranges))


def make_token_nll_step(model: model_state.ModelState,
                        batch_sharding: NamedSharding) -> EvalStep:
  """The jitted (params, rest, batch) -> per target nll_BN and positions_BN (-1: none)."""
  return _window_step(model, batch_sharding, lambda per: {
      "nll_BN": per["nll_BN"], "positions_BN": per["positions_BN"]})


def token_nll(token_nll_step: EvalStep, batch_sharding: NamedSharding, params: Any,
              rest: nnx.State, batches: Iterable[Mapping[str, np.ndarray]]
              ) -> tuple[np.ndarray, np.ndarray]:
  """(target positions, NLL in nats) of every target of `batches`, by position: over the
  sequential windows of one piece (one process), each of its tokens after SOS once."""
  positions, nlls = [], []
  for local in batches:
    out = jax.device_get(token_nll_step(params, rest,
                                        input_pipeline.to_global_arrays(local, batch_sharding)))
    has_target = out["positions_BN"] >= 0
    positions.append(out["positions_BN"][has_target])
    nlls.append(out["nll_BN"][has_target])
  positions_T, nll_T = np.concatenate(positions), np.concatenate(nlls)
  order = np.argsort(positions_T, kind="stable")
  return positions_T[order], nll_T[order]


def run_evaluation(evaluator: Evaluator, params: Any, rest: nnx.State,
                   batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, float]:
  """NLL (nats, bits), accuracy and NLL per position range over this host's `batches` (every
  host runs the same number of batches; sums are global). A range's `targets_in_{name}` is
  its target count, so runs over disjoint pieces pool exactly."""
  totals: dict[str, float] = {}
  num_batches = 0
  start = time.perf_counter()
  for local in batches:
    batch = input_pipeline.to_global_arrays(local, evaluator.batch_sharding)
    sums = evaluator.eval_step(params, rest, batch)
    for name, value in jax.device_get(sums).items():
      totals[name] = totals.get(name, 0.0) + float(value)
    num_batches += 1
  count = totals.get("count", 0.0)
  if not count:
    raise ValueError("Evaluation saw no targets: is the validation split empty?")
  nll = totals["nll"] / count
  metrics = {"nll": nll, "bits_per_token": nll / math.log(2),
             "accuracy": totals["correct"] / count, "targets": count, "batches": num_batches,
             "seconds": time.perf_counter() - start}
  for key in sorted(k for k in totals if k.startswith(_RANGE_COUNT) and totals[k]):
    name = key.split("/")[-1]
    metrics[name] = totals[f"{_RANGE_SUM}{key[len(_RANGE_COUNT):]}"] / totals[key]
    metrics[f"targets_in_{name}"] = totals[key]
  return metrics


def eval_batches(config: ml_collections.ConfigDict, eval_source: Any) -> Iterable[Batch]:
  """This host's sequential validation windows (re-iterable; config.eval.max_batches applied)."""
  return input_pipeline.make_eval_batches(config, eval_source, process_index=jax.process_index(),
                                          process_count=jax.process_count())


@dataclasses.dataclass(frozen=True)
class _ModelEvaluator:
  """An Evaluator for a model state alone (no optimizer is built)."""
  eval_step: EvalStep
  batch_sharding: NamedSharding


def _model_evaluator(model: model_state.ModelState) -> _ModelEvaluator:
  sharding = partitioning.batch_sharding(model.mesh)
  return _ModelEvaluator(make_eval_step(model, sharding), sharding)


def evaluate(config: ml_collections.ConfigDict, workdir: str, *,
             eval_source: Any = None, step: int | None = None) -> dict[str, float]:
  """Evaluates checkpoint `step` (default: the latest) of `workdir` on config.data.eval_split."""
  model = model_state.build(config, config_validation.job_mesh(config),
                            left_padded_windows=model_state.windows_are_left_padded(config))
  step = run_dir.saved_step(workdir, config, step)
  params = run_dir.restore_params(workdir, step, model.abstract_params)
  if eval_source is None:
    eval_source = input_pipeline.open_data_source(config, config.data.eval_split)
  metrics = run_evaluation(_model_evaluator(model), params, model.init_rest(),
                           eval_batches(config, eval_source))
  writer = metrics_writer.MetricsWriter(workdir)
  writer.write_scalars(step, metrics, prefix="eval_once/")
  writer.log_progress(step, config.train.num_steps, metrics)
  writer.close()
  return metrics
