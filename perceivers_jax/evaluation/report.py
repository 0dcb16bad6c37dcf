"""Evaluates generated sets against a reference set: metrics.json, report.md and plots.

`evaluate_sets` loads every set (MIDI files, token arrays, NoteSequences or a TFDS split;
piece_sets.py), extracts the Table I features (features.py), compares each generated set
with the reference (distances.py) and measures repetition (repetition.py).
"""

from collections.abc import Mapping
import json
import math
import os
import pathlib

from absl import logging
from matplotlib import figure
import numpy as np
import tqdm

from perceivers_jax.data import piano_roll
from perceivers_jax.data import tokens as tokens_lib
from perceivers_jax.evaluation import distances
from perceivers_jax.evaluation import features as features_lib
from perceivers_jax.evaluation import piece_sets
from perceivers_jax.evaluation import repetition

# Below this baseline OA a percentage change is meaningless (tiny denominators): n/a.
MIN_BASELINE_OA = 0.01
_PLOT_FILES = ("distance_kde.png", "repetition_density.png", "token_autocorrelation.png")
PIANO_ROLL_PIECES = 4  # the first pieces of each set drawn in piano_rolls_{set}.png


def _set_features(piece_set: piece_sets.PieceSet, num_segments: int) -> dict[str, np.ndarray]:
  per_piece = [features_lib.extract_features(n, num_segments)
               for n in tqdm.tqdm(piece_set.notes, desc=f"{piece_set.name}: features",
                                  unit="piece")]
  return features_lib.stack_features(per_piece)


def _column_means(rows: np.ndarray) -> np.ndarray:
  """Mean of each column over its finite entries; NaN where there are none."""
  finite = np.isfinite(rows)
  counts = finite.sum(axis=0)
  sums = np.where(finite, rows, 0.0).sum(axis=0)
  return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _finite_stat(values: np.ndarray, stat) -> float | None:
  finite = values[np.isfinite(values)]
  return float(stat(finite)) if finite.size else None


def _repetition(piece_set: piece_sets.PieceSet, max_lag: int) -> dict:
  summaries = [repetition.repetition_summary(n) for n in piece_set.notes]
  densities = [repetition.repetition_density(n)[1] for n in piece_set.notes]
  num_bins = max((d.size for d in densities), default=0)
  # Pieces differ in length: each bin averages the pieces that reach it.
  padded = np.full((len(densities), num_bins), np.nan)
  for row, d in zip(padded, densities):
    row[:d.size] = d
  mean_density = _column_means(padded)
  mean_rho = _column_means(
      np.stack([repetition.token_autocorrelation(t, max_lag) for t in piece_set.tokens]))
  shares = np.array([s["repetitive_share"] for s in summaries])
  per_second = np.array([s["repetitive_per_second"] for s in summaries])
  return {
      "repetitive_share_mean": shares.mean(), "repetitive_share_std": shares.std(),
      "repetitive_per_second_mean": per_second.mean(),
      "repetitive_per_second_std": per_second.std(),
      "density_bin_seconds": repetition.BIN_S,
      "density_per_second_by_bin": mean_density,
      "autocorrelation_by_lag": mean_rho,
      "autocorrelation_mean": _finite_stat(mean_rho, np.mean),
      "autocorrelation_max": _finite_stat(mean_rho, np.max),
  }


def _value_spread(values: np.ndarray) -> dict:
  return {"value_mean": values.mean(), "value_std": values.std()}


def _jsonable(value):
  """numpy -> Python; NaN and infinities -> None (strict JSON)."""
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, np.ndarray):
    return _jsonable(value.tolist())
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.floating, float)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


def _fmt(value: float | None, digits: int = 3) -> str:
  """None (a non-finite value in metrics.json) prints as n/a."""
  return "n/a" if value is None else f"{value:.{digits}f}"


def _write_markdown(metrics: dict, path: pathlib.Path) -> None:
  names = list(metrics["sets"])
  first = names[0]
  header = ["Feature"]
  for name in names:
    header += [f"{name} KLD", f"{name} OA"]
    if name != first:
      header.append(f"{name} OA vs {first} (%)")
  lines = [
      "# Objective evaluation (Table I layout)", "",
      f"Reference: `{metrics['reference']['source']}` "
      f"({metrics['reference']['num_pieces']} pieces). KLD = KL(reference intra-set || "
      f"inter-set), `{metrics['config']['kld']}` mode; OA = overlap area of the two "
      "distance densities. Lower KLD and higher OA mean closer to the reference. The OA "
      f"change is n/a where {first}'s OA is below {MIN_BASELINE_OA}.", "",
      "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for feature in features_lib.FEATURE_NAMES:
    row = [feature]
    for name in names:
      entry = metrics["sets"][name]["features"][feature]
      row += [_fmt(entry["kld"]), _fmt(entry["oa"])]
      if name != first:
        row.append(_fmt(metrics["sets"][name]["oa_change_percent"][feature], 1))
    lines.append("| " + " | ".join(row) + " |")
  row = ["**Mean**"]
  for name in names:
    row += [_fmt(metrics["sets"][name]["kld_mean"]), _fmt(metrics["sets"][name]["oa_mean"])]
    if name != first:
      row.append(_fmt(metrics["sets"][name]["oa_change_percent_mean"], 1))
  lines += ["| " + " | ".join(row) + " |", "",
            "## Repetition", "",
            f"Repetitive note: its pitch {repetition.NGRAM}-gram also ended within the "
            f"previous {repetition.WINDOW_S:g} s. rho(k): chance-corrected token "
            f"autocorrelation, lags 1..{metrics['config']['max_lag']}.", "",
            "| Set | pieces | repetitive share | repetitive notes/s | mean rho | max rho |",
            "|---|---|---|---|---|---|"]
  for name, entry in [("reference", metrics["reference"])] + list(metrics["sets"].items()):
    rep = entry["repetition"]
    lines.append(f"| {name} | {entry['num_pieces']} | {_fmt(rep['repetitive_share_mean'])} | "
                 f"{_fmt(rep['repetitive_per_second_mean'])} | "
                 f"{_fmt(rep['autocorrelation_mean'])} | {_fmt(rep['autocorrelation_max'])} |")
  skipped = [(name, bad) for name, entry in
             [("reference", metrics["reference"])] + list(metrics["sets"].items())
             for bad in entry["skipped_files"]]
  if skipped:
    lines += ["", "## Skipped files (unreadable; not evaluated)", "",
              "| Set | file | reason |", "|---|---|---|"]
    lines += [f"| {name} | {bad['filename']} | {bad['reason']} |" for name, bad in skipped]
  lines += ["", "Plots: " + ", ".join(f"[{f}]({f})" for f in _PLOT_FILES), "",
            f"## Piano rolls (the first {PIANO_ROLL_PIECES} pieces of each set)", ""]
  for name in ["reference", *names]:
    lines += [f"![piano_rolls_{name}.png](piano_rolls_{name}.png)", ""]
  path.write_text("\n".join(lines))


def _kde_curve(ax, sample: np.ndarray | None, grid: np.ndarray, **style) -> None:
  if sample is None:
    return
  pdf = distances.density(sample)
  if pdf is None:  # Singular: a point mass.
    ax.axvline(float(sample[0]), **style)
  else:
    ax.plot(grid, pdf(grid), **style)


def _plot_distances(reference_intra: Mapping[str, np.ndarray], per_set: Mapping[str, dict],
                    path: pathlib.Path) -> None:
  names = features_lib.FEATURE_NAMES
  cols = 4
  rows = -(-len(names) // cols)
  fig = figure.Figure(figsize=(4 * cols, 3 * rows), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
  colors = [f"C{i}" for i in range(len(per_set))]
  for ax, feature in zip(axes, names):
    samples = [reference_intra[feature]]
    for entry in per_set.values():
      d = entry[feature]["distances"]
      samples += [d["inter"]] + ([d["generated_intra"]] if d["generated_intra"] is not None
                                 else [])
    everything = np.concatenate(samples)
    span = max(float(np.ptp(everything)), 1e-9)
    grid = np.linspace(everything.min() - 0.1 * span, everything.max() + 0.1 * span, 400)
    _kde_curve(ax, reference_intra[feature], grid, color="k", label="reference intra")
    for color, (name, entry) in zip(colors, per_set.items()):
      d = entry[feature]["distances"]
      _kde_curve(ax, d["inter"], grid, color=color, label=f"{name} inter")
      _kde_curve(ax, d["generated_intra"], grid, color=color, linestyle="--",
                 label=f"{name} intra")
    ax.set_title(feature)
    ax.set_xlabel("distance")
  for ax in axes[len(names):]:
    ax.set_axis_off()
  axes[0].legend(fontsize="small")
  fig.savefig(path, dpi=80)


def _plot_curves(curves: Mapping[str, list], first_x: float, x_step: float, xlabel: str,
                 ylabel: str, title: str, path: pathlib.Path) -> None:
  """One line per set (the reference first, in black); None entries are gaps."""
  fig = figure.Figure(figsize=(8, 4), layout="constrained")
  ax = fig.subplots()
  for i, (name, y) in enumerate(curves.items()):
    y = np.array([np.nan if v is None else v for v in y], np.float64)
    ax.plot(first_x + np.arange(y.size) * x_step, y, color="k" if i == 0 else f"C{i - 1}",
            label=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend()
  fig.savefig(path, dpi=80)


def evaluate_sets(reference: piece_sets.SetSource,
                  generated: Mapping[str, piece_sets.SetSource],
                  output_dir: str | os.PathLike, *, kld: str = "shared_grid",
                  data_dir: str | None = None, max_pieces: int | None = None,
                  num_segments: int = features_lib.NUM_SEGMENTS,
                  max_lag: int = repetition.MAX_LAG) -> dict:
  """Compares each generated set with the reference; writes metrics.json, report.md, plots.

  Args:
    reference: the reference set (see `piece_sets.load_set`), at least 2 pieces.
    generated: {set name: source}, at least one set; the first is the baseline of the
      report's OA-change column.
    output_dir: created if missing.
    kld: "shared_grid" (default) or "mgeval" (see distances.py).
    data_dir: TFDS data directory for tfds sources.
    max_pieces: cap on the pieces read from each set.
    num_segments: segments per piece for the /seg features.
    max_lag: largest token-autocorrelation lag.

  Returns:
    The metrics written to metrics.json: {"config", "reference", "sets": {name: {
    "features": {feature: {"kld", "oa", "reference_intra", "generated_intra", "inter"
    (mean/std of distances), "value_mean"/"value_std" for scalar features}}, "kld_mean",
    "oa_mean", "oa_change_percent", "oa_change_percent_mean", "repetition", ...}}}.
  """
  if kld not in distances.KLD_MODES:
    raise ValueError(f"kld must be one of {distances.KLD_MODES}, got {kld!r}")
  if not generated:
    raise ValueError("no generated sets given")
  load = dict(data_dir=data_dir, max_pieces=max_pieces)
  # Every set is found before any is read, and read before anything is written: a missing
  # or empty one fails at once and leaves no output behind.
  for name, source in [("reference", reference), *generated.items()]:
    piece_sets.find_pieces(name, source, **load)
  reference_set = piece_sets.load_set("reference", reference, **load)
  if len(reference_set.notes) < 2:
    raise piece_sets.EvaluationError(
        f"the reference set ({reference_set.source}) needs at least 2 pieces "
        f"for intra-set distances, found {len(reference_set.notes)}")
  generated_sets = {name: piece_sets.load_set(name, source, **load)
                    for name, source in generated.items()}
  output_dir = pathlib.Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  reference_features = _set_features(reference_set, num_segments)
  reference_intra = {name: distances.intra_set_distances(values)
                     for name, values in reference_features.items()}
  metrics = {
      "config": {"kld": kld, "num_segments": num_segments, "max_lag": max_lag,
                 "note_length_edges_s": features_lib.NOTE_LENGTH_EDGES_S,
                 "repetition_ngram": repetition.NGRAM,
                 "repetition_window_s": repetition.WINDOW_S},
      "reference": {
          "source": reference_set.source, "num_pieces": len(reference_set.notes),
          "pieces": reference_set.piece_names, "skipped_files": reference_set.skipped,
          "features": {name: _value_spread(reference_features[name])
                       for name in features_lib.SCALAR_FEATURES},
          "repetition": _repetition(reference_set, max_lag)},
      "sets": {},
  }
  comparisons, loaded = {}, [reference_set, *generated_sets.values()]
  for set_name, piece_set in generated_sets.items():
    set_features = _set_features(piece_set, num_segments)
    comparison = {name: distances.compare_feature(reference_features[name],
                                                  set_features[name], kld,
                                                  reference_intra[name])
                  for name in features_lib.FEATURE_NAMES}
    comparisons[set_name] = comparison
    for name in features_lib.SCALAR_FEATURES:
      comparison[name].update(_value_spread(set_features[name]))
    metrics["sets"][set_name] = {
        "source": piece_set.source, "num_pieces": len(piece_set.notes),
        "pieces": piece_set.piece_names, "skipped_files": piece_set.skipped,
        "features": {name: {k: v for k, v in entry.items() if k != "distances"}
                     for name, entry in comparison.items()},
        "kld_mean": np.mean([entry["kld"] for entry in comparison.values()]),
        "oa_mean": np.mean([entry["oa"] for entry in comparison.values()]),
        "repetition": _repetition(piece_set, max_lag),
    }
  baseline = metrics["sets"][next(iter(generated))]["features"]
  for entry in metrics["sets"].values():
    change = {name: (100.0 * (f["oa"] - baseline[name]["oa"]) / baseline[name]["oa"]
                     if baseline[name]["oa"] >= MIN_BASELINE_OA else math.nan)
              for name, f in entry["features"].items()}
    entry["oa_change_percent"] = change
    entry["oa_change_percent_mean"] = np.nanmean(list(change.values())) if any(
        math.isfinite(v) for v in change.values()) else math.nan
  metrics = _jsonable(metrics)
  (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False))
  _write_markdown(metrics, output_dir / "report.md")
  _plot_distances(reference_intra, comparisons, output_dir / _PLOT_FILES[0])
  all_sets = {"reference": metrics["reference"], **metrics["sets"]}
  _plot_curves({name: entry["repetition"]["density_per_second_by_bin"]
                for name, entry in all_sets.items()},
               0.0, repetition.BIN_S, "time (s)", "repetitive notes per second",
               "Repetitive-note density along the pieces (mean over pieces)",
               output_dir / _PLOT_FILES[1])
  _plot_curves({name: entry["repetition"]["autocorrelation_by_lag"]
                for name, entry in all_sets.items()},
               1.0, 1.0, "lag k (tokens)", "rho(k)", "Chance-corrected token autocorrelation",
               output_dir / _PLOT_FILES[2])
  for piece_set in loaded:
    piano_roll.write_grid([tokens_lib.tokens_to_note_sequence(t)
                           for t in piece_set.tokens[:PIANO_ROLL_PIECES]],
                          piece_set.piece_names, output_dir / f"piano_rolls_{piece_set.name}.png")
  logging.info("wrote %s", output_dir / "report.md")
  return metrics
