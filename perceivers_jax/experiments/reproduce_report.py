"""report.md and nll_by_position.png of `perceivers-reproduce`, from its results.json alone.

Every sentence of the findings is generated from the numbers: a paired difference is called
resolved only when its 95% interval excludes 0, and otherwise reported with the smallest
effect the design would have detected (`evaluation.paired_differences`). What each measure is:

  nll                  held-out NLL over every evaluated target
  nll_first_k          NLL of each held-out piece's first k targets (k = 16, 128, 512), where
                       Perceiver AR's baseline windows never put a training target
  nll_full_context     NLL of the targets at positions >= L, with a full context of L inputs
  gap_k                early-minus-late gap: nll_first_k - nll_full_context, the early
                       penalty net of any uniform offset between models
  oa_mean              mean Table I overlap area of a seed's samples against excerpts of the
                       seed's held-out pieces

`rewrite_report(workdir)` renders the report again from workdir/results.json.
"""

import json
import pathlib
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
from matplotlib import figure  # pylint: disable=g-import-not-at-top,wrong-import-position

LABELS = {"perceiver_ar": "Perceiver AR", "effective_segmentation": "Effective Segmentation",
          "perceivers": "PerceiverS", "effective_two_full": "Effective [full, full]",
          "perceivers_sum": "PerceiverS (sum)"}
BUCKET_PREFIX = "nll_pos_"
# measure -> (what it is, which direction is better)
MEASURES = {
    "nll": ("held-out NLL", "lower"),
    **{f"nll_first_{k}": (f"NLL of the first {k} targets of each held-out piece", "lower")
       for k in (16, 128, 512)},
    "nll_full_context": ("NLL with a full context (positions >= L)", "lower"),
    **{f"gap_{k}": (f"early-minus-late gap (first {k} targets minus full-context NLL)", "lower")
       for k in (16, 128, 512)},
    "oa_mean": ("Table I mean OA of the seed's samples", "higher"),
}


def buckets(results: dict[str, Any]) -> list[str]:
  """The position buckets every model reports, in position order."""
  summaries = [m["summary"] for m in results["models"].values()]
  names = [k for k in summaries[0] if k.startswith(BUCKET_PREFIX)
           and all(k in s for s in summaries)]
  return sorted(names, key=lambda k: int(k[len(BUCKET_PREFIX):].split("_")[0]))


def bucket_label(name: str) -> str:
  low, high = name[len(BUCKET_PREFIX):].split("_")
  if high == "inf":
    return f">= {low}"
  return low if int(high) == int(low) + 1 else f"{low}-{int(high) - 1}"


def plot_nll_by_position(results: dict[str, Any], path: pathlib.Path) -> None:
  """Mean NLL per log-spaced position bucket, one curve per model, band = seed min..max."""
  names = buckets(results)
  x = np.arange(len(names))
  fig = figure.Figure(figsize=(9, 4.5), layout="constrained")
  ax = fig.subplots()
  for i, (model, entry) in enumerate(results["models"].items()):
    summary = entry["summary"]
    ax.plot(x, [summary[b]["mean"] for b in names], "o-", color=f"C{i}", label=LABELS[model])
    ax.fill_between(x, [summary[b]["min"] for b in names], [summary[b]["max"] for b in names],
                    color=f"C{i}", alpha=0.15)
  full = [i for i, b in enumerate(names) if int(b[len(BUCKET_PREFIX):].split("_")[0])
          >= results["max_length"]]
  if full:
    ax.axvline(full[0] - 0.5, color="k", ls="--", lw=1)
    ax.text(full[0] - 0.6, ax.get_ylim()[1], "full context (>= L) from here", va="top",
            ha="right", fontsize=8)
  ax.set_xticks(x, [bucket_label(b) for b in names], rotation=35, ha="right")
  ax.set_xlabel("target position in the held-out piece (log-spaced buckets)")
  ax.set_ylabel("NLL (nats/token)")
  ax.set_title("Held-out NLL by position (mean over seeds; band: min..max)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=90)


def _fmt_spread(s: dict[str, Any]) -> str:
  return f"{s['mean']:.3f} ± {s['std']:.3f}"


def _signed(values: list[float]) -> str:
  return ", ".join(f"{v:+.3f}" for v in values)


def finding(contrast: dict[str, Any], measure: str) -> str:
  """One sentence: the paired difference of `measure` and what it allows to conclude."""
  d = contrast["metrics"][measure]
  a, b = LABELS[contrast["model"]], LABELS[contrast["against"]]
  what, better = MEASURES[measure]
  head = f"{what}: {a} minus {b} {d['mean']:+.3f}"
  if d["low"] is None:
    return f"- {head} (one seed: no interval, not a finding)."
  interval = (f"95% interval {d['low']:+.3f} to {d['high']:+.3f} over {d['seeds']} seeds; per "
              f"seed {_signed(d['per_seed'])}")
  if d["resolved"]:
    direction = "lower" if d["mean"] < 0 else "higher"
    verdict = (f"resolved, {a}'s is {direction} "
               f"({'better' if direction == better else 'worse'})")
  else:
    verdict = (f"not resolved; this design would detect a difference of "
               f"{d['minimum_detectable']:.3f} or more (80% power)")
  return f"- {head} ({interval}): {verdict}."


def _contrast_section(contrast: dict[str, Any]) -> str:
  a, b = LABELS[contrast["model"]], LABELS[contrast["against"]]
  measures = contrast["metrics"]
  resolved = [m for m, d in measures.items() if d["resolved"]]
  lines = [f"### {contrast['question']}", "",
           f"{a} against {b}: {a} has {contrast['num_params_change_percent']:+.1f}% "
           f"parameters and {contrast['train_gflops_per_window_change_percent']:+.1f}% "
           f"training FLOPs per window. Resolved on {len(resolved)} of {len(measures)} "
           "measures" + (": " + ", ".join(MEASURES[m][0] for m in resolved) + "."
                         if resolved else "."), ""]
  return "\n".join(lines + [finding(contrast, m) for m in measures])


def _design(results: dict[str, Any]) -> str:
  models = results["models"]
  rows = ["| model | differs from PerceiverS in | parameters | GFLOP per training window | "
          "training TFLOP, all seeds |", "|---|---|---|---|---|"]
  for model, entry in models.items():
    rows.append(f"| {LABELS[model]} | {entry['description']} | {entry['num_params']:,} | "
                f"{entry['train_gflops_per_window']:.3f} | {entry['train_tflops_total']:,.1f} |")
  folds = results["folds"]
  if all(f is None for f in folds.values()):
    fold_text = (f"Every seed uses the splits of `{results['data_dir']}` (no folds): the "
                 "spread over seeds covers training randomness only.")
  else:
    fold_text = "\n".join(["Folds as seeds (each seed trains on the other 8 of the 10 pieces):",
                           "", "| seed | fold | held-out pieces |", "|---|---|---|"] + [
        f"| {s} | {f['fold']} | {', '.join(f['held_out'])} |" for s, f in folds.items()])
  limit = results["eval_targets_per_piece"]
  return f"""{chr(10).join(rows)}

{results['steps']} steps of batch {results['batch_size']} per model and seed (seeds \
{', '.join(map(str, results['seeds']))}), L = {results['max_length']}, \
N = {results['num_latents']}. Evaluation: sequential effective windows over \
{'the first %d targets of ' % limit if limit else ''}each held-out piece (every target once). \
Samples: {results['num_samples']} per model and seed, {results['sample_tokens']} tokens from SOS; \
openings: their first {results['opening_seconds']:g} s against the first \
{results['opening_seconds']:g} s of the held-out pieces. Sampling settings (every field):

```json
{json.dumps(results['sample_settings'], sort_keys=True)}
```

{fold_text}

Statistics: per seed, the difference between two models trained with that seed (same data \
order, same held-out pieces); 95% t interval over seeds. Resolved only when the interval \
excludes 0; otherwise the report gives the smallest difference the design would detect with \
80% power."""


_CLAIM1_COLUMNS = {"nll": "all", "nll_first_16": "first 16", "nll_first_128": "first 128",
                   "nll_first_512": "first 512", "nll_full_context": "full context",
                   "gap_16": "gap 16", "gap_128": "gap 128", "gap_512": "gap 512"}


def _claim1_tables(results: dict[str, Any]) -> str:
  models = results["models"]
  columns = [m for m in _CLAIM1_COLUMNS if all(m in e["summary"] for e in models.values())]
  rows = ["NLL (nats/token, mean ± std over seeds): all targets, each held-out piece's first k "
          "targets, the targets with a full context (positions >= L), and the early-minus-late "
          "gaps (first k minus full context):", "",
          "| model | " + " | ".join(_CLAIM1_COLUMNS[c] for c in columns) + " |",
          "|---|" + "---|" * len(columns)]
  for model, entry in models.items():
    rows.append(f"| {LABELS[model]} | "
                + " | ".join(_fmt_spread(entry["summary"][c]) for c in columns) + " |")
  first = next(iter(models.values()))["per_seed"]
  rows += ["", "NLL by target position (nats/token, mean ± std over seeds; targets per seed "
           "in the first model's evaluation):", "",
           "| positions | targets | " + " | ".join(LABELS[m] for m in models) + " |",
           "|---|---|" + "---|" * len(models)]
  for b in buckets(results):
    targets = " / ".join(f"{first[s]['targets_in_' + b]:,.0f}" for s in first)
    rows.append(f"| {bucket_label(b)} | {targets} | "
                + " | ".join(_fmt_spread(e["summary"][b]) for e in models.values()) + " |")
  return "\n".join(rows)


def _table1_rows(results: dict[str, Any]) -> str:
  models = results["models"]
  rows = ["| model | whole samples: mean OA (pooled) | mean OA, per-seed sets (mean ± std) | "
          f"mean KLD | OA change vs {LABELS[next(iter(models))]}, mean over features (%) | "
          "openings: mean OA | openings: mean KLD |", "|---|---|---|---|---|---|---|"]
  for model, e in models.items():
    change = e["table1"]["oa_change_percent_mean"]
    rows.append(f"| {LABELS[model]} | {e['table1']['oa_mean']:.3f} | "
                f"{_fmt_spread(e['summary']['oa_mean'])} | {e['table1']['kld_mean']:.3f} | "
                f"{'n/a' if change is None else f'{change:+.1f}'} | "
                f"{e['openings']['oa_mean']:.3f} | {e['openings']['kld_mean']:.3f} |")
  return "\n".join(rows)


def _time_line(results: dict[str, Any]) -> str:
  seconds = results["seconds"]
  stages = [v for e in results["models"].values() for v in e["stage_seconds"].values()]
  machine = results["machine"]
  return (f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs, "
          f"{machine['backend']} ({machine['device_kind']} x {machine['devices']}), jax "
          f"{machine['jax']}, flax {machine['flax']}; load average (1/5/15 min) "
          f"{' / '.join(f'{v:.1f}' for v in machine['load_average_start'])} at the start, "
          f"{' / '.join(f'{v:.1f}' for v in machine['load_average_end'])} at the end. "
          f"This invocation: {seconds['total'] / 60:.1f} min (data {seconds['data']:.0f} s; "
          f"{len(stages)} stages, training + evaluation "
          f"{sum(s['train_and_eval'] for s in stages) / 60:.1f} min and sampling "
          f"{sum(s['sample'] for s in stages) / 60:.1f} min as first run; Table I "
          f"{seconds['table1']:.0f} s). A rerun skips the finished stages.")


def write_report(results: dict[str, Any], out: pathlib.Path) -> pathlib.Path:
  """Writes out/report.md and out/nll_by_position.png from `results` (results.json)."""
  plot_nll_by_position(results, out / "nll_by_position.png")
  evaluation_md = (out / "evaluation" / "report.md").read_text(encoding="utf-8")
  evaluation_md = evaluation_md.split("\n", 1)[1].replace("](", "](evaluation/")
  sections = "\n\n".join(_contrast_section(c) for c in results["contrasts"])
  text = f"""# Reproducing the paper's comparison

Command: `{results['command'] or 'perceivers-reproduce'}`

{_time_line(results)}

## Design

{_design(results)}

## Findings

{sections or 'No contrast: the models run include no pair that the comparison defines.'}

## Claim 1 in detail: early positions

{_claim1_tables(results)}

![NLL by position](nll_by_position.png)

## Table I: whole samples and openings

{_table1_rows(results)}

Whole samples: {results['num_samples']} per model and seed, pooled over seeds, against \
{results['reference_pieces']['pooled']} excerpts of the held-out pieces. Openings: the first \
{results['opening_seconds']:g} s of the same samples against the first \
{results['opening_seconds']:g} s of the {results['reference_pieces']['openings']} held-out \
pieces, pooled over seeds (one opening per piece, so no per-seed interval): \
[openings/report.md](openings/report.md). The paper reports about +40% mean OA for \
PerceiverS over Perceiver AR at full scale.

Plots: [repetition density over time](evaluation/repetition_density.png),
[rho(k)](evaluation/token_autocorrelation.png), [KDE grid](evaluation/distance_kde.png).

## Table I in full (whole samples, pooled)
{evaluation_md}
"""
  path = out / "report.md"
  path.write_text(text, encoding="utf-8")
  return path


def rewrite_report(workdir: str | pathlib.Path) -> pathlib.Path:
  """report.md again from workdir/results.json (after a change to this module)."""
  out = pathlib.Path(workdir)
  return write_report(json.loads((out / "results.json").read_text(encoding="utf-8")), out)
