"""The parts of a training run that are the same for every task (see dist_vdr.run.training)."""
