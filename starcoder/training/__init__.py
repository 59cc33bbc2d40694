"""Training: the loop, optimizer, schedule, checkpoints, metrics and signal handling."""
