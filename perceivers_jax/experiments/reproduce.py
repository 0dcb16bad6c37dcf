"""The paper's comparison as an experiment (README "Results", BUILD.md section 9): the paper's
three models and two controls trained side by side, judged on held-out pieces that change
with the seed, with paired intervals instead of seed ranges.

Models: `config_base.PAPER_MODELS`, each derived by `config_base.paper_model` from one
PerceiverS config, so they differ only where that table says. The controls separate the
paper's Multi-Scale idea from its confounds: `effective_two_full` has PerceiverS's second
cross-attention block (its parameters, depth and nearly its FLOPs) without the short scale;
`perceivers_sum` sums the two scales instead of cascading them.

Folds as seeds: on the 10 fetched pieces, seed s trains on 8 and holds out 2 (fold s mod 5
holds out pieces 9-10, 7-8, 5-6, 3-4 or 1-2), so the spread over seeds covers the choice of
pieces and every model is judged on several openings. With --data_dir every seed uses that
dataset's own splits.

Per model and seed (a stage): training, evaluation on the held-out pieces (their first
`eval_targets_per_piece` targets; the numbers `perceivers-train --mode=eval` gives for the
stage's config) and samples from SOS. Then Table I of each seed's samples against excerpts of
its held-out pieces, of all samples pooled, and of the openings (first `opening_seconds` of
the samples against the first seconds of the held-out pieces); paired differences between
models with 95% intervals (`reproduce_results`, `evaluation.paired_differences`) into
results.json, and report.md from it (`reproduce_report`).

  workdir/
    data/fold_F/               maestro_v3/ (CSV over the 10 pieces) and tfds/ of fold F
    runs/MODEL/seed_S/train/   training workdir (resumes from its checkpoint)
    runs/MODEL/seed_S/eval.json     held-out metrics (the stage is done when it is there)
    runs/MODEL/seed_S/samples/      .mid/.npy/.json (+ samples.json marker)
    reference/fold_F/          excerpts of fold F's held-out pieces, as long as the samples
    evaluation/ (+ seed_S/), openings/   Table I pooled, per seed, on openings
    report.md, results.json, nll_by_position.png

A stage whose config differs from the one it was trained with (any field: a --config.*
override, --steps, --eval_targets_per_piece) is deleted and run again; a finished stage with
the same config is skipped.
"""

import dataclasses
import json
import pathlib
import shutil
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from data_prep import fetch_maestro_samples
from perceivers_jax import config_base
from perceivers_jax.data import input_pipeline
from perceivers_jax.data import tokens as tokens_lib
from perceivers_jax.evaluation import report as report_lib
from perceivers_jax.experiments import demo
from perceivers_jax.experiments import reproduce_report
from perceivers_jax.experiments import reproduce_results
from perceivers_jax.sampling import sampling
from perceivers_jax.state import run_dir
from perceivers_jax.training import config_validation
from perceivers_jax.training import flops
from perceivers_jax.training import train
from perceivers_jax.training import validation
from perceivers_jax.watch import music

NUM_FOLDS = fetch_maestro_samples.NUM_PIECES // 2


@dataclasses.dataclass
class ReproduceOptions:
  """What to run; the defaults are perceivers-reproduce's flags (cli/reproduce.py)."""
  workdir: str
  config: ml_collections.ConfigDict  # a PerceiverS config (scales [full, W])
  data_dir: str  # an existing maestro_performance build; "": the 10 pieces, in folds
  models: tuple[str, ...]
  seeds: tuple[int, ...]
  steps: int
  num_samples: int  # per model and seed
  sample_tokens: int
  opening_seconds: float = 10.0
  eval_targets_per_piece: int = 4096  # 0: whole pieces
  temperature: float = 1.0
  top_p: float = 0.95
  command: str = ""  # how it was invoked, for the report


class OptionsError(config_base.InputError, ValueError):
  """A bad --models/--seeds/--steps/... value."""


def check_options(options: ReproduceOptions) -> None:
  """One clear line per bad value, before any data or training work."""
  models = options.models
  if (any(m not in config_base.PAPER_MODELS for m in models) or len(models) < 2
      or len(set(models)) != len(models)):
    raise OptionsError(f"--models={','.join(models)}: name at least two distinct models "
                       f"of {','.join(config_base.PAPER_MODELS)}")
  if not options.seeds or len(set(options.seeds)) != len(options.seeds) or any(
      not 0 <= s < 2**32 for s in options.seeds):
    raise OptionsError(f"--seeds={','.join(map(str, options.seeds))}: give one or more "
                       "distinct integers in [0, 2**32)")
  for flag, value, ok, allowed in (
      ("steps", options.steps, options.steps >= 1, ">= 1"),
      ("num_samples", options.num_samples, options.num_samples >= 2,
       ">= 2 (intra-set distances)"),
      ("sample_tokens", options.sample_tokens, options.sample_tokens >= 16, ">= 16"),
      ("opening_seconds", options.opening_seconds, options.opening_seconds > 0, "> 0"),
      ("eval_targets_per_piece", options.eval_targets_per_piece,
       options.eval_targets_per_piece >= 0, ">= 0 (0 = whole pieces)")):
    if not ok:
      raise OptionsError(f"--{flag}={value}: must be {allowed}")


def fold_of(seed: int) -> int:
  return seed % NUM_FOLDS


def held_out_pieces(fold: int) -> tuple[int, int]:
  """The two pieces (numbered from 1) that fold `fold` holds out; fold 0 is the demo's."""
  last = fetch_maestro_samples.NUM_PIECES - 2 * fold
  return last - 1, last


def fold_splits(fold: int) -> dict[int, str]:
  """Split of each piece (from 1) in fold `fold`: its two held-out pieces are validation."""
  held_out = held_out_pieces(fold)
  return {i: "validation" if i in held_out else "train"
          for i in range(1, fetch_maestro_samples.NUM_PIECES + 1)}


def stage_config(base: ml_collections.ConfigDict, model: str, seed: int,
                 options: ReproduceOptions, data_dir: str) -> ml_collections.ConfigDict:
  """`base` made into `model` (config_base.paper_model), trained `options.steps` with `seed`
  on `data_dir`, evaluated once at the end on the held-out pieces."""
  config = config_base.paper_model(base, model)
  config.seed = seed
  config.data.data_dir = data_dir
  config.data.eval_split = "validation"
  config.train.num_steps = options.steps
  config.eval.every_steps = options.steps  # `evaluate` then reads the same checkpoint
  config.eval.max_targets_per_piece = options.eval_targets_per_piece
  config.checkpoint.every_steps = min(config.checkpoint.every_steps, options.steps)
  return config


def _read_json(path: pathlib.Path) -> Any:
  return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _write_json(path: pathlib.Path, value: Any) -> None:
  path.write_text(json.dumps(value, indent=1, allow_nan=False), encoding="utf-8")


def _as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as training saves it (config.json), for comparison."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _differences(old: Any, new: Any, prefix: str = "config") -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    return [d for key in sorted(set(old) | set(new))
            for d in _differences(old.get(key), new.get(key), f"{prefix}.{key}")]
  return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def run_stage(config: ml_collections.ConfigDict, settings: sampling.SampleSettings,
              folder: pathlib.Path) -> dict[str, Any]:
  """One model x seed: train (resuming), evaluate, sample; each part skipped when done, the
  whole stage redone when its config changed. Returns eval.json's content."""
  workdir = folder / "train"
  trained_with = _read_json(workdir / run_dir.CONFIG_FILE)
  if trained_with is not None and trained_with != _as_json(config):
    changes = _differences(trained_with, _as_json(config))
    print(f"{folder}: the config changed ({'; '.join(changes[:3])}"
          f"{'; ...' if len(changes) > 3 else ''}): rerunning this stage", flush=True)
    shutil.rmtree(folder)
  folder.mkdir(parents=True, exist_ok=True)
  eval_path, samples_path = folder / "eval.json", folder / "samples.json"
  evaluated = _read_json(eval_path)
  if evaluated is None or evaluated["step"] != config.train.num_steps:
    start = time.perf_counter()
    # Training ends with the evaluation of its last step, the checkpoint `evaluate` reads;
    # a run already trained to the end (interrupted before eval.json) returns {}.
    metrics = (train.train_and_evaluate(config, str(workdir),
                                        evaluators=music.evaluators(config, str(workdir)))
               or validation.evaluate(config, str(workdir)))
    evaluated = {"step": config.train.num_steps, "metrics": metrics,
                 "seconds": time.perf_counter() - start}
    _write_json(eval_path, evaluated)
  wanted = {"step": evaluated["step"], "settings": settings.flag_values()}
  marker = _read_json(samples_path)
  if marker is None or not marker["complete"] or marker["sampled"] != wanted:
    if marker is not None and marker["sampled"] != wanted:
      shutil.rmtree(folder / "samples", ignore_errors=True)  # other settings: start afresh
    _write_json(samples_path, {"sampled": wanted, "complete": False})
    start = time.perf_counter()
    model, _, step = sampling.load_model(str(workdir))
    sampling.sample_to_dir(model, config, settings, folder / "samples", checkpoint_step=step,
                           checkpoint_path=str(workdir))
    marker = {"sampled": wanted, "complete": True, "seconds": time.perf_counter() - start}
    _write_json(samples_path, marker)
  return {**evaluated, "sample_seconds": marker["seconds"]}


def plan(options: ReproduceOptions) -> dict[str, Any]:
  """The run's size without running it (`perceivers-reproduce --dry_run`): each model's
  parameters and training FLOPs, the run's training FLOPs, and the hours they take on one
  chip at its datasheet peak (flops.PEAK_TFLOPS): a lower bound, to divide by the MFU."""
  check_options(options)
  base = ml_collections.ConfigDict(options.config)
  sizes = reproduce_results.model_sizes(base, options.models)
  windows = options.steps * base.train.batch_size * len(options.seeds)
  total = sum(size["train_gflops_per_window"] for size in sizes.values()) * 1e9 * windows
  return {"models": sizes, "stages": len(options.models) * len(options.seeds),
          "windows_per_model": windows, "train_pflops_total": total / 1e15,
          "hours_at_peak": {device: total / (tflops * 1e12) / 3600 for device, tflops in
                            flops.PEAK_TFLOPS.items() if device in ("H100", "H200", "TPU v5p")}}


def held_out_tokens(config: ml_collections.ConfigDict) -> list[np.ndarray]:
  """The tokens of each piece of `config`'s evaluation split."""
  source = input_pipeline.open_data_source(config, config.data.eval_split)
  return [np.asarray(source[i]["tokens"]) for i in range(len(source))]


def run_reproduce(options: ReproduceOptions) -> pathlib.Path:
  """Runs every stage (skipping finished ones); returns the path of report.md."""
  check_options(options)
  base = ml_collections.ConfigDict(options.config)
  folds = {s: None if options.data_dir else fold_of(s) for s in options.seeds}
  configs = {(m, s): stage_config(base, m, s, options, "") for m in options.models
             for s in options.seeds}  # paper_model refuses a base that is not PerceiverS
  for config in configs.values():
    config_validation.validate(config, num_devices=jax.device_count())
  sizes = reproduce_results.model_sizes(base, options.models)
  start, machine = time.perf_counter(), reproduce_results.machine()
  out = pathlib.Path(options.workdir).resolve()
  out.mkdir(parents=True, exist_ok=True)

  data_dirs = {}
  for fold in sorted(set(folds.values()), key=str):
    print(f"\n== data: {'fold %d' % fold if fold is not None else options.data_dir}", flush=True)
    data_dirs[fold] = demo.prepare_data(
        demo.DemoOptions(data_dir=options.data_dir), out / "data" / f"fold_{fold}",
        None if fold is None else fold_splits(fold))
  data_seconds = time.perf_counter() - start
  for (model, seed), config in configs.items():
    config.data.data_dir = data_dirs[folds[seed]]

  stages: dict[str, dict[int, dict]] = {m: {} for m in options.models}
  samples: dict[tuple[str, int], list[str]] = {}
  settings = {}
  for (model, seed), config in configs.items():
    print(f"\n== {model}, seed {seed}: {options.steps} steps, evaluation, sampling", flush=True)
    folder = out / "runs" / model / f"seed_{seed}"
    settings[seed] = sampling.SampleSettings.from_flag_values(dict(
        num_samples=options.num_samples, batch_size=options.num_samples,
        num_tokens=options.sample_tokens, temperature=options.temperature,
        top_p=options.top_p, seed=seed))
    stages[model][seed] = run_stage(config, settings[seed], folder)
    samples[model, seed] = [str(folder / "samples" / f"sample_{i:04d}.npy")
                            for i in range(options.num_samples)]

  print("\n== Table I per seed, pooled and on openings, against the held-out pieces", flush=True)
  evaluation_start = time.perf_counter()
  references, openings = {}, {}
  for fold in data_dirs:
    config = configs[options.models[0], next(s for s in options.seeds if folds[s] == fold)]
    count = options.num_samples * (1 if fold is not None else len(options.seeds))
    references[fold] = demo.write_reference_excerpts(
        config, out / "reference" / f"fold_{fold}", count, options.sample_tokens,
        splits=(config.data.eval_split,))
    openings[fold] = [tokens_lib.opening(t, options.opening_seconds)
                      for t in held_out_tokens(config)]
  per_seed_eval = {s: report_lib.evaluate_sets(
      references[folds[s]], {m: samples[m, s] for m in options.models},
      out / "evaluation" / f"seed_{s}") for s in options.seeds}
  pooled = {m: [p for s in options.seeds for p in samples[m, s]] for m in options.models}
  pooled_eval = report_lib.evaluate_sets([p for r in references.values() for p in r], pooled,
                                         out / "evaluation")
  openings_eval = report_lib.evaluate_sets(
      [o for pieces in openings.values() for o in pieces],
      {m: [tokens_lib.opening(np.load(p), options.opening_seconds) for p in pooled[m]]
       for m in options.models}, out / "openings")

  results = reproduce_results.assemble(
      options, next(iter(configs.values())),
      {str(s): None if f is None else {
          "fold": f, "held_out": [f"Maestro_{i}.mid" for i in held_out_pieces(f)]}
       for s, f in folds.items()}, stages, sizes, settings[options.seeds[0]],
      {"per_seed": per_seed_eval, "pooled": pooled_eval, "openings": openings_eval},
      {"data": data_seconds, "table1": time.perf_counter() - evaluation_start,
       "total": time.perf_counter() - start}, machine)
  _write_json(out / "results.json", results)
  path = reproduce_report.write_report(results, out)
  print(f"\nDone in {results['seconds']['total'] / 60:.1f} min: {path}", flush=True)
  return path
