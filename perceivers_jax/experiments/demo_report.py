"""The demo's outputs for a reader: the training curve, WAV renderings, the listening page,
report.md and summary.json (the layout is listed in `experiments/demo.py`)."""

import json
import os
import pathlib
import re
from typing import Any

import matplotlib
import numpy as np
import tqdm

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from perceivers_jax.data import audio  # pylint: disable=g-import-not-at-top
from perceivers_jax.data import tokens as tokens_lib
from perceivers_jax.evaluation import note_lengths
from perceivers_jax.sampling import listening_page


def plot_training_curve(workdir: pathlib.Path, path: pathlib.Path) -> None:
  train_points, eval_points = [], []
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      if "train/loss" in record:
        train_points.append((record["step"], record["train/loss"]))
      if "eval/nll" in record:
        eval_points.append((record["step"], record["eval/nll"]))
  fig, ax = plt.subplots(figsize=(7, 4))
  if train_points:
    ax.plot(*zip(*sorted(train_points)), label="train loss (nats/token, with z-loss)")
  if eval_points:
    ax.plot(*zip(*sorted(eval_points)), "o-", label="validation NLL (nats/token)")
  ax.set_xlabel("step")
  ax.set_ylabel("nats per token")
  ax.set_title("PerceiverS tiny on 8 MAESTRO pieces")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def render_wavs(folders: list[pathlib.Path]) -> str:
  """Renders every .mid under `folders` to .wav with fluidsynth; returns a status line."""
  synth = audio.synthesizer()
  if synth is None:
    return f"none: {audio.MISSING}"
  midis = [p for folder in folders for p in sorted(folder.glob("*.mid"))]
  for midi in tqdm.tqdm(midis, desc="rendering WAV", unit="file"):
    wav = midi.with_suffix(".wav")
    if not wav.exists():
      synth.render(midi, wav)
  return f"{len(midis)} WAV files rendered by fluidsynth ({os.path.basename(synth.soundfont)})."


# -- report --------------------------------------------------------------------------------------


def write_listening_page(out: pathlib.Path, audio_status: str, surprisal_png: pathlib.Path,
                         surprisal_seconds: float) -> pathlib.Path:
  """index.html in `out` and in each sample folder, now that the WAVs (if any) exist;
  `surprisal_png` shows the validation piece's first `surprisal_seconds` s."""
  samples, evaluation = out / "samples", out / "evaluation"
  sample_sections = [("Trained model, unconditional", samples / "trained"),
                     ("Trained model continuing the validation piece (primer shaded)",
                      samples / "continuation"),
                     ("Untrained model, for comparison", samples / "untrained")]
  for _, folder in sample_sections:
    listening_page.write_folder_page(folder)
  sections = [sample_sections[0],
              ("Real music: excerpts of the held-out MAESTRO pieces, as long as the samples",
               out / "reference"), *sample_sections[1:]]
  plots = ("distance_kde.png", "repetition_density.png", "token_autocorrelation.png")
  return listening_page.write_page(
      out / listening_page.INDEX, "PerceiverS demo: look and listen", sections=sections,
      intro="Tiny PerceiverS trained on 8 real MAESTRO performances. Piano rolls: pitch up, "
      f"time right, colour = velocity (dark soft, yellow loud). Audio: {audio_status}",
      links=[("demo report", out / "report.md"), ("evaluation report", evaluation / "report.md"),
             ("metrics.json", evaluation / "metrics.json"),
             *[(name, evaluation / name) for name in plots],
             ("training curve", out / "training_curve.png")],
      figures=[("Training curve", out / "training_curve.png"),
               (f"Surprisal of the validation piece's first {surprisal_seconds:g} s (colour = "
                "bits per note: dark expected, yellow surprising)", surprisal_png),
               *[(f"Evaluation piano rolls: {name}", evaluation / f"piano_rolls_{name}.png")
                 for name in ("reference", "trained", "untrained")]])


# The validation rows of report.md (and summary.json's keys), weakest first.
NLL_ROWS = (("untrained", "untrained (uniform)"),
            ("token_frequency", "token frequencies (unigram)"), ("trained", "trained"))


def _nll_table(validation: dict[str, dict[str, float]]) -> str:
  rows = ["| model | NLL (nats/token) | bits/token | accuracy |", "|---|---|---|---|"]
  for key, label in NLL_ROWS:
    m = validation[key]
    rows.append(f"| {label} | {m['nll']:.3f} | {m['bits_per_token']:.3f} | {m['accuracy']:.3f} |")
  return "\n".join(rows)


def _notes_table(out: pathlib.Path) -> tuple[str, dict[str, dict[str, float]]]:
  """How each set plays its notes (`note_lengths`), as a table and as numbers."""
  folders = {"reference": out / "reference", "trained": out / "samples" / "trained",
             "untrained": out / "samples" / "untrained"}
  stats = {name: note_lengths.summary(
      [np.load(p) for p in sorted(folder.glob("*.npy"))] if name != "reference" else
      [tokens_lib.midi_file_to_tokens(p) for p in sorted(folder.glob("*.mid"))])
           for name, folder in folders.items()}
  rows = ["| set | notes/s | median note (s) | 90th percentile (s) | ended by the "
          f"{tokens_lib.DEFAULT_MAX_NOTE_SECONDS:g} s cap | events decoding to nothing "
          "(per 100) |", "|---|---|---|---|---|---|"]
  rows += [f"| {name} | {m['notes_per_second']:.1f} | {m['median_note_seconds']:.2f} | "
           f"{m['p90_note_seconds']:.2f} | {100 * m['capped_share']:.1f}% | "
           f"{m['dead_events_per_100']:.1f} |" for name, m in stats.items()]
  return "\n".join(rows), stats


def embedded_markdown(path: pathlib.Path, into: pathlib.Path, levels: int) -> str:
  """The markdown file `path` as a section of a page in the folder `into`: its headings
  `levels` deeper, its relative links resolved from `into`, and `into`'s absolute path
  (written by a tool that was given it) shown relative."""
  text = path.read_text(encoding="utf-8").replace(f"{into}{os.sep}", "")
  text = re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + levels) + " ", text, flags=re.M)
  prefix = os.path.relpath(path.parent, into).replace(os.sep, "/") + "/"
  return re.sub(r"\]\((?![a-z]+:|/|#)([^)]+)\)", lambda m: f"]({prefix}{m.group(1)})", text)


def write_summary(out: pathlib.Path, *, config_steps: int,
                  validation: dict[str, dict[str, float]], sampling: dict[str, Any],
                  evaluation: dict[str, Any], audio_status: str, seconds: float) -> pathlib.Path:
  """report.md (the summary a reader opens first) and summary.json."""
  table = embedded_markdown(out / "evaluation" / "report.md", out, levels=2)
  notes_table, note_stats = _notes_table(out)
  sampling_line = ", ".join(f"{name}={value}" for name, value in sampling.items())
  oa = evaluation["sets"]
  wins = sum(oa["trained"]["features"][f]["oa"] > oa["untrained"]["features"][f]["oa"]
             for f in oa["trained"]["features"])
  total = len(oa["trained"]["features"])
  text = f"""# PerceiverS demo

Tiny PerceiverS trained for {config_steps} steps on 8 real MAESTRO performances; validation on
the 9th, reference excerpts from the 9th and 10th (held out).

## Validation NLL (sequential effective windows)

{_nll_table(validation)}

The untrained model's head is zero-initialised, so it predicts every token with probability
1/{tokens_lib.VOCAB_SIZE} (NLL ln {tokens_lib.VOCAB_SIZE} = {np.log(tokens_lib.VOCAB_SIZE):.3f}).
The token-frequency row knows only how often each token occurs in the training pieces: a
model below it uses context.

## How the notes are played

Sampling: {sampling_line}.

{notes_table}

## Generated music against the held-out reference

The trained model has the larger overlap area (OA) on {wins} of {total} features.

{table}

## Files

- [index.html](index.html): the listening page (audio, piano rolls, settings of every sample)
- [samples/trained/](samples/trained/), [samples/continuation/](samples/continuation/),
  [samples/untrained/](samples/untrained/): MIDI, raw tokens, piano rolls, JSON sidecars
- [reference/](reference/): the held-out excerpts (MIDI, piano rolls)
- [training_curve.png](training_curve.png); the evaluation in [evaluation/](evaluation/)
- [summary.json](summary.json): these numbers for scripts; [train/](train/): the training
  workdir (checkpoints, metrics); [tfds/](tfds/): the dataset built from the pieces
- Audio: {audio_status}

Total time: {seconds / 60:.1f} min.
"""
  path = out / "report.md"
  path.write_text(text, encoding="utf-8")
  summary = {"steps": config_steps, "validation": validation, "sampling": sampling,
             "notes": note_stats, "oa_wins_of_trained": wins, "features": total,
             "seconds": seconds}
  (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
  return path
