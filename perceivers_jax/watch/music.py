"""The music evaluator: while a run trains, its model plays the same pieces at every K-th
evaluation (config.eval.music), measured and written so checkpoints compare on the same draws.

Pieces, fixed for the whole run and across resumes: piece k < num_unconditional starts from
[SOS]; piece num_unconditional + j continues the first primer_tokens tokens of validation
piece j % V (its opening). Piece k draws with key fold_in(key(seed), k) (`sampling.sample_key`),
in batches of batch_size pieces of one kind (all prompts of a kind have one length, so each
kind compiles one program). Every host samples its share of each batch's rows; the tokens
are gathered and process 0 alone measures and writes, in a background thread, as an
asynchronous checkpoint save does: no host waits for it, and training goes on. Evaluations
queue there, one after another; the training loop logs each one's scalars and media at its
step once it is done (`log_finished`), and waits for the rest at the end of the run, after
the last checkpoint is saved.

Measures, per set (unconditional; continuation: its generated part):
  music/oa_mean/SET, music/oa/SET/FEATURE: Table I overlap areas against num_reference
      excerpts of the validation pieces as long as the samples (`evaluation/report.py`);
  music/repetitive_share/SET: the share of repetitive notes (`evaluation/repetition.py`);
  music/copied_share/SET: the share of notes in runs of >= 16 notes found in the training
      pieces, a continuation's primer left out (`evaluation/memorisation.py`);
  the reference excerpts' own repetitive and copied shares as baselines, the share of pieces
  ending with EOS, their mean duration, the sampling time (every host, counted in the time
  account's "music" share with the waits for the background) and the background's measuring
  and writing time (process 0, beside training: writing_seconds).
TensorBoard also gets each set's piano-roll grid and, where fluidsynth is installed
(`data/audio.py`), the audio of its first piece (rendered for that piece alone: rendering
every piece took longer than sampling them on CPU).

Files, under WORKDIR/music (local or a bucket):
  STEP/unconditional/, STEP/continuation/   sample_XXXX .npy, .mid, .png, .json (+ .wav)
  STEP/evaluation/                          report.md, metrics.json, plots, piano-roll grids
  STEP/index.html                           the listening page of that checkpoint
  STEP/scalars.json                         the scalars logged for it
  steps.json, index.html                    every step's pieces; the page showing each piece
                                            at every checkpoint side by side
"""

import collections
from concurrent import futures
import dataclasses
import json
import pathlib
import tempfile
import time
from typing import Any, Sequence

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
from PIL import Image

from perceivers_jax import config_base
from perceivers_jax.data import audio
from perceivers_jax.data import input_pipeline
from perceivers_jax.data import tokens
from perceivers_jax.evaluation import features
from perceivers_jax.evaluation import memorisation
from perceivers_jax.evaluation import piece_sets
from perceivers_jax.evaluation import repetition
from perceivers_jax.evaluation import report
from perceivers_jax.sampling import job
from perceivers_jax.sampling import listening_page
from perceivers_jax.sampling import next_token
from perceivers_jax.sampling import sampling
from perceivers_jax.training import metrics_writer

NAME = "music"
SETS = ("unconditional", "continuation")
MANIFEST = "steps.json"


def _fail(field: str, value: Any, why: str) -> None:
  config_base.fail(f"eval.music.{field}", value, why)


def _check(config: ml_collections.ConfigDict) -> next_token.SamplingConfig:
  """ConfigError for the first config.eval.music value that cannot work; the sampling config."""
  music = config.eval.music
  for field in ("every_evals", "num_unconditional", "num_continuations", "max_train_pieces"):
    if isinstance(music[field], bool) or not isinstance(music[field], int) or music[field] < 0:
      _fail(field, music[field], "must be an integer >= 0.")
  for field in ("primer_tokens", "num_tokens", "batch_size"):
    if isinstance(music[field], bool) or not isinstance(music[field], int) or music[field] < 1:
      _fail(field, music[field], "must be a positive integer.")
  if music.num_unconditional + music.num_continuations < 1:
    _fail("num_unconditional", music.num_unconditional,
          "and num_continuations are both 0: ask for at least one piece (or every_evals=0).")
  if not isinstance(music.num_reference, int) or music.num_reference < 2:
    _fail("num_reference", music.num_reference, "must be >= 2 (Table I needs intra-set "
          "distances).")
  if music.num_continuations and music.primer_tokens >= config.model.max_length:
    _fail("primer_tokens", music.primer_tokens,
          f"must be below the context config.model.max_length={config.model.max_length}.")
  if config.model.scale_mask != "sliding" and any(config.model.cross_attention_scales):
    _fail("every_evals", music.every_evals, "the cached decoder needs config.model.scale_mask="
          "'sliding'; set config.eval.music.every_evals=0 for a final_block model.")
  try:
    return next_token.SamplingConfig(temperature=music.temperature, top_p=music.top_p)
  except ValueError as e:
    raise config_base.ConfigError(f"config.eval.music.{e}") from e


@dataclasses.dataclass(frozen=True)
class _Written:
  """What the background hands the training loop's writer for one evaluation."""
  scalars: dict[str, float]
  images: dict[str, np.ndarray]  # TensorBoard tag -> RGB uint8 [H, W, 3]
  audio: dict[str, tuple[np.ndarray, int]]  # TensorBoard tag -> (samples, sample rate)


def _pieces(source: Any, limit: int = 0) -> list[np.ndarray]:
  count = len(source) if not limit else min(limit, len(source))
  return [np.asarray(source[i]["tokens"], np.int32) for i in range(count)]


class MusicEvaluator:
  """A `training.validation.PeriodicEvaluator`: samples, measures and writes the fixed pieces."""

  name = NAME

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *,
               train_source: Any = None, eval_source: Any = None):
    """Checks config.eval.music and cuts the primers and reference excerpts (reading the
    validation split; the training split is read at the first evaluation)."""
    self._sampling = _check(config)
    self._music = music = config.eval.music
    self._config = config
    self.every_steps = music.every_evals * config.eval.every_steps
    self._dir = epath.Path(workdir) / NAME
    self._train_source = train_source
    if eval_source is None:
      eval_source = input_pipeline.open_data_source(config, config.data.eval_split)
    validation = _pieces(eval_source)
    self._reference = piece_sets.excerpts(validation, music.num_reference, music.num_tokens)
    self._openings = {}
    for j in range(music.num_continuations):
      piece = validation[j % len(validation)]
      if len(piece) <= music.primer_tokens + 1:
        _fail("primer_tokens", music.primer_tokens, f"validation piece {j % len(validation)} "
              f"has only {len(piece) - 2} tokens between SOS and EOS; use fewer.")
      self._openings[music.num_unconditional + j] = (j % len(validation),
                                                     piece[:music.primer_tokens + 1])
    # The training pieces' notes, indexed at the first evaluation, and the reference's copies.
    self._corpus = self._reference_copied = None
    self._synth = audio.synthesizer()
    # Process 0's measuring and writing, one evaluation after another, beside training.
    self._background = futures.ThreadPoolExecutor(1, thread_name_prefix=NAME)
    self._pending: collections.deque[tuple[int, futures.Future]] = collections.deque()

  # -- sampling (every host) -------------------------------------------------------------------

  def _prompt(self, index: int) -> np.ndarray:
    if index in self._openings:
      return self._openings[index][1]
    return np.array([tokens.SOS_ID], np.int32)

  def _sample(self, model) -> dict[int, np.ndarray]:
    """{piece index: generated tokens int32[num_tokens]} on every host."""
    music = self._music
    kinds = (range(music.num_unconditional),
             range(music.num_unconditional, music.num_unconditional + music.num_continuations))
    generated = {}
    for indices in kinds:
      for slots in sampling.batch_plan(list(indices), music.batch_size):
        tokens_BT, _ = sampling.generate(
            model, np.stack([self._prompt(k) for k in slots]),
            sampling.sample_keys(music.seed, slots), num_tokens=music.num_tokens,
            sampling=self._sampling)
        generated.update(zip(slots, tokens_BT))
    return generated

  def run(self, step: int, model) -> None:
    """Samples the pieces with `model` on every host; process 0 then measures and writes them
    in the background (`log_finished` logs the results)."""
    start = time.perf_counter()
    generated = self._sample(model)
    sampling_seconds = time.perf_counter() - start
    if jax.process_index() != 0:
      return
    if self._pending and not self._pending[-1][1].done():
      logging.warning("music evaluator: step %d's pieces queue behind step %d's, still being "
                      "measured and written; evaluate less often (a larger "
                      "config.eval.music.every_evals) if the queue grows.", step,
                      self._pending[-1][0])
    self._pending.append((step, self._background.submit(self._write, step, generated,
                                                        sampling_seconds)))

  def log_finished(self, writer: metrics_writer.MetricsWriter, *, wait: bool = False) -> None:
    """Logs the scalars and media of every evaluation measured and written by now, at its step;
    with `wait`, waits for those still running first (the end of a run)."""
    while self._pending and (wait or self._pending[0][1].done()):
      step, future = self._pending.popleft()
      written = future.result()  # raises what the background raised.
      for tag, image_HWC in written.images.items():
        writer.write_image(step, tag, image_HWC)
      for tag, (samples_T, sample_rate) in written.audio.items():
        writer.write_audio(step, tag, samples_T, sample_rate)
      writer.write_scalars(step, written.scalars, prefix=f"{NAME}/")

  # -- measuring and writing (process 0, in the background) -------------------------------------

  def _write(self, step: int, generated: dict[int, np.ndarray],
             sampling_seconds: float) -> _Written:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as staging:
      staging = pathlib.Path(staging)
      sets = self._write_samples(staging, step, generated)
      scalars = self._measure(staging, sets)
      scalars["sampling_seconds"] = sampling_seconds
      media = self._media(staging, sets)
      scalars["writing_seconds"] = time.perf_counter() - start  # before the pages and copies.
      (staging / "scalars.json").write_text(json.dumps(scalars, indent=1, sort_keys=True))
      listening_page.write_page(
          staging / listening_page.INDEX, f"Music at step {step}",
          sections=[(f"{name} ({self._set_description(name)})", staging / name)
                    for name in SETS if sets[name]],
          intro=f"The music evaluator's pieces at step {step}: the same seeds and primers at "
          "every evaluation (../index.html shows them side by side).",
          links=[("evaluation report", staging / "evaluation" / "report.md"),
                 ("metrics.json", staging / "evaluation" / "metrics.json"),
                 ("scalars.json", staging / "scalars.json")],
          figures=[(f"Piano rolls: {name}", staging / "evaluation" / f"piano_rolls_{name}.png")
                   for name in ("reference", *SETS)])
      self._publish(staging, step, sets)
    return _Written(scalars, *media)

  def _set_description(self, name: str) -> str:
    if name == "unconditional":
      return "from SOS"
    return f"continuing the first {self._music.primer_tokens} tokens of validation pieces"

  def _write_samples(self, staging: pathlib.Path, step: int,
                     generated: dict[int, np.ndarray]) -> dict[str, list[dict[str, Any]]]:
    """Writes each piece's files under staging/SET; {set: [its sidecars]}."""
    music = self._music
    sets = {name: [] for name in SETS}
    for index in sorted(generated):
      name = "continuation" if index in self._openings else "unconditional"
      folder = staging / name
      folder.mkdir(exist_ok=True)
      number = index - (music.num_unconditional if name == "continuation" else 0)
      key = f"jax.random.fold_in(jax.random.key({music.seed}), {index})"
      sidecar = job.write_sample_files(
          folder / f"sample_{number:04d}", self._prompt(index), generated[index],
          max_note_seconds=tokens.DEFAULT_MAX_NOTE_SECONDS, sidecar={
              "sample_index": number, "piece": index, "seed": music.seed, "key": key,
              "checkpoint_step": step, "settings": {
                  "num_tokens": music.num_tokens, **dataclasses.asdict(self._sampling)},
              "primer": (f"the opening of validation piece {self._openings[index][0]}"
                         if index in self._openings else None),
              "regenerate": f"the music evaluator at step {step} (config.eval.music), key {key}"})
      if self._synth is not None and number == 0:  # rendering all would cost more than sampling.
        self._synth.render(folder / f"sample_{number:04d}.mid", folder / f"sample_{number:04d}.wav")
      sets[name].append(sidecar)
    return sets

  def _evaluated_tokens(self, staging: pathlib.Path, name: str) -> list[np.ndarray]:
    """Each piece of a set as written; of a continuation only its generated part."""
    out = []
    for path in sorted((staging / name).glob("sample_*.npy")):
      piece = np.load(path)
      prompt = json.loads(path.with_suffix(".json").read_text())["prompt_tokens"]
      out.append(np.concatenate([[tokens.SOS_ID], piece[prompt:]]).astype(np.int32))
    return out

  def _copied(self, pieces: Sequence[np.ndarray], primer_notes: Sequence[int]) -> list[dict]:
    if self._corpus is None:
      source = self._train_source
      if source is None:
        source = input_pipeline.open_data_source(self._config, self._config.data.train_split)
      train = _pieces(source, self._music.max_train_pieces)
      self._corpus = memorisation.Corpus(
          memorisation.piece_steps([features.notes_from_tokens(p, f"train[{i}]")[0]
                                    for i, p in enumerate(train)]),
          [f"train[{i}]" for i in range(len(train))])
    notes = [features.notes_from_tokens(p, "piece")[0] for p in pieces]
    return self._corpus.check(memorisation.piece_steps(notes), list(primer_notes))

  def _measure(self, staging: pathlib.Path, sets: dict[str, list[dict]]) -> dict[str, float]:
    present = [name for name in SETS if sets[name]]
    metrics = report.evaluate_sets(
        self._reference, {name: self._evaluated_tokens(staging, name) for name in present},
        staging / "evaluation")
    scalars = {"repetitive_share/reference":
               metrics["reference"]["repetition"]["repetitive_share_mean"]}
    if self._reference_copied is None:
      self._reference_copied = np.mean([r["copied_share"] for r in self._copied(
          self._reference, [0] * len(self._reference))])
    scalars["copied_share/reference"] = self._reference_copied
    for name in present:
      entry = metrics["sets"][name]
      scalars[f"oa_mean/{name}"] = entry["oa_mean"]
      scalars[f"kld_mean/{name}"] = entry["kld_mean"]
      scalars.update({f"oa/{name}/{feature}": value["oa"]
                      for feature, value in entry["features"].items()})
      scalars[f"repetitive_share/{name}"] = entry["repetition"]["repetitive_share_mean"]
      pieces = [np.load(staging / name / f"sample_{s['sample_index']:04d}.npy")
                for s in sets[name]]
      primers = [memorisation.count_notes(p[:s["prompt_tokens"]])
                 for p, s in zip(pieces, sets[name])]
      copies = self._copied(pieces, primers)
      scalars[f"copied_share/{name}"] = np.mean([r["copied_share"] for r in copies])
      scalars[f"longest_copied_run/{name}"] = max(r["longest_run"] for r in copies)
      scalars[f"eos_share/{name}"] = np.mean([s["eos_reached"] for s in sets[name]])
      scalars[f"seconds_mean/{name}"] = np.mean([s["duration_seconds"] for s in sets[name]])
    return {k: float(v) for k, v in scalars.items() if v is not None}

  def _media(self, staging: pathlib.Path, sets: dict[str, list[dict]]
             ) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, int]]]:
    """(each set's piano-roll grid, the audio of its first piece where rendered) by tag."""
    images, sounds = {}, {}
    for name in SETS:
      grid = staging / "evaluation" / f"piano_rolls_{name}.png"
      if grid.exists():
        images[f"{NAME}/piano_rolls/{name}"] = np.asarray(Image.open(grid).convert("RGB"))
      wav = staging / name / "sample_0000.wav"
      if sets[name] and wav.exists():
        sounds[f"{NAME}/audio/{name}"] = audio.read_wav(wav)
    return images, sounds

  def _publish(self, staging: pathlib.Path, step: int, sets: dict[str, list[dict]]) -> None:
    """Copies the staged files to WORKDIR/music/STEP (replacing a redone step's), then the
    manifest of every step and the side-by-side page, written last."""
    destination = self._dir / str(step)
    if destination.exists():
      destination.rmtree()
    for path in sorted(staging.rglob("*")):
      if path.is_file():
        target = destination / path.relative_to(staging).as_posix()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    manifest_path = self._dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest[str(step)] = {name: [{"sample_index": s["sample_index"],
                                   "duration_seconds": s["duration_seconds"],
                                   "num_tokens": s["num_tokens"],
                                   "eos_reached": s["eos_reached"],
                                   "has_wav": self._synth is not None and s["sample_index"] == 0}
                                  for s in entries]
                           for name, entries in sets.items()}
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    (self._dir / listening_page.INDEX).write_text(comparison_page(manifest))


def comparison_page(manifest: dict[str, dict[str, list[dict]]]) -> str:
  """The page of every piece (rows) at every evaluated step (columns), from steps.json."""
  steps = sorted(manifest, key=int)
  rows = []
  for name in SETS:
    numbers = sorted({e["sample_index"] for step in steps for e in manifest[step].get(name, ())})
    for number in numbers:
      cells = []
      for step in steps:
        entry = next((e for e in manifest[step].get(name, ()) if e["sample_index"] == number),
                     None)
        cells.append(None if entry is None else listening_page.ComparisonCell(
            f"{step}/{name}/sample_{number:04d}", entry["has_wav"],
            f"{entry['duration_seconds']:.1f} s, {entry['num_tokens']} tokens"
            + (", EOS" if entry["eos_reached"] else "")))
      rows.append((f"{name} {number}", cells))
  return listening_page.comparison_page(
      "The music evaluator's pieces at every checkpoint", [f"step {s}" for s in steps], rows,
      intro="Each row is one piece: the same seed (and primer) at every evaluated step. "
      "Each step's folder has its listening page (STEP/index.html) and evaluation report.")


def evaluators(config: ml_collections.ConfigDict, workdir: str, *, train_source: Any = None,
               eval_source: Any = None) -> list[MusicEvaluator]:
  """The periodic evaluators config.eval.music asks for (none when every_evals is 0)."""
  if not config.eval.get("music") or not config.eval.music.every_evals:
    return []
  return [MusicEvaluator(config, workdir, train_source=train_source, eval_source=eval_source)]
