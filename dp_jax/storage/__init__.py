"""Files on disk: atomic writes, JSON lines, round checkpoints, checksums."""
