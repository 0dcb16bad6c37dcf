"""Data: MIDI -> performance tokens (tokens), window arithmetic (windows), augmentation, the Grain input pipeline."""
