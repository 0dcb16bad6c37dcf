"""Watching a run: the music evaluator the training loop runs (music), the checkpoint
comparison of its pieces, and whole-piece surprisal (score, perceivers-score)."""
