"""MIDI to audio with fluidsynth and a General MIDI soundfont, where the system has both
(Debian: apt-get install fluidsynth fluid-soundfont-gm; `make audio-tools` does it as root).
"""

import dataclasses
import os
import shutil
import subprocess
import wave

import numpy as np

SOUNDFONT_CANDIDATES = ("/usr/share/sounds/sf2/FluidR3_GM.sf2",
                        "/usr/share/sounds/sf2/default-GM.sf2")
SAMPLE_RATE = 22050
MISSING = ("WAV rendering skipped: fluidsynth and a General MIDI soundfont are needed "
           "(Debian: apt-get install fluidsynth fluid-soundfont-gm; `make audio-tools` installs "
           "them when it runs as root).")


@dataclasses.dataclass(frozen=True)
class Synthesizer:
  fluidsynth: str
  soundfont: str

  def render(self, midi: str | os.PathLike, wav: str | os.PathLike) -> None:
    """Writes `midi` as a WAV file (SAMPLE_RATE Hz)."""
    subprocess.run([self.fluidsynth, "-ni", "-g", "0.8", "-r", str(SAMPLE_RATE), "-F", str(wav),
                    self.soundfont, str(midi)], check=True, capture_output=True)


def synthesizer() -> Synthesizer | None:
  """fluidsynth with the first soundfont found, or None (then print MISSING)."""
  fluidsynth = shutil.which("fluidsynth")
  soundfont = next((p for p in SOUNDFONT_CANDIDATES if os.path.exists(p)), None)
  return Synthesizer(fluidsynth, soundfont) if fluidsynth and soundfont else None


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
  """(mono float32 samples in [-1, 1], sample rate) of a 16-bit PCM WAV file."""
  with wave.open(str(path), "rb") as f:
    frames = np.frombuffer(f.readframes(f.getnframes()), np.int16)
    channels, rate = f.getnchannels(), f.getframerate()
  return frames.reshape(-1, channels).mean(axis=1).astype(np.float32) / 32768.0, rate
