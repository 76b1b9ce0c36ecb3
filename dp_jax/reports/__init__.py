"""Reports and plots of pruning runs, analyses and distillations."""
