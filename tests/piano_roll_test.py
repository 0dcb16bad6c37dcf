"""Piano rolls: a known note lands on its pixels, the primer is shaded, the CLI renders files."""

import note_seq
import numpy as np
from PIL import Image

from perceivers_jax.cli import tokens as tokens_cli
from perceivers_jax.data import piano_roll
from perceivers_jax.data import tokens


def _sequence(*notes) -> note_seq.NoteSequence:
  ns = note_seq.NoteSequence()
  for pitch, start, end, velocity in notes:
    ns.notes.add(pitch=pitch, start_time=start, end_time=end, velocity=velocity)
  ns.total_time = max(n.end_time for n in ns.notes)
  return ns


def test_known_note_shows_where_it_should():
  ns = _sequence((60, 1.0, 2.0, 127), (72, 3.0, 4.0, 1))
  image = np.asarray(piano_roll.render(ns, primer_seconds=0.5))
  layout = piano_roll.Layout(seconds=4.0)
  assert image.shape == (layout.height_px, piano_roll.WIDTH_PX, 3)
  loud, soft = piano_roll.velocity_colour(127), piano_roll.velocity_colour(1)
  assert loud != soft
  row = layout.y(60) + 1
  inside = image[row, layout.x(1.0):layout.x(2.0)]
  assert (inside == loud).all()  # the whole note, in the colour of its velocity
  assert tuple(image[row, layout.x(2.0) + 2]) != loud  # and no further
  assert tuple(image[row, layout.x(1.0) - 2]) != loud
  assert tuple(image[layout.y(61) + 1, layout.x(1.5)]) == piano_roll.BACKGROUND  # pitch above
  assert tuple(image[layout.y(72) + 1, layout.x(3.5)]) == soft
  assert tuple(image[layout.y(90) + 1, layout.x(0.25)]) == piano_roll.PRIMER
  assert tuple(image[layout.y(90) + 1, layout.x(0.75)]) == piano_roll.BACKGROUND
  # Deterministic: the same notes give the same pixels.
  assert (np.asarray(piano_roll.render(ns, primer_seconds=0.5)) == image).all()


def test_render_cli_on_midi_and_tokens(maestro_paths, tmp_path, capsys):
  ids = tokens.midi_file_to_tokens(maestro_paths[2])[:2000]
  np.save(tmp_path / "piece.npy", ids)
  for source in (maestro_paths[2], tmp_path / "piece.npy"):
    out = tmp_path / f"{source.stem}.png"
    assert tokens_cli.main(["render", str(source), str(out)]) == 0
    with Image.open(out) as image:
      assert image.format == "PNG" and image.width == piano_roll.WIDTH_PX
      pixels = np.asarray(image.convert("RGB"))
    # Notes were drawn: velocity colours are chromatic, background, grid and text grey.
    assert (np.ptp(pixels.astype(int), axis=-1) > 30).mean() > 0.01
  assert "notes" in capsys.readouterr().out
  np.save(tmp_path / "floats.npy", np.zeros(3))
  assert tokens_cli.main(["render", str(tmp_path / "floats.npy"), str(tmp_path / "x.png")]) == 1
  assert "floats.npy: expected integer token ids" in capsys.readouterr().err
