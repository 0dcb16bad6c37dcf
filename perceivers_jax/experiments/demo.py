"""The end-to-end demo (README command 1): real MAESTRO pieces -> dataset -> trained model ->
music -> report, on a 2-core CPU in about a quarter of an hour.

Every stage writes under `output_dir` and is skipped when its result is already there, so a
second run reuses the data and the trained model, and an interrupted run resumes (training
resumes from its last checkpoint).

  output_dir/
    maestro_v3/            MAESTRO-v3-shaped folder over the fetched pieces (CSV + links)
    tfds/                  maestro_performance/full, ArrayRecord
    train/                 training workdir: checkpoints, metrics.jsonl, TensorBoard, config.json
    training_curve.png     train loss and validation NLL by step
    surprisal/             the trained model's surprisal on the validation piece's opening
                           (perceivers-score: a piano roll coloured by surprisal, JSON)
    index.html             the listening page: every sample's audio and piano roll, the curve,
                           links to the reports and plots (static, opens from the file system)
    samples/trained/       unconditional samples of the trained model (.mid, .npy, .json, .png,
                           .wav; index.html)
    samples/continuation/  the trained model continuing the validation piece's opening
    samples/untrained/     the same sampling from the untrained model, for comparison
    reference/             excerpts of the held-out pieces, as long as the samples (.mid,
                           .png, .wav)
    evaluation/            metrics.json, report.md and plots of the evaluation
    report.md              the summary: validation NLL and the metric table
    summary.json           the same numbers for scripts
"""

import csv
import dataclasses
import json
import os
import pathlib
import re
import shutil
import time
from typing import Any

from absl import logging
import jax
import matplotlib
import ml_collections
import numpy as np
import tqdm

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from data_prep import fetch_maestro_samples  # pylint: disable=g-import-not-at-top
from data_prep.maestro_performance import maestro_performance_dataset_builder as builder_lib
from perceivers_jax.data import audio
from perceivers_jax.data import input_pipeline
from perceivers_jax.data import piano_roll
from perceivers_jax.data import tokens as tokens_lib
from perceivers_jax.evaluation import note_lengths
from perceivers_jax.evaluation import piece_sets
from perceivers_jax.evaluation import report as report_lib
from perceivers_jax.sampling import listening_page
from perceivers_jax.sampling import sampling
from perceivers_jax.training import validation as validation_lib
from perceivers_jax.training import train
from perceivers_jax.watch import music
from perceivers_jax.watch import score

# Maestro_1..8 train, 9 validation, 10 test: the held-out pieces are the last two.
SPLIT_OF_PIECE = {**{i: "train" for i in range(1, 9)}, 9: "validation", 10: "test"}
SURPRISAL_SECONDS = 90
SURPRISAL_PIECE = "validation_opening"


@dataclasses.dataclass
class DemoOptions:
  output_dir: str = "demo_output"
  config: ml_collections.ConfigDict | None = None  # default: perceivers_jax/configs/tiny.py
  data_dir: str = ""  # an existing maestro_performance build; default: build from the pieces
  steps: int = 0  # 0: the config's train.num_steps
  num_samples: int = 8
  sample_tokens: int = 1024
  primer_seconds: float = 10.0
  temperature: float = 1.0
  top_p: float = 0.95
  seed: int = 0


def tiny_config() -> ml_collections.ConfigDict:
  from perceivers_jax.configs import tiny  # pylint: disable=g-import-not-at-top
  return tiny.get_config()


def _stage(name: str) -> None:
  print(f"\n== {name}", flush=True)


# -- data ----------------------------------------------------------------------------------------


def make_maestro_folder(pieces: list[pathlib.Path], folder: pathlib.Path,
                        split_of_piece: dict[int, str] | None = None) -> pathlib.Path:
  """A MAESTRO-v3-shaped folder (CSV with the split column + MIDI files) over `pieces`;
  piece i (from 1) goes to `split_of_piece[i]` (default SPLIT_OF_PIECE)."""
  split_of_piece = split_of_piece or SPLIT_OF_PIECE
  year_dir = folder / "2018"
  year_dir.mkdir(parents=True, exist_ok=True)
  rows = []
  for index, path in enumerate(pieces, start=1):
    target = year_dir / path.name
    if not target.exists():
      shutil.copyfile(path, target)
    duration = tokens_lib.load_note_sequence(path).total_time
    rows.append({"canonical_composer": "MAESTRO", "canonical_title": path.stem,
                 "split": split_of_piece[index], "year": 2018,
                 "midi_filename": f"2018/{path.name}", "audio_filename": "",
                 "duration": f"{duration:.3f}"})
  with open(folder / builder_lib.MAESTRO_CSV, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=builder_lib.MAESTRO_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  return folder


def prepare_data(options: DemoOptions, out: pathlib.Path,
                 split_of_piece: dict[int, str] | None = None) -> str:
  """Returns the TFDS data_dir holding maestro_performance/full (`split_of_piece`: as in
  `make_maestro_folder`)."""
  if options.data_dir:
    return options.data_dir
  pieces = fetch_maestro_samples.fetch()
  manual_dir = make_maestro_folder(pieces, out / "maestro_v3", split_of_piece)
  data_dir = out / "tfds"
  _, report = builder_lib.build(manual_dir, data_dir, "full")
  print(f"dataset: {report.get('pieces_per_split')} pieces, {report.get('tokens')} tokens, "
        f"{report.get('skipped', 0)} skipped")
  return str(data_dir)


# -- training ------------------------------------------------------------------------------------


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


def untrained_validation_metrics(config: ml_collections.ConfigDict) -> dict[str, float]:
  """Validation NLL of the freshly initialised model. Its head is zero-initialised, so it
  predicts the uniform distribution: NLL ln(vocabulary size) at every position."""
  trainer = train.build_trainer_for(config)
  state, rest = trainer.init_fn()
  source = input_pipeline.open_data_source(config, config.data.eval_split)
  return validation_lib.run_evaluation(trainer, state["params"], rest,
                                       validation_lib.eval_batches(config, source))


def _split_pieces(config: ml_collections.ConfigDict, split: str) -> list[np.ndarray]:
  source = input_pipeline.open_data_source(config, split)
  return [np.asarray(source[i]["tokens"]) for i in range(len(source))]


def token_frequency_metrics(config: ml_collections.ConfigDict) -> dict[str, float]:
  """Validation NLL and accuracy of the training pieces' token frequencies (a unigram model,
  add-one smoothed): the floor a model that uses no context reaches. Its targets are the
  validation evaluation's: every token after each piece's SOS."""
  counts_V = 1 + np.bincount(np.concatenate(_split_pieces(config, config.data.train_split)),
                             minlength=config.model.vocab_size)
  log_p_V = np.log(counts_V / counts_V.sum())
  targets = np.concatenate([piece[1:] for piece in _split_pieces(config,
                                                                 config.data.eval_split)])
  nll = -float(np.mean(log_p_V[targets]))
  return {"nll": nll, "bits_per_token": nll / np.log(2),
          "accuracy": float(np.mean(targets == np.argmax(counts_V)))}


# -- samples and reference -----------------------------------------------------------------------


def write_reference_excerpts(config: ml_collections.ConfigDict, folder: pathlib.Path,
                             count: int, num_tokens: int,
                             splits: tuple[str, ...] | None = None) -> list[pathlib.Path]:
  """`count` excerpts of `num_tokens` tokens, spread evenly over the held-out pieces (those of
  `splits`, default the validation and test splits).

  Ten pieces leave two held out; comparing whole pieces would give one intra-set distance.
  Excerpts as long as the generated samples compare like with like. Each gets its piano
  roll (.png) beside it, for the listening page.
  """
  folder.mkdir(parents=True, exist_ok=True)
  pieces = [piece for split in splits or (config.data.eval_split, "test")
            for piece in _split_pieces(config, split)]
  per_piece = [count // len(pieces) + (i < count % len(pieces)) for i in range(len(pieces))]
  paths = []
  for excerpt in piece_sets.excerpts(pieces, count, num_tokens):
    path = folder / f"reference_{len(paths):04d}.mid"
    notes = tokens_lib.tokens_to_midi_file(excerpt, path)
    piano_roll.write(notes, path.with_suffix(".png"), title=path.stem)
    paths.append(path)
  return paths


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


def write_listening_page(out: pathlib.Path, audio_status: str) -> pathlib.Path:
  """index.html in `out` and in each sample folder, now that the WAVs (if any) exist."""
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
               (f"Surprisal of the validation piece's first {SURPRISAL_SECONDS} s (colour = "
                "bits per note: dark expected, yellow surprising)",
                out / "surprisal" / f"{SURPRISAL_PIECE}.png"),
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


def run_demo(options: DemoOptions) -> pathlib.Path:
  """Runs every stage (skipping finished ones); returns the path of report.md."""
  start = time.perf_counter()
  out = pathlib.Path(options.output_dir).resolve()
  out.mkdir(parents=True, exist_ok=True)
  config = ml_collections.ConfigDict(options.config or tiny_config())
  with config.unlocked():
    if options.steps:
      config.train.num_steps = options.steps
      config.eval.every_steps = min(config.eval.every_steps, options.steps)
      config.checkpoint.every_steps = min(config.checkpoint.every_steps, options.steps)

  _stage("1/6 data: 10 real MAESTRO performances -> maestro_performance/full")
  with config.unlocked():
    config.data.data_dir = prepare_data(options, out)

  _stage(f"2/6 training {config.train.num_steps} steps (resumes from {out / 'train'})")
  workdir = out / "train"
  train.train_and_evaluate(config, str(workdir),
                           evaluators=music.evaluators(config, str(workdir)))
  trained = validation_lib.evaluate(config, str(workdir))
  validation = {"untrained": untrained_validation_metrics(config),
                "token_frequency": token_frequency_metrics(config), "trained": trained}
  plot_training_curve(workdir, out / "training_curve.png")
  print("validation NLL: " + ", ".join(f"{label} {validation[key]['nll']:.3f}"
                                       for key, label in NLL_ROWS) + " nats/token")
  validation_piece = out / "maestro_v3" / "2018" / "Maestro_9.mid"
  surprisal = score.score_opening(str(workdir), validation_piece, SURPRISAL_SECONDS,
                                  out / "surprisal", SURPRISAL_PIECE)
  print(f"surprisal of the validation piece's first {SURPRISAL_SECONDS} s: "
        f"{surprisal['bits_per_second']:.0f} bits/s ({out / 'surprisal'})")

  _stage("3/6 sampling")
  samples = out / "samples"
  model, _, step = sampling.load_model(str(workdir))
  settings = sampling.SampleSettings.from_flag_values(dict(
      num_samples=options.num_samples, batch_size=options.num_samples,
      num_tokens=options.sample_tokens, temperature=options.temperature, top_p=options.top_p,
      seed=options.seed))
  sampling.sample_to_dir(model, config, settings, samples / "trained", checkpoint_step=step,
                         checkpoint_path=str(workdir))
  sampling.sample_to_dir(
      model, config, dataclasses.replace(settings, num_samples=1, batch_size=1,
                                         primer=str(validation_piece),
                                         primer_seconds=options.primer_seconds),
      samples / "continuation", checkpoint_step=step, checkpoint_path=str(workdir))
  untrained_model = sampling.untrained_model(config)
  sampling.sample_to_dir(untrained_model, config, settings, samples / "untrained",
                         checkpoint_step=0, checkpoint_path="(untrained)")

  _stage("4/6 reference excerpts of the held-out pieces")
  reference = out / "reference"
  write_reference_excerpts(config, reference, options.num_samples, options.sample_tokens)

  _stage("5/6 evaluation (the paper's Table I)")
  evaluation = report_lib.evaluate_sets(
      str(reference), {"untrained": str(samples / "untrained"),
                       "trained": str(samples / "trained")}, str(out / "evaluation"))

  _stage("6/6 audio and report")
  audio_status = render_wavs([samples / "trained", samples / "continuation",
                              samples / "untrained", reference])
  print(audio_status)
  seconds = time.perf_counter() - start
  path = write_summary(out, config_steps=config.train.num_steps, validation=validation,
                       sampling=dataclasses.asdict(settings.sampling), evaluation=evaluation,
                       audio_status=audio_status, seconds=seconds)
  print(f"listening page: {write_listening_page(out, audio_status)}")
  print(f"\nDone in {seconds / 60:.1f} min: {path}")
  logging.info("demo finished on %s", jax.devices()[0].platform)
  return path
