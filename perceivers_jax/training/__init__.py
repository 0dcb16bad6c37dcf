"""Training: the loop and step, optimizer, config validation, metrics."""
