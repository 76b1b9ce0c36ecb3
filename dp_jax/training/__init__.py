"""Masked training: steps, optimisers, trainers and the small-set inner loop."""
