"""Listening pages: a static `index.html` to hear and see a folder of samples.

One card per sample (found by its `sample_*.json` sidecar, written by `sampling`): an audio
player when a `.wav` rendering sits beside it, its piano roll (`.png`), duration, token
counts, the settings and the command that regenerates it. A folder without sidecars (real
music to compare with, such as the demo's reference excerpts) gets one card per MIDI file:
its audio and piano roll when they sit beside it. Links are relative and the
page loads nothing else, so it works straight from the file system (file://), copied
or zipped with its folder. A small inline script marks every image and audio element
`data-status="ok"` once it has loaded and `"broken"` (with a visible note) if its file is
missing or unreadable; the browser test reads those marks.
"""

import html
import json
import os
import pathlib
from collections.abc import Sequence
from urllib import parse

INDEX = "index.html"

_STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 980px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 0.6em 0.8em; margin: 0.8em 0; }
.card h3 { margin: 0 0 0.3em 0; font-size: 1em; }
.card img, .figure img { max-width: 100%; display: block; margin: 0.4em 0; }
.facts { font-size: 0.9em; color: #444; }
code { font-size: 0.8em; background: #f4f4f4; display: block; padding: 0.4em;
       white-space: pre-wrap; word-break: break-all; }
.broken { color: #b00; font-weight: bold; }
audio { width: 100%; }
"""

# Marks each <img>/<audio> as loaded or broken (no network, nothing fetched but the files).
_SCRIPT = """
function mark(el, ok) {
  el.dataset.status = ok ? "ok" : "broken";
  if (!ok) {
    const note = document.createElement("div");
    note.className = "broken";
    note.textContent = "missing or unreadable: " + el.getAttribute("src");
    el.after(note);
  }
}
for (const img of document.images) {
  if (img.complete) mark(img, img.naturalWidth > 0);
  else { img.onload = () => mark(img, img.naturalWidth > 0); img.onerror = () => mark(img, false); }
}
for (const audio of document.querySelectorAll("audio")) {
  if (audio.readyState >= 1) mark(audio, true);
  else if (audio.error) mark(audio, false);
  else {
    audio.onloadedmetadata = () => mark(audio, true);
    audio.onerror = () => mark(audio, false);
  }
}
"""


def _href(target: pathlib.Path, page_dir: pathlib.Path) -> str:
  return html.escape(parse.quote(os.path.relpath(target, page_dir).replace(os.sep, "/")))


def _settings_line(settings: dict) -> str:
  return ", ".join(f"{name}={value}" for name, value in settings.items() if value is not None)


def _audio_and_roll(stem: pathlib.Path, page_dir: pathlib.Path) -> list[str]:
  """The card's title, audio player (or why there is none) and piano roll."""
  parts = [f"<div class='card'><h3>{html.escape(stem.name)}</h3>"]
  wav, png = stem.with_suffix(".wav"), stem.with_suffix(".png")
  if wav.exists():
    parts.append(f"<audio controls preload='metadata' src='{_href(wav, page_dir)}'></audio>")
  else:
    parts.append("<div class='facts'>No audio: render the MIDI with fluidsynth to hear it "
                 "here (the demo does when fluidsynth is installed).</div>")
  if png.exists():
    parts.append(f"<img src='{_href(png, page_dir)}' alt='piano roll of {html.escape(stem.name)}'>")
  return parts


def _midi_card(midi: pathlib.Path, page_dir: pathlib.Path) -> str:
  parts = _audio_and_roll(midi.with_suffix(""), page_dir)
  parts.append(f"<div class='facts'><a href='{_href(midi, page_dir)}'>MIDI</a></div></div>")
  return "\n".join(parts)


def _sample_card(sidecar_path: pathlib.Path, page_dir: pathlib.Path) -> str:
  sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
  stem = sidecar_path.with_suffix("")
  midi = stem.with_suffix(".mid")
  parts = _audio_and_roll(stem, page_dir)
  eos = "ended with EOS" if sidecar.get("eos_reached") else "cut at the token budget"
  primer = (f"; primer {html.escape(str(sidecar['primer']))} "
            f"({sidecar.get('prompt_tokens', 0)} tokens)" if sidecar.get("primer") else "")
  parts.append(
      f"<div class='facts'>{sidecar['duration_seconds']:.1f} s of music, "
      f"{sidecar['num_tokens']} tokens ({sidecar.get('num_generated', '?')} generated), "
      f"{eos}{primer}; checkpoint step {sidecar.get('checkpoint_step', '?')}. "
      f"<a href='{_href(midi, page_dir)}'>MIDI</a> · "
      f"<a href='{_href(stem.with_suffix('.npy'), page_dir)}'>tokens</a> · "
      f"<a href='{_href(sidecar_path, page_dir)}'>sidecar</a></div>")
  parts.append(f"<div class='facts'>Settings: "
               f"{html.escape(_settings_line(sidecar.get('settings', {})))}</div>")
  parts.append(f"<div class='facts'>Regenerate it alone:</div>"
               f"<code>{html.escape(sidecar.get('regenerate', ''))}</code></div>")
  return "\n".join(parts)


def write_page(path: str | os.PathLike, title: str, *,
               sections: Sequence[tuple[str, str | os.PathLike]] = (),
               figures: Sequence[tuple[str, str | os.PathLike]] = (),
               links: Sequence[tuple[str, str | os.PathLike]] = (),
               intro: str = "") -> pathlib.Path:
  """Writes a listening page at `path`.

  Args:
    title: the page's heading.
    sections: (heading, folder) pairs; each folder's samples become cards (its MIDI files,
      if it holds no samples).
    figures: (caption, image file) pairs shown after the samples (missing files skipped).
    links: (label, file) pairs listed under "Files" (missing files skipped).
    intro: a plain-text paragraph under the heading.
  """
  path = pathlib.Path(path)
  page_dir = path.parent
  body = [f"<h1>{html.escape(title)}</h1>"]
  if intro:
    body.append(f"<p>{html.escape(intro)}</p>")
  present_links = [(label, pathlib.Path(target)) for label, target in links
                   if pathlib.Path(target).exists()]
  if present_links:
    body.append("<p>" + " · ".join(f"<a href='{_href(target, page_dir)}'>{html.escape(label)}</a>"
                                   for label, target in present_links) + "</p>")
  for heading, folder in sections:
    sidecars = sorted(pathlib.Path(folder).glob("sample_*.json"))
    midis = [] if sidecars else sorted(pathlib.Path(folder).glob("*.mid"))
    count = (f"{len(sidecars)} sample{'' if len(sidecars) == 1 else 's'}" if sidecars else
             f"{len(midis)} MIDI file{'' if len(midis) == 1 else 's'}")
    body.append(f"<h2>{html.escape(heading)} ({count})</h2>")
    body.extend(_sample_card(sidecar, page_dir) for sidecar in sidecars)
    body.extend(_midi_card(midi, page_dir) for midi in midis)
  for caption, image in figures:
    if pathlib.Path(image).exists():
      body.append(f"<div class='figure'><h2>{html.escape(caption)}</h2>"
                  f"<img src='{_href(pathlib.Path(image), page_dir)}' "
                  f"alt='{html.escape(caption)}'></div>")
  page = (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
          f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
          + "\n".join(body) + f"\n<script>{_SCRIPT}</script>\n</body></html>\n")
  path.write_text(page, encoding="utf-8")
  return path


def write_folder_page(folder: str | os.PathLike) -> pathlib.Path:
  """The page of one sampling output folder: `folder`/index.html."""
  folder = pathlib.Path(folder)
  return write_page(folder / INDEX, f"Samples in {folder.name}", sections=[(folder.name, folder)])
