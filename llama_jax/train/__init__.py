"""Training: config schema, state, optimizer, checkpoints, metrics, the loop."""
