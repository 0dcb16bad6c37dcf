"""MIDI <-> token ids on the command line.

  perceivers-tokens encode IN.mid OUT.npy   # int32 ids [SOS, ..., EOS], written to OUT.npy
  perceivers-tokens decode IN.npy OUT.mid   # PAD/SOS skipped, stops at EOS
  perceivers-tokens decode --rows IN.npy OUT.mid   # a [R, L] array: OUT_000.mid ... one per row
"""

import argparse
import os
import pathlib
import sys

import numpy as np

from perceivers_jax import config_base
from perceivers_jax.cli import logs
from perceivers_jax.data import tokens


def _check_output_folder(path: str) -> None:
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise config_base.InputError(f"{path}: the folder {folder} does not exist; create it "
                                 "first or write elsewhere")


def _load_ids(path: str) -> np.ndarray:
  try:
    ids = np.load(path)
  except (ValueError, OSError) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise config_base.InputError(f"{path}: not a .npy array of token ids ({e})") from e
  if not np.issubdtype(ids.dtype, np.integer):
    raise config_base.InputError(f"{path}: expected integer token ids, got dtype {ids.dtype}")
  return ids


def _decode_one(ids: np.ndarray, label: str, midi_out: str) -> None:
  try:
    ns = tokens.tokens_to_midi_file(ids, midi_out)
  except ValueError as e:
    raise config_base.InputError(f"{label}: {e}") from e
  print(f"{label}: {len(ns.notes)} notes, {ns.total_time:.1f} s -> {midi_out}")


def _encode(args: argparse.Namespace) -> None:
  _check_output_folder(args.npy_out)
  ids = tokens.midi_file_to_tokens(args.midi_in)
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
    _decode_one(ids, args.npy_in, args.midi_out)
    return
  if ids.ndim != 2:
    raise config_base.InputError(
        f"{args.npy_in}: --rows needs a 2-D [pieces, tokens] array, got {list(ids.shape)}")
  out = pathlib.Path(args.midi_out)
  for row, row_ids in enumerate(ids):
    _decode_one(row_ids, f"{args.npy_in}[{row}]",
                str(out.with_name(f"{out.stem}_{row:03d}{out.suffix}")))


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
  args = parser.parse_args(argv)
  return logs.call(lambda: (_encode if args.command == "encode" else _decode)(args),
                   verbose=args.verbose)


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
