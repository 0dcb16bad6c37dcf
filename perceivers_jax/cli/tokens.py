"""MIDI <-> token ids on the command line.

  perceivers-tokens encode IN.mid OUT.npy   # int32 ids [SOS, ..., EOS]
  perceivers-tokens decode IN.npy OUT.mid   # PAD/SOS skipped, stops at EOS
"""

import argparse
import sys

import numpy as np

from perceivers_jax.data import tokens


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="perceivers-tokens", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  encode = commands.add_parser("encode", help="MIDI file -> .npy of int32 token ids")
  encode.add_argument("midi_in")
  encode.add_argument("npy_out")
  decode = commands.add_parser("decode", help=".npy of token ids -> MIDI file")
  decode.add_argument("npy_in")
  decode.add_argument("midi_out")
  args = parser.parse_args(argv)

  if args.command == "encode":
    try:
      ids = tokens.midi_file_to_tokens(args.midi_in)
    except tokens.MidiError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    np.save(args.npy_out, ids)
    print(f"{args.midi_in}: {ids.size} tokens, "
          f"{tokens.tokens_duration_seconds(ids):.1f} s of music -> {args.npy_out}")
  else:
    ids = np.load(args.npy_in)
    if not np.issubdtype(ids.dtype, np.integer):
      print(f"error: {args.npy_in}: expected integer token ids, got dtype {ids.dtype}",
            file=sys.stderr)
      return 1
    try:
      ns = tokens.tokens_to_midi_file(ids, args.midi_out)
    except ValueError as e:
      print(f"error: {args.npy_in}: {e}", file=sys.stderr)
      return 1
    print(f"{args.npy_in}: {len(ns.notes)} notes, {ns.total_time:.1f} s -> {args.midi_out}")
  return 0


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
