"""The listening page in a real browser: headless Chromium opens a sampling folder's
index.html from the file system; every image and audio element must load."""

import html.parser
import importlib.util
import pathlib
import shutil
import subprocess
import wave

import numpy as np
import pytest

from perceivers_jax.data import piano_roll
from perceivers_jax.data import tokens
from perceivers_jax.sampling import listening_page
from perceivers_jax.sampling import sampling

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (`make test-tools` as root "
    "installs it: apt-get install chromium)")


def _chromium(*args: str) -> str:
  # --no-sandbox: the sandbox refuses to run as root (CI containers); the page is ours.
  result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           "--hide-scrollbars", "--virtual-time-budget=10000", *args],
                          capture_output=True, text=True, timeout=120, check=True)
  return result.stdout


class _Media(html.parser.HTMLParser):
  """(tag, src, data-status) of every <img> and <audio>."""

  def __init__(self):
    super().__init__()
    self.elements = []

  def handle_starttag(self, tag, attrs):
    if tag in ("img", "audio"):
      attrs = dict(attrs)
      self.elements.append((tag, attrs.get("src"), attrs.get("data-status")))


def _media_after_load(page: pathlib.Path) -> list[tuple[str, str, str]]:
  parser = _Media()
  parser.feed(_chromium("--dump-dom", page.as_uri()))
  return parser.elements


def _write_wav(path: pathlib.Path, seconds: float = 0.5) -> None:
  """A quiet 440 Hz tone, standing in for fluidsynth's rendering."""
  rate = 8000
  tone = (1000 * np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate)).astype(np.int16)
  with wave.open(str(path), "wb") as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(rate)
    f.writeframes(tone.tobytes())


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> pathlib.Path:
  """Two samples of an untrained tiny model, written by `sample_to_dir` (page included)."""
  spec = importlib.util.spec_from_file_location("tiny", ROOT / "configs" / "tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.update(dict(max_length=64, num_latents=16, embed_dim=32, num_heads=2,
                           head_dim=16, cross_attention_scales=(0, 8)))
  out = tmp_path_factory.mktemp("samples")
  sampling.sample_to_dir(sampling.untrained_model(config), config,
                         sampling.SampleSettings(num_samples=2, batch_size=2, num_tokens=48),
                         out, checkpoint_step=0, checkpoint_path="(untrained)")
  return out


def test_sampling_writes_a_piano_roll_per_sample_and_a_page(sample_dir):
  assert sorted(p.name for p in sample_dir.glob("*.png")) == ["sample_0000.png",
                                                               "sample_0001.png"]
  page = (sample_dir / listening_page.INDEX).read_text()
  assert "src='sample_0001.png'" in page and "--sample_index=1" in page
  assert "http" not in page  # nothing fetched from a network


@needs_chromium
def test_page_loads_every_image_and_audio_in_chromium(sample_dir, tmp_path):
  _write_wav(sample_dir / "sample_0000.wav")
  page = listening_page.write_folder_page(sample_dir)
  media = _media_after_load(page)
  assert sorted(tag for tag, _, _ in media) == ["audio", "img", "img"]
  assert all(status == "ok" for _, _, status in media), media
  shot = tmp_path / "page.png"
  _chromium("--window-size=1000,1400", f"--screenshot={shot}", page.as_uri())
  assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 10_000


@needs_chromium
def test_broken_image_and_audio_are_reported(sample_dir, tmp_path):
  broken = tmp_path / "broken"
  shutil.copytree(sample_dir, broken)
  (broken / "sample_0000.wav").write_bytes(b"RIFF not really a wav")
  page = listening_page.write_folder_page(broken)
  (broken / "sample_0001.png").unlink()  # linked by the page, then lost
  status = {src: state for _, src, state in _media_after_load(page)}
  assert status == {"sample_0000.wav": "broken", "sample_0000.png": "ok",
                    "sample_0001.png": "broken"}


def test_real_music_beside_the_samples_is_heard_too(sample_dir, maestro_paths, tmp_path):
  """A folder of MIDI files without sidecars (the demo's reference excerpts) gets a card per
  file, with its audio and piano roll; in Chromium both load."""
  reference = tmp_path / "reference"
  reference.mkdir()
  notes = tokens.tokens_to_midi_file(tokens.midi_file_to_tokens(maestro_paths[8])[:300],
                                     reference / "reference_0000.mid")
  piano_roll.write(notes, reference / "reference_0000.png", title="reference_0000")
  _write_wav(reference / "reference_0000.wav")
  page = listening_page.write_page(tmp_path / listening_page.INDEX, "Samples and real music",
                                   sections=[("Samples", sample_dir), ("Real music", reference)])
  parser = _Media()
  parser.feed(page.read_text())
  assert {("audio", "reference/reference_0000.wav", None),
          ("img", "reference/reference_0000.png", None)} <= set(parser.elements)
  assert "Real music (1 MIDI file)" in page.read_text()
  if CHROMIUM is not None:
    loaded = {src: status for _, src, status in _media_after_load(page)}
    assert loaded["reference/reference_0000.wav"] == "ok", loaded
