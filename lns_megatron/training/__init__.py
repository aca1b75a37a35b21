"""The pretraining loop and what keeps it safe: checkpoints, run guards, process groups, metrics."""
