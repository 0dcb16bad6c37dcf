"""Training: the Trainer (sharded train state, jitted step) and the loop, checkpoints, metrics.

`train_and_evaluate(config, workdir)` trains (resuming from the latest checkpoint in
`workdir`, or fine-tuning from config.train.init_from while there is none), evaluates
periodically on the validation split's sequential windows (`validation.py`, which also holds
the one-off evaluation of a checkpoint), runs the periodic evaluators it is given (the music
evaluator, built above training in perceivers_jax/watch/) and saves on an interval and on
preemption. Around the loop (perceivers_jax/runtime/): jax's persistent compilation cache,
profiler traces of config.profile.steps and the time account of the process. The dry
run (sizes and compiled memory) is `dry_run.py`; FLOPs and MFU are `flops.py`; the step
itself, with its parts passed in, is `train_step.py` (`build_trainer` binds and jits it).

State layout (what the checkpoints hold): {"step": int32, "params": nested dict of arrays (the
model's nnx.Param values as a pure dict), "opt_state": optax state, "loss_window": the losses of
the last accepted steps}. The model, its abstract parameters and their shardings come from
`state/model_state.py`; parameters are created directly in their shardings (`ModelState.init`:
jax.jit with out_shardings), never whole on one host, and the optimizer state beside them.

Fine-tuning: config.train.init_from (an export directory, either format, or a training
workdir) supplies the parameters only (fresh optimizer state, step 0) of a run whose workdir
has no checkpoint; once it has one, the run resumes from its workdir as any other.
config.train.freeze names parameter groups (perceivers_jax/model/param_groups.py) that get zero
updates and no optimizer state (optax.multi_transform with set_to_zero); their gradients are
dropped before clipping and the grad_norm metric.

Rejected updates: the step judges each update (`update_guard.py`: non-finite, exploded, too
large for the parameters, or after a loss spike) and applies only an accepted one; a rejected
one keeps the previous parameters and optimizer state (only the step counter and the data
advance). config.train.on_bad_update="stop" (default) then ends the run with a
RejectedUpdateError naming the step, the reason and the last good checkpoint; "skip" goes on
and counts the skipped updates in train/skipped_updates. No checkpoint ever holds a rejected
update. The state also holds the loss-spike check's window of accepted losses (`loss_window`).
"""

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

from absl import logging
from etils import epath
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
import optax

from perceivers_jax import config_base
from perceivers_jax.data import input_pipeline
from perceivers_jax.model import param_groups
from perceivers_jax.parallel import partitioning
from perceivers_jax.runtime import compilation_cache
from perceivers_jax.runtime import time_account
from perceivers_jax.runtime import traces
from perceivers_jax.state import checkpointing
from perceivers_jax.state import model_state
from perceivers_jax.state import run_dir
from perceivers_jax.training import config_validation
from perceivers_jax.training import validation
from perceivers_jax.training import flops
from perceivers_jax.training import metrics_writer
from perceivers_jax.training import optimizer as optimizer_lib
from perceivers_jax.training import train_step as train_step_lib
from perceivers_jax.training import update_guard

State = train_step_lib.State
Batch = train_step_lib.Batch


# ----------------------------------------------------------------------------------------------
# The Trainer: state, shardings and the jitted step.


@dataclasses.dataclass
class Trainer:
  """Everything built from a config and a mesh: shardings and the jitted functions."""
  config: ml_collections.ConfigDict
  mesh: Mesh
  model: model_state.ModelState  # the model, its abstract parameters and their shardings.
  abstract_state: State  # ShapeDtypeStructs carrying the target shardings.
  abstract_rest: nnx.State  # the model's non-parameter state (RNG streams), replicated.
  state_shardings: State
  batch_sharding: NamedSharding
  schedule: optax.Schedule
  init_fn: Callable[[], tuple[State, nnx.State]]  # config.seed's state and rest, sharded.
  init_rest: Callable[[], nnx.State]  # the non-parameter state (RNG streams) alone.
  state_from_params: Callable[[Any], State]  # given params, fresh optimizer state, step 0.
  limits: update_guard.Limits  # the update checks' thresholds (config.train).
  empty_loss_window: Callable[[], Any]  # the loss-spike check's window before any step.
  train_step: Callable[[State, nnx.State, Batch], tuple[State, dict[str, jax.Array]]]
  eval_step: Callable[[Any, nnx.State, Batch], dict[str, jax.Array]]

  @property
  def num_params(self) -> int:
    return self.model.num_params


def _is_masked(x: Any) -> bool:
  """A frozen parameter's empty slot in the optimizer state."""
  return isinstance(x, optax.MaskedNode)


def build_trainer(config: ml_collections.ConfigDict, mesh: Mesh) -> Trainer:
  """Abstract state, shardings and jitted init/train/eval functions for `config` on `mesh`:
  the model's (`ModelState`), the optimizer state's, and `train_step.train_step` bound to its
  parts."""
  rules = tuple(config.logical_axis_rules)
  schedule = optimizer_lib.make_schedule(config.train)
  model = model_state.build(config, mesh,
                            left_padded_windows=model_state.windows_are_left_padded(config))
  optimizer = optimizer_lib.make_optimizer(config.train)
  # Configs saved before fine-tuning existed have no train.freeze.
  freeze = tuple(config.train.get("freeze", ()))
  frozen = param_groups.frozen_mask(model.abstract_params, freeze) if freeze else None
  if frozen is not None:
    optimizer = optimizer_lib.with_frozen_groups(optimizer, frozen)
  param_shardings, rest_shardings = model.param_shardings, model.rest_shardings
  replicated = NamedSharding(mesh, PartitionSpec())
  limits = update_guard.Limits.of(config.train)

  def state_from_params(params):
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": optimizer.init(params),
            "loss_window": update_guard.empty_loss_window(limits)}

  abstract_state = jax.eval_shape(state_from_params, model.abstract_params)
  opt_shardings = optax.tree_utils.tree_map_params(
      optimizer, lambda leaf, s: leaf if _is_masked(leaf) else s, abstract_state["opt_state"],
      param_shardings, transform_non_params=lambda _: replicated, is_leaf=_is_masked)
  state_shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings,
                     "loss_window": jax.tree.map(lambda _: replicated,
                                                 abstract_state["loss_window"])}
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
      state_shardings)
  batch_sharding = partitioning.batch_sharding(mesh)
  step = functools.partial(
      train_step_lib.train_step, model=model, optimizer=optimizer, limits=limits, frozen=frozen,
      schedule=schedule, num_microbatches=config.train.microbatches,
      dropout_seed=config.seed + 1, z_loss=config.train.z_loss)

  in_mesh = functools.partial(partitioning.InMesh, mesh=mesh, rules=rules)
  fresh_state = in_mesh(jax.jit(state_from_params, in_shardings=(param_shardings,),
                                out_shardings=state_shardings, donate_argnums=(0,)))

  def init_fn():
    params, rest = model.init()
    return fresh_state(params), rest

  return Trainer(
      config=config, mesh=mesh, model=model, abstract_state=abstract_state,
      abstract_rest=model.abstract_rest,
      state_shardings=state_shardings, batch_sharding=batch_sharding, schedule=schedule,
      init_fn=init_fn, init_rest=model.init_rest, state_from_params=fresh_state,
      limits=limits,
      empty_loss_window=in_mesh(jax.jit(lambda: update_guard.empty_loss_window(limits),
                                        out_shardings=state_shardings["loss_window"])),
      train_step=in_mesh(jax.jit(
          step, in_shardings=(state_shardings, rest_shardings, batch_sharding),
          out_shardings=(state_shardings, replicated), donate_argnums=(0,))),
      eval_step=validation.make_eval_step(model, batch_sharding))


# ----------------------------------------------------------------------------------------------
# Setup shared by train / eval / dry run.


def build_trainer_for(config: ml_collections.ConfigDict) -> Trainer:
  """Validates `config` for this job's devices, then builds its mesh and Trainer."""
  return build_trainer(config, config_validation.job_mesh(config))


def pretrained_params(trainer: Trainer, source: str) -> Any:
  """The parameters of `source` (config.train.init_from: an export or a training workdir) in
  `trainer`'s shardings and dtypes; ValueError naming a parameter whose shape differs."""
  params, description = run_dir.load_params(source, trainer.model.abstract_params)
  update_guard.check_sane(params, f"config.train.init_from={source} ({description})",
                          "fine-tune from an earlier checkpoint or export.")
  logging.info("Fine-tuning from the parameters of %s (fresh optimizer, step 0).", description)
  return params


def _resume(ckpt: checkpointing.Checkpointer, step: int, trainer: Trainer,
            train_iter: Any) -> State:
  """The train state of checkpoint `step` (and the data iterator's), refused when its parameters
  are non-finite or exploded. A checkpoint saved before the loss window existed resumes with an
  empty one: the loss-spike check waits until it is half full again."""
  saved_window = ckpt.saved_state_shapes(step).get("loss_window")
  size = trainer.limits.loss_spike_window
  if saved_window is not None and saved_window["losses"] != (size,):
    config_base.fail("train.loss_spike_window", size,
                     f"checkpoint step {step} in {ckpt.directory} holds a window of "
                     f"{saved_window['losses'][0]} losses; resume with that size.")
  if saved_window is None:
    logging.warning("Checkpoint step %d predates the loss-spike check's window: it starts "
                    "empty.", step)
    older = {k: v for k, v in trainer.abstract_state.items() if k != "loss_window"}
    state = {**ckpt.restore(step, older, train_iter), "loss_window": trainer.empty_loss_window()}
  else:
    state = ckpt.restore(step, trainer.abstract_state, train_iter)
  update_guard.check_sane(state["params"], f"Checkpoint step {step} in {ckpt.directory}",
                          "delete that step's folder to resume from the one before it.")
  return state


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / run_dir.CONFIG_FILE).write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       train_source: Any = None, eval_source: Any = None,
                       evaluators: Sequence[validation.PeriodicEvaluator] = ()) -> dict[str, float]:
  """Trains to config.train.num_steps, resuming from `workdir`; returns the last eval metrics.

  `train_source` / `eval_source` default to the TFDS splits of config.data; tests pass any
  random-access sequence of {"tokens": int32 array}. `evaluators` run at their own intervals.
  The time account goes to TensorBoard and metrics.jsonl (time/) and the last log line.
  """
  cache = compilation_cache.settings(config, workdir)
  profile_steps = traces.check_steps(config.get("profile", {}).get("steps", ()),
                                     "config.profile.steps")
  mesh = config_validation.job_mesh(config)  # A bad config's one line comes before any other.
  account = time_account.TimeAccount()
  try:
    with compilation_cache.enabled(*cache):
      return _train(config, workdir, mesh, account, profile_steps, train_source, eval_source,
                    evaluators)
  finally:
    account.close()


def _train(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh,
           account: time_account.TimeAccount,
           profile_steps: Sequence[int], train_source: Any, eval_source: Any,
           evaluators: Sequence[validation.PeriodicEvaluator]) -> dict[str, float]:
  with account.span("setup"):
    trainer = build_trainer(config, mesh)
    _write_config(config, workdir)
    if train_source is None:
      train_source = input_pipeline.open_data_source(config, config.data.train_split)
    if eval_source is None:
      eval_source = input_pipeline.open_data_source(config, config.data.eval_split)
    validation_batches = validation.eval_batches(config, eval_source)
    train_iter = input_pipeline.make_train_iterator(
        config, train_source, seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count())

    ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir), config.checkpoint,
                                      clean_partial_saves=True)
    latest = ckpt.latest_step()
    if latest is None and config.train.get("init_from"):
      state = trainer.state_from_params(pretrained_params(trainer, config.train.init_from))
      rest = trainer.init_rest()
    elif latest is None:
      state, rest = trainer.init_fn()
    else:
      state = _resume(ckpt, latest, trainer, train_iter)
      rest = trainer.init_rest()
      logging.info("Resuming from step %d.", latest)
    step = start_step = int(jax.device_get(state["step"]))

  # Steps after start_step that a killed run had logged are redone: their records are dropped.
  writer = metrics_writer.MetricsWriter(workdir, resume_step=start_step)
  watcher = checkpointing.PreemptionWatcher()
  guard = update_guard.UpdateGuard(config.train.on_bad_update, trainer.limits, ckpt)
  tracer = traces.StepTracer(str(epath.Path(workdir) / "tensorboard"), profile_steps,
                             first_step=start_step + 1, name="train")
  num_steps = config.train.num_steps
  peak = flops.peak_flops_per_device(config)
  if jax.process_index() == 0:
    logging.info("%d parameters; %.3g train FLOPs per step; peak %s per device.",
                 trainer.num_params, flops.train_flops_per_window(config.model) * config.train.batch_size,
                 f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (no MFU)")

  eval_metrics: dict[str, float] = {}
  interval_start, interval_steps = time.perf_counter(), 0
  try:
    while step < num_steps:
      with account.span("data_wait"):
        batch = input_pipeline.to_global_arrays(next(train_iter), trainer.batch_sharding)
      with account.span("train_steps"):
        with tracer.step(step + 1):
          state, metrics = trainer.train_step(state, rest, batch)
        step += 1
        interval_steps += 1
        guard.after_step(step, metrics)  # waits for the previous step.
        if step == start_step + 1:
          jax.block_until_ready(metrics)  # Throughput excludes the first step's compilation.
          account.first_step_done()
          interval_start, interval_steps = time.perf_counter(), 0
        is_last = step == num_steps
        run_eval = step % config.eval.every_steps == 0 or is_last
        due = [e for e in evaluators if step % e.every_steps == 0 or is_last]
        more_work = run_eval or bool(due) or ckpt.should_save(step)
        if more_work or step % config.log_every_steps == 0:
          guard.settle()  # waits for this step; "stop" raises before it is logged or saved.
        tracer.after(step, metrics, more_work=more_work)

      if step % config.log_every_steps == 0 or is_last:
        scalars = jax.device_get(metrics)
        for key in ("rejected", "update_ratio", "loss_z"):  # the guard's, per step.
          del scalars[key]
        scalars.update(guard.take_interval())  # skips and largest ratio / z since the last record.
        if interval_steps:  # Not on the very first step (its time is compilation).
          scalars.update(flops.throughput((time.perf_counter() - interval_start) / interval_steps,
                                     config, peak))
        writer.write_scalars(step, scalars, prefix="train/")
        writer.log_progress(step, num_steps, {k: scalars[k] for k in (
            "loss", "accuracy", "grad_norm", "lr", "tokens_per_s") if k in scalars})
        for evaluator in evaluators:
          with account.span(evaluator.name):
            evaluator.log_finished(writer)
        interval_start, interval_steps = time.perf_counter(), 0

      if run_eval:
        with account.span("evaluation"):
          eval_metrics = validation.run_evaluation(trainer, state["params"], rest,
                                                   validation_batches)
        writer.write_scalars(step, eval_metrics, prefix="eval/")
        writer.log_progress(step, num_steps, {f"eval_{k}": eval_metrics[k] for k in (
            "nll", "bits_per_token", "accuracy")})
      for evaluator in due:
        with account.span(evaluator.name):
          evaluator.run(step, trainer.model.merge(state["params"], rest))
      if run_eval or due:
        writer.write_scalars(step, account.summary(), prefix="time/")
        interval_start, interval_steps = time.perf_counter(), 0

      stop = watcher.should_stop(step)
      if is_last or stop or ckpt.should_save(step):
        with account.span("checkpoints"):
          guard.settle()  # "stop" raises before a step after a rejected update is saved.
          ckpt.save(step, state, train_iter, force=True)
      if stop:
        logging.warning("Preempted: saved step %d to %s; rerun the same command to resume.",
                        step, ckpt.directory)
        break
  finally:
    tracer.close(step)
    with account.span("checkpoints"):
      ckpt.close()  # waits for an asynchronous save.
    for evaluator in evaluators:  # after the save: a preempted run's is not held up.
      with account.span(evaluator.name):
        evaluator.log_finished(writer, wait=True)
    writer.write_scalars(step, account.summary(), prefix="time/")
    writer.close()
    watcher.close()
    if jax.process_index() == 0:
      logging.info("%s", account.line())
  return eval_metrics
