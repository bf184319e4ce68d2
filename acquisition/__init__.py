"""Neural data in: LSL streams, epoching into per-trial responses, and the simulated subject."""
