"""The pruning engine: set-up, rounds, records, dense runs and vmapped seeds."""
