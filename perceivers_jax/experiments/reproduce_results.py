"""What `perceivers-reproduce` measured, assembled into results.json: per-seed measures,
paired contrasts between models (CONTRASTS), spreads over seeds, model sizes, Table I
summaries, timings and the machine. `reproduce_report` writes the report from it alone.
"""

import os
import platform
from typing import Any

import flax
import jax
import ml_collections
import numpy as np

from perceivers_jax import config_base
from perceivers_jax.evaluation import paired_differences
from perceivers_jax.sampling import sampling
from perceivers_jax.state import model_state
from perceivers_jax.training import validation
from perceivers_jax.training import flops

# Each contrast asks one question; `metrics` are the per-seed numbers it is judged on (what each
# measures: reproduce_report's module doc). Contrasts whose models did not run are left out.
CONTRASTS = (
    dict(model="effective_segmentation", against="perceiver_ar",
         question="Claim 1: do effective windows remove Perceiver AR's early-position blind spot?",
         metrics=("gap_16", "gap_128", "gap_512", "nll_first_16", "nll_first_128",
                  "nll_first_512", "nll")),
    dict(model="perceivers", against="effective_segmentation",
         question="The paper's Multi-Scale comparison (PerceiverS adds a cross-attention block)",
         metrics=("nll", "nll_full_context", "gap_128", "oa_mean")),
    dict(model="perceivers", against="effective_two_full",
         question="Multi-Scale at equal parameters: the short scale against a second full one",
         metrics=("nll", "nll_full_context", "gap_128", "oa_mean")),
    dict(model="effective_two_full", against="effective_segmentation",
         question="Depth alone: a second full cross-attention block",
         metrics=("nll", "nll_full_context", "oa_mean")),
    dict(model="perceivers_sum", against="perceivers",
         question="Summing the two scales instead of cascading them",
         metrics=("nll", "nll_full_context", "oa_mean")),
    dict(model="perceivers", against="perceiver_ar",
         question="The paper's headline: PerceiverS against Perceiver AR",
         metrics=("nll", "gap_128", "oa_mean")),
)


def _spread(values: list[float]) -> dict[str, Any]:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
          "min": float(v.min()), "max": float(v.max()), "per_seed": [float(x) for x in v]}


def seed_measures(metrics: dict[str, float], oa_mean: float | None) -> dict[str, float]:
  """What contrasts compare, per seed: the held-out metrics, each early-minus-late gap (NLL of
  the first k targets minus NLL with a full context) and the seed's Table I mean OA."""
  out = dict(metrics)
  for k in validation.FIRST_TARGETS:
    if f"nll_first_{k}" in metrics and "nll_full_context" in metrics:
      out[f"gap_{k}"] = metrics[f"nll_first_{k}"] - metrics["nll_full_context"]
  if oa_mean is not None:
    out["oa_mean"] = oa_mean
  return out


def contrasts(measures: dict[str, dict[int, dict[str, float]]],
              sizes: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
  """The CONTRASTS whose two models ran, each metric as a paired difference over seeds."""
  out = []
  for contrast in CONTRASTS:
    a, b = contrast["model"], contrast["against"]
    if a not in measures or b not in measures:
      continue
    seeds = list(measures[a])
    differences = {
        metric: paired_differences.paired_difference(
            [measures[a][s][metric] for s in seeds], [measures[b][s][metric] for s in seeds])
        for metric in contrast["metrics"]
        if all(metric in measures[m][s] for m in (a, b) for s in seeds)}
    out.append({**contrast, "metrics": differences, **{
        f"{size}_change_percent": 100.0 * (sizes[a][size] / sizes[b][size] - 1.0)
        for size in ("num_params", "train_gflops_per_window")}})
  return out


def _table1(entry: dict[str, Any]) -> dict[str, Any]:
  return {k: entry[k] for k in ("num_pieces", "oa_mean", "kld_mean", "oa_change_percent_mean")}


def machine() -> dict[str, Any]:
  """Where the run ran (the report states it; the load says how shared the machine was)."""
  return {"platform": platform.platform(), "processor": platform.processor() or "unknown",
          "cpu_count": os.cpu_count(), "backend": jax.default_backend(),
          "device_kind": jax.devices()[0].device_kind, "devices": jax.device_count(),
          "python": platform.python_version(), "jax": jax.__version__,
          "flax": flax.__version__, "load_average_start": list(os.getloadavg())}


def model_sizes(base: ml_collections.ConfigDict,
                models: tuple[str, ...]) -> dict[str, dict[str, float]]:
  """Parameter count and training GFLOP per window (flops.py) of each model."""
  out = {}
  for model in models:
    config = config_base.paper_model(base, model)
    out[model] = {"num_params": model_state.count_params(model_state.param_shapes(config.model)),
                  "train_gflops_per_window": flops.train_flops_per_window(config.model) / 1e9}
  return out


def assemble(options: Any, config: ml_collections.ConfigDict,
             folds: dict[str, dict[str, Any] | None], stages: dict[str, dict[int, dict]],
             sizes: dict[str, dict[str, float]], settings: sampling.SampleSettings,
             evaluations: dict[str, Any], seconds: dict[str, float],
             where: dict[str, Any]) -> dict[str, Any]:
  """results.json of a run of `options` (reproduce.ReproduceOptions) with stage configs like
  `config`: each seed's fold, each model x seed's eval.json (`stages[model][seed]`), the
  models' sizes, the sampling settings (a seed's), the Table I evaluations ({"per_seed":
  {seed: metrics}, "pooled": metrics, "openings": metrics}), timings and the machine."""
  per_seed, pooled, openings = (evaluations[k] for k in ("per_seed", "pooled", "openings"))
  seeds, models = options.seeds, options.models
  measures = {m: {s: seed_measures(stages[m][s]["metrics"], per_seed[s]["sets"][m]["oa_mean"])
                  for s in seeds} for m in models}
  sample_settings = settings.flag_values()
  del sample_settings["seed"]  # each stage samples with its own seed
  windows = options.steps * config.train.batch_size * len(seeds)
  return {
      "command": options.command,
      "machine": {**where, "load_average_end": list(os.getloadavg())},
      "steps": options.steps, "batch_size": config.train.batch_size, "seeds": list(seeds),
      "folds": folds, "data_dir": options.data_dir, "max_length": config.model.max_length,
      "num_latents": config.model.num_latents,
      "eval_targets_per_piece": options.eval_targets_per_piece,
      "num_samples": options.num_samples, "sample_tokens": options.sample_tokens,
      "opening_seconds": options.opening_seconds, "sample_settings": sample_settings,
      "models": {m: {
          "description": config_base.PAPER_MODELS[m], **sizes[m],
          "train_tflops_total": sizes[m]["train_gflops_per_window"] * 1e-3 * windows,
          "per_seed": {str(s): measures[m][s] for s in seeds},
          "summary": {k: _spread([measures[m][s][k] for s in seeds])
                      for k in measures[m][seeds[0]] if all(k in measures[m][s] for s in seeds)},
          "table1": _table1(pooled["sets"][m]), "openings": _table1(openings["sets"][m]),
          "stage_seconds": {str(s): {"train_and_eval": stages[m][s]["seconds"],
                                     "sample": stages[m][s]["sample_seconds"]} for s in seeds},
      } for m in models},
      "contrasts": contrasts(measures, sizes),
      "reference_pieces": {"pooled": pooled["reference"]["num_pieces"],
                           "openings": openings["reference"]["num_pieces"]},
      "seconds": seconds,
  }
