"""MIDI <-> token ids on the command line.

  perceivers-tokens encode IN.mid OUT.npy   # int32 ids [SOS, ..., EOS], written to OUT.npy
  perceivers-tokens decode IN.npy OUT.mid   # PAD/SOS skipped, stops at EOS
  perceivers-tokens decode --rows IN.npy OUT.mid   # a [R, L] array: OUT_000.mid ... one per row
  perceivers-tokens render IN.mid|IN.npy OUT.png   # piano roll: pitch by time, velocity as colour

Decoding caps a note whose NOTE_OFF never comes at --max_note_seconds (0: no cap).
"""

import argparse
import os
import pathlib
import sys

import numpy as np

from perceivers_jax import config_base
from perceivers_jax.cli import logs
from perceivers_jax.data import piano_roll
from perceivers_jax.data import tokens


def _check_output_folder(path: str) -> None:
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise config_base.InputError(f"{path}: the folder {folder} does not exist; create it "
                                 "first or write elsewhere")


def _check_input_file(path: str, kind: str) -> None:
  if not os.path.isfile(path):
    raise config_base.InputError(f"{path}: no such file; pass the path of an existing {kind}")


def _read_midi(path: str, reader):
  """`reader(path)` of a MIDI file, its errors ending with what to do."""
  _check_input_file(path, "MIDI file")
  try:
    return reader(path)
  except tokens.MidiError as e:
    raise config_base.InputError(f"{e}; pass a Standard MIDI File (.mid) with piano notes") from e


_TOKEN_FILE = ".npy of token ids (as `perceivers-tokens encode` and `perceivers-sample` write)"
_VOCABULARY = "pass token ids of this tokeniser (its vocabulary: README, Tokens)"


def _load_ids(path: str) -> np.ndarray:
  _check_input_file(path, _TOKEN_FILE)
  try:
    ids = np.load(path)
  except (ValueError, OSError) as e:
    raise config_base.InputError(f"{path}: not a .npy array ({e}); pass a {_TOKEN_FILE}") from e
  if not np.issubdtype(ids.dtype, np.integer):
    raise config_base.InputError(f"{path}: expected integer token ids, got dtype {ids.dtype}; "
                                 f"save them as integers: np.save(path, ids.astype(np.int32))")
  return ids


def _decode_one(ids: np.ndarray, label: str, midi_out: str, max_note_seconds: float) -> None:
  try:
    ns = tokens.tokens_to_midi_file(ids, midi_out, max_note_seconds)
  except ValueError as e:
    raise config_base.InputError(f"{label}: {e}; {_VOCABULARY}") from e
  print(f"{label}: {len(ns.notes)} notes, {ns.total_time:.1f} s -> {midi_out}")


def _encode(args: argparse.Namespace) -> None:
  _check_output_folder(args.npy_out)
  ids = _read_midi(args.midi_in, tokens.midi_file_to_tokens)
  with open(args.npy_out, "wb") as f:  # a file object: np.save adds no ".npy"
    np.save(f, ids)
  print(f"{args.midi_in}: {ids.size} tokens, "
        f"{tokens.tokens_duration_seconds(ids):.1f} s of music -> {args.npy_out}")


def _decode(args: argparse.Namespace) -> None:
  _check_output_folder(args.midi_out)
  ids = _load_ids(args.npy_in)
  if not args.rows:
    if ids.ndim != 1:
      raise config_base.InputError(
          f"{args.npy_in}: a {list(ids.shape)} array, but decode takes one piece (1-D); "
          "pass --rows to write one MIDI file per row of a 2-D array")
    _decode_one(ids, args.npy_in, args.midi_out, args.max_note_seconds)
    return
  if ids.ndim != 2:
    raise config_base.InputError(
        f"{args.npy_in}: --rows needs a 2-D [pieces, tokens] array, got {list(ids.shape)}")
  out = pathlib.Path(args.midi_out)
  for row, row_ids in enumerate(ids):
    _decode_one(row_ids, f"{args.npy_in}[{row}]",
                str(out.with_name(f"{out.stem}_{row:03d}{out.suffix}")), args.max_note_seconds)


def _render(args: argparse.Namespace) -> None:
  _check_output_folder(args.png_out)
  suffix = pathlib.Path(args.file_in).suffix.lower()
  if suffix in (".mid", ".midi"):
    ns = _read_midi(args.file_in, tokens.load_note_sequence)
  elif suffix == ".npy":
    try:
      ns = tokens.tokens_to_note_sequence(_load_ids(args.file_in), args.max_note_seconds)
    except ValueError as e:
      raise config_base.InputError(f"{args.file_in}: {e}; {_VOCABULARY}") from e
  else:
    raise config_base.InputError(f"{args.file_in}: unknown kind of file; pass a .mid/.midi "
                                 f"file or a {_TOKEN_FILE}")
  piano_roll.write(ns, args.png_out, title=os.path.basename(args.file_in))
  print(f"{args.file_in}: {len(ns.notes)} notes, {ns.total_time:.1f} s -> {args.png_out}")


def _max_note_seconds(value: str) -> float:
  seconds = float(value)
  if seconds < 0:
    raise argparse.ArgumentTypeError(f"{value}: must be >= 0 (0 = no cap)")
  return seconds


def _add_max_note_seconds(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
      "--max_note_seconds", type=_max_note_seconds, default=tokens.DEFAULT_MAX_NOTE_SECONDS,
      help="a note without NOTE_OFF lasts at most this long (0: until the last event; "
      f"default {tokens.DEFAULT_MAX_NOTE_SECONDS:g})")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="perceivers-tokens", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument(f"--{logs.VERBOSE_FLAG}", action="store_true",
                      help="On bad input, also print the traceback.")
  commands = parser.add_subparsers(dest="command", required=True)
  encode = commands.add_parser("encode", help="MIDI file -> .npy of int32 token ids")
  encode.add_argument("midi_in")
  encode.add_argument("npy_out", help="written exactly here (no suffix added)")
  decode = commands.add_parser("decode", help=".npy of token ids -> MIDI file")
  decode.add_argument("npy_in")
  decode.add_argument("midi_out")
  decode.add_argument("--rows", action="store_true",
                      help="a 2-D array: one MIDI per row, MIDI_OUT's stem + _000, _001, ...")
  _add_max_note_seconds(decode)
  render = commands.add_parser("render", help="MIDI file or .npy of token ids -> piano roll PNG")
  render.add_argument("file_in")
  render.add_argument("png_out")
  _add_max_note_seconds(render)
  args = parser.parse_args(argv)
  command = {"encode": _encode, "decode": _decode, "render": _render}[args.command]
  return logs.call(lambda: command(args), verbose=args.verbose)


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
