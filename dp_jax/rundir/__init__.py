"""The run directory: its paths, identity, lock and metrics stream."""
