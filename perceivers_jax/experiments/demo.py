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
import pathlib
import shutil
import time

from absl import logging
import jax
import ml_collections
import numpy as np

from data_prep import fetch_maestro_samples
from data_prep.maestro_performance import maestro_performance_dataset_builder as builder_lib
from perceivers_jax.data import input_pipeline
from perceivers_jax.data import piano_roll
from perceivers_jax.data import tokens as tokens_lib
from perceivers_jax.evaluation import piece_sets
from perceivers_jax.evaluation import report as report_lib
from perceivers_jax.experiments import demo_report
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


# -- validation baselines ------------------------------------------------------------------------------------


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
  demo_report.plot_training_curve(workdir, out / "training_curve.png")
  print("validation NLL: " + ", ".join(f"{label} {validation[key]['nll']:.3f}"
                                       for key, label in demo_report.NLL_ROWS) + " nats/token")
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
  audio_status = demo_report.render_wavs([samples / "trained", samples / "continuation",
                                          samples / "untrained", reference])
  print(audio_status)
  seconds = time.perf_counter() - start
  path = demo_report.write_summary(
      out, config_steps=config.train.num_steps, validation=validation,
      sampling=dataclasses.asdict(settings.sampling), evaluation=evaluation,
      audio_status=audio_status, seconds=seconds)
  page = demo_report.write_listening_page(out, audio_status,
                                         out / "surprisal" / f"{SURPRISAL_PIECE}.png",
                                         SURPRISAL_SECONDS)
  print(f"listening page: {page}")
  print(f"\nDone in {seconds / 60:.1f} min: {path}")
  logging.info("demo finished on %s", jax.devices()[0].platform)
  return path
