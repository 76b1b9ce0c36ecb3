"""Progress display for long runs: rounds done, the last result and an ETA."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    """A tqdm bar over rounds; each update shows the round's method, sparsity and accuracy."""

    def __init__(self, total: int, desc: str = "rounds", *, enabled: bool = True):
        self._bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True,
                         mininterval=0.5, smoothing=0.1, disable=not enabled)

    def update(self, record: dict) -> None:
        """Advance by one round and show its headline numbers."""
        self._bar.set_postfix_str(
            f"{record['method']} seed {record['seed']} r{record['round']} "
            f"sparsity {record['sparsity']:.3f} " + (
                "not trained" if record['test_accuracy'] is None  # prune.evaluate skipped it
                else f"acc {record['test_accuracy']:.4f}"))
        self._bar.update(1)

    def epoch(self, info: dict) -> None:
        """Show the epoch in progress (called after every training epoch)."""
        self._bar.set_postfix_str(
            f"{info.get('run')} seed {info.get('seed')} r{info.get('round')} "
            f"epoch {info.get('epoch', 0) + 1} loss {info.get('loss', float('nan')):.4f}")

    def note(self, text: str) -> None:
        """Show free text (e.g. the distillation phase) without advancing."""
        self._bar.set_postfix_str(text)

    def close(self) -> None:
        """Finish the bar."""
        self._bar.close()
