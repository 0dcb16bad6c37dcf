"""Piano rolls: a piece's notes as a PNG (pitch up, time right, velocity as colour).

Drawn with numpy and PIL alone (no matplotlib figure), so the same notes give the same
pixels on any machine and a test can look a known note up at `Layout.x` / `Layout.y`.
The 88 piano keys (A0..C8) are rows of `ROW_PX` pixels with a line at every C; notes
outside that range are drawn on the nearest edge row. A primer (the part a sample
continues) is shaded. Velocity runs dark blue (pp) through teal to yellow (ff); a caller may
colour notes by any value instead (`ramp_colour`, `diverging_colour`: surprisal, its change).
"""

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont


PITCH_LOW, PITCH_HIGH = 21, 108  # A0 .. C8
ROW_PX = 3
WIDTH_PX = 900
LEFT_PX, TOP_PX, BOTTOM_PX = 34, 18, 16
BACKGROUND = (255, 255, 255)
PRIMER = (222, 226, 236)
GRID = (205, 205, 205)
TEXT = (60, 60, 60)
# Velocity 1 .. 127 interpolates these stops (a viridis-like ramp, readable in grey too).
_VELOCITY_STOPS = np.array([(40, 30, 110), (30, 120, 140), (60, 180, 100), (250, 220, 40)],
                           np.float64)
_DIVERGING_STOPS = np.array([(40, 70, 200), (215, 215, 215), (210, 40, 40)], np.float64)
_TIME_STEPS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600)


def _interpolate(stops: np.ndarray, t: float) -> tuple[int, int, int]:
  t = float(np.clip(t, 0.0, 1.0)) * (len(stops) - 1)
  low = min(int(t), len(stops) - 2)
  return tuple(int(round(c)) for c in stops[low] + (t - low) * (stops[low + 1] - stops[low]))


def ramp_colour(t: float) -> tuple[int, int, int]:
  """The colour of t in [0, 1] on the velocity ramp (dark blue .. yellow)."""
  return _interpolate(_VELOCITY_STOPS, t)


def diverging_colour(t: float) -> tuple[int, int, int]:
  """The colour of t in [-1, 1]: blue (-1) through light grey (0) to red (+1)."""
  return _interpolate(_DIVERGING_STOPS, (t + 1) / 2)


def velocity_colour(velocity: int) -> tuple[int, int, int]:
  """The RGB colour of a MIDI velocity (1..127)."""
  return ramp_colour((np.clip(velocity, 1, 127) - 1) / 126)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Pixel geometry of one roll covering [0, seconds) of music."""
  seconds: float
  width_px: int = WIDTH_PX

  @property
  def plot_width(self) -> int:
    return self.width_px - LEFT_PX - 4

  @property
  def height_px(self) -> int:
    return TOP_PX + (PITCH_HIGH - PITCH_LOW + 1) * ROW_PX + BOTTOM_PX

  def x(self, seconds: float) -> int:
    """Column of a time."""
    return LEFT_PX + int(round(seconds / self.seconds * self.plot_width))

  def y(self, pitch: int) -> int:
    """Top row of a pitch's band (its `ROW_PX` rows start here)."""
    return TOP_PX + (PITCH_HIGH - int(np.clip(pitch, PITCH_LOW, PITCH_HIGH))) * ROW_PX


def render(ns, *, primer_seconds: float = 0.0, title: str = "", width_px: int = WIDTH_PX,
           colours: Sequence[tuple[int, int, int]] | None = None) -> Image.Image:
  """The piano roll of a NoteSequence (sustain folded, as `tokens` reads MIDI); `colours`:
  one RGB per note of ns.notes, in its order, instead of the velocity's (e.g. surprisal)."""
  seconds = max(1.0, ns.total_time, primer_seconds)
  layout = Layout(seconds, width_px)
  image = Image.new("RGB", (width_px, layout.height_px), BACKGROUND)
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default()
  bottom = layout.y(PITCH_LOW) + ROW_PX
  if primer_seconds > 0:
    draw.rectangle([layout.x(0), TOP_PX, layout.x(primer_seconds) - 1, bottom - 1], fill=PRIMER)
  for pitch in range(PITCH_LOW, PITCH_HIGH + 1):
    if pitch % 12 == 0:  # C: a line under its band, labelled C1..C8.
      draw.line([LEFT_PX, layout.y(pitch) + ROW_PX - 1, width_px - 4, layout.y(pitch) + ROW_PX - 1],
                fill=GRID)
      draw.text((2, layout.y(pitch) - 5), f"C{pitch // 12 - 1}", fill=TEXT, font=font)
  step = next((s for s in _TIME_STEPS_S if seconds / s <= 12), _TIME_STEPS_S[-1])
  for t in range(0, int(seconds) + 1, step):
    draw.line([layout.x(t), TOP_PX, layout.x(t), bottom - 1], fill=GRID)
    if layout.x(t) < width_px - 40:  # no label cut off at the right edge
      draw.text((layout.x(t) + 2, bottom + 2), f"{t}s", fill=TEXT, font=font)
  notes = list(ns.notes)
  for i in sorted(range(len(notes)), key=lambda i: notes[i].start_time):
    note = notes[i]
    x0, x1 = layout.x(note.start_time), layout.x(note.end_time)
    top = layout.y(note.pitch)
    draw.rectangle([x0, top, max(x0, x1 - 1), top + ROW_PX - 1],
                   fill=velocity_colour(note.velocity) if colours is None else colours[i])
  caption = f"{title}  " if title else ""
  caption += f"{len(ns.notes)} notes, {ns.total_time:.1f} s"
  if primer_seconds > 0:
    caption += f" (shaded: {primer_seconds:.1f} s primer)"
  draw.text((LEFT_PX, 3), caption, fill=TEXT, font=font)
  return image


def write(ns, path: str | os.PathLike, *, primer_seconds: float = 0.0, title: str = "",
          colours: Sequence[tuple[int, int, int]] | None = None) -> None:
  """Writes `render(...)` as a PNG."""
  render(ns, primer_seconds=primer_seconds, title=title, colours=colours).save(
      path, format="PNG", optimize=True)


def write_grid(sequences: Sequence, titles: Sequence[str], path: str | os.PathLike, *,
               columns: int = 2, width_px: int = 600) -> None:
  """Several rolls tiled row by row (each on its own time scale) into one PNG."""
  if not sequences:
    raise ValueError(f"{path}: no pieces to draw")
  tiles = [render(ns, title=title, width_px=width_px) for ns, title in zip(sequences, titles)]
  rows = -(-len(tiles) // columns)
  height = tiles[0].height
  grid = Image.new("RGB", (columns * width_px, rows * height), BACKGROUND)
  for i, tile in enumerate(tiles):
    grid.paste(tile, ((i % columns) * width_px, (i // columns) * height))
  grid.save(path, format="PNG", optimize=True)
