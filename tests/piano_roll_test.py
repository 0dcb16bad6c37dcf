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
  """C4 (pitch 60) from 1 s to 2 s, at full velocity, in a 4 s roll with a 0.5 s primer."""
  ns = _sequence((60, 1.0, 2.0, 127), (72, 3.0, 4.0, 1))
  image = np.asarray(piano_roll.render(ns, primer_seconds=0.5))
  loud, soft = piano_roll.velocity_colour(127), piano_roll.velocity_colour(1)
  assert loud != soft
  # Worked out from the geometry, not from Layout: 60 is 48 keys below C8 (the top row),
  # and 1..2 s is the second quarter of the plot's width.
  plot_width = piano_roll.WIDTH_PX - piano_roll.LEFT_PX - 4
  top = piano_roll.TOP_PX + 48 * piano_roll.ROW_PX
  left = piano_roll.LEFT_PX + round(plot_width / 4)
  right = piano_roll.LEFT_PX + round(plot_width / 2) - 1
  rows, cols = np.nonzero((image == loud).all(axis=-1))
  assert (rows.min(), rows.max()) == (top, top + piano_roll.ROW_PX - 1)
  assert (cols.min(), cols.max()) == (left, right)
  assert rows.size == piano_roll.ROW_PX * (right - left + 1)  # a solid bar, nothing else
  rows, cols = np.nonzero((image == soft).all(axis=-1))  # C5 from 3 s to the end
  assert rows.min() == piano_roll.TOP_PX + 36 * piano_roll.ROW_PX
  assert cols.min() == piano_roll.LEFT_PX + round(plot_width * 3 / 4)
  primer = piano_roll.LEFT_PX + round(plot_width / 8) - 1  # the last column of 0.5 s
  assert tuple(image[top - 30, primer]) == piano_roll.PRIMER
  assert tuple(image[top - 30, primer + 2]) == piano_roll.BACKGROUND
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
