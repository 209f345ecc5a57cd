"""The trainer: `train.py` (the loop, read top to bottom) and the setup pieces it assembles (inputs, trainables,
optimization, surge_setup, evaluation, checkpoints, samples, report, state)."""
