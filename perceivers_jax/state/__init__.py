"""Model state on disk: Orbax training checkpoints and params-only exports."""
