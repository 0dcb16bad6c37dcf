r"""Samples with and without the note grammar and the note-length prior, against real music.

For a trained model (a training workdir, e.g. the demo's demo_output/train), samples the
same seeds under each setting and compares every set with excerpts of the held-out pieces:
the Table I overlap areas (NLH, NLTM, IOI and the mean of all 13 features), notes per second,
held-note lengths (median, 90th percentile, the share only the 10 s cap ended), events that
decode to nothing, and how many notes the .npy and the .mid of a sample disagree on. Prints a
table, writes JSON and the first sample of each setting's piano roll.

  python benchmarks/note_grammar.py --workdir=demo_output/train --output_dir=/tmp/note_grammar
  python benchmarks/note_grammar.py --workdir=... \
      --settings="off:note_grammar=False" "--settings=grammar:" \
      "--settings=prior:note_off_after_seconds=1.5,note_off_nats_per_second=2"

Each setting is NAME:FIELD=VALUE,... over the demo's sampling (top_p 0.95, temperature 1);
FIELD is any `next_token.SamplingConfig` field (an omitted one keeps its default).
"""

import dataclasses
import json
import pathlib
import shutil

from absl import app
from absl import flags
import note_seq
import numpy as np

from perceivers_jax.data import tokens
from perceivers_jax.evaluation import note_lengths
from perceivers_jax.evaluation import report
from perceivers_jax.experiments import demo
from perceivers_jax.sampling import next_token
from perceivers_jax.sampling import sampling

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir of the model.", required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Samples, evaluation and results.json.",
                                  required=True)
_SETTINGS = flags.DEFINE_multi_string(
    "settings", ["off:note_grammar=False", "grammar:note_grammar=True,note_off_after_seconds=0",
                 "default:"],
    "NAME:FIELD=VALUE,... (SamplingConfig fields) per setting; `default:` the defaults.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 16, "Samples per setting (same seeds).")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 1024, "Tokens per sample, as the demo's.")
_NUM_REFERENCE = flags.DEFINE_integer("num_reference", 16,
                                      "Excerpts of the held-out pieces, as long as the samples.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (the same for every setting).")
_FEATURES = ("NLH", "NLTM", "IOI")


def _parse_setting(spec: str) -> tuple[str, next_token.SamplingConfig]:
  name, _, assignments = spec.partition(":")
  kinds = {f.name: f.type for f in dataclasses.fields(next_token.SamplingConfig)}
  values = dict(top_p=0.95)
  for assignment in filter(None, assignments.split(",")):
    field, _, value = assignment.partition("=")
    kind = kinds[field]
    values[field] = value.lower() in ("1", "true") if kind in (bool, "bool") else (
        float(value) if kind in (float, "float") else int(value))
  return name, next_token.SamplingConfig(**values)


def _render_mismatch(folder: pathlib.Path) -> int:
  """Samples whose .npy and .mid decode to different note counts."""
  return sum(len(tokens.tokens_to_note_sequence(np.load(npy)).notes) !=
             len(note_seq.midi_file_to_note_sequence(str(npy.with_suffix(".mid"))).notes)
             for npy in sorted(folder.glob("sample_*.npy")))


def main(argv) -> None:
  del argv
  out = pathlib.Path(_OUTPUT_DIR.value)
  model, config, step = sampling.load_model(_WORKDIR.value)
  reference = out / "reference"
  if not reference.exists():
    demo.write_reference_excerpts(config, reference, _NUM_REFERENCE.value, _NUM_TOKENS.value)
  sets, rows = {}, {}
  for name, sampling_config in map(_parse_setting, _SETTINGS.value):
    settings = sampling.SampleSettings(num_samples=_NUM_SAMPLES.value,
                                       batch_size=_NUM_SAMPLES.value,
                                       num_tokens=_NUM_TOKENS.value, seed=_SEED.value,
                                       sampling=sampling_config)
    folder = out / name
    sampling.sample_to_dir(model, config, settings, folder, checkpoint_step=step,
                           checkpoint_path=_WORKDIR.value)
    shutil.copyfile(folder / "sample_0000.png", out / f"piano_roll_{name}.png")
    sets[name] = str(folder)
    rows[name] = dict(sampling=dataclasses.asdict(sampling_config),
                      render_mismatch=_render_mismatch(folder),
                      **note_lengths.summary([np.load(p) for p in
                                              sorted(folder.glob("sample_*.npy"))]))
  metrics = report.evaluate_sets(str(reference), sets, out / "evaluation")
  rows["reference"] = note_lengths.summary(
      [tokens.midi_file_to_tokens(p) for p in sorted(reference.glob("*.mid"))])
  header = (f"{'setting':>10s} {'notes/s':>7s} {'median s':>8s} {'p90 s':>6s} {'capped':>6s} "
            f"{'dead/100':>8s} {'npy!=mid':>8s} " + " ".join(f"{f:>5s}" for f in _FEATURES)
            + f" {'OA mean':>7s}")
  print(header)
  for name, row in rows.items():
    if name in metrics["sets"]:
      entry = metrics["sets"][name]
      row["oa"] = {f: entry["features"][f]["oa"] for f in entry["features"]}
      row["oa_mean"] = entry["oa_mean"]
    oa = row.get("oa", {})
    print(f"{name:>10s} {row['notes_per_second']:7.2f} {row['median_note_seconds']:8.2f} "
          f"{row['p90_note_seconds']:6.2f} {row['capped_share']:6.3f} "
          f"{row['dead_events_per_100']:8.2f} {row.get('render_mismatch', 0):8d} "
          + " ".join(f"{oa[f]:5.3f}" if f in oa else f"{'':>5s}" for f in _FEATURES)
          + (f" {row['oa_mean']:7.3f}" if oa else ""))
  result = dict(workdir=_WORKDIR.value, checkpoint_step=step, num_samples=_NUM_SAMPLES.value,
                num_tokens=_NUM_TOKENS.value, num_reference=_NUM_REFERENCE.value,
                seed=_SEED.value, rows=rows)
  (out / "results.json").write_text(json.dumps(result, indent=1))
  print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
  app.run(main)
