"""What the analyses of a workdir compute, and how finely: :class:`Settings` (CPU-sized defaults)."""

from __future__ import annotations

import dataclasses
from typing import Optional

BN_CHOICES = ("interpolate", "recompute", "both")
HESSIAN_POINTS = ("trained", "start")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Knobs of the analyses; the defaults are sized for a 2-core CPU."""
    copies: int = 2                      # copies per start point (an analysis may need more: landscape 3)
    alphas: int = 11                     # interpolation grid points on [0, 1]
    bn_mode: str = "both"                # BatchNorm statistics: interpolate | recompute | both
    bn_batches: int = 20                 # training batches for "recompute"
    layerwise: bool = True               # layer-wise interpolation
    eval_examples: int = 0               # test examples for instability (0 = all)
    eval_chunk: Optional[int] = None     # grid points per compiled program (None = alphas)
    k_values: Optional[tuple] = None     # dense rewind-step curve (None = a default set)
    hessian_examples: int = 2000
    hessian_batch: int = 500
    hessian_at: tuple = ("trained",)     # trained (copy 0) and/or start (the masked start point)
    lanczos_steps: int = 20
    top_k: int = 5
    trace_probes: int = 32
    slq_probes: int = 2
    landscape_grid: int = 11
    landscape_points: int = 21
    landscape_span: float = 1.0
    landscape_examples: int = 2000

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field and its allowed values."""
        def need(ok, field, allowed):
            if not ok:
                raise ValueError(f"analysis setting {field}={getattr(self, field)!r} is invalid; "
                                 f"allowed: {allowed}")
        need(self.copies >= 2, "copies", "an integer >= 2")
        need(self.alphas >= 2, "alphas", "an integer >= 2")
        need(self.bn_mode in BN_CHOICES, "bn_mode", " | ".join(BN_CHOICES))
        need(self.bn_batches >= 1, "bn_batches", "an integer >= 1")
        need(self.eval_examples >= 0, "eval_examples", "0 (all) or a positive integer")
        need(self.hessian_examples >= 1, "hessian_examples", "an integer >= 1")
        need(all(p in HESSIAN_POINTS for p in self.hessian_at), "hessian_at",
             " and/or ".join(HESSIAN_POINTS))
        need(self.lanczos_steps >= 1, "lanczos_steps", "an integer >= 1")
        need(self.trace_probes >= 2, "trace_probes", "an integer >= 2")
        need(self.slq_probes >= 1, "slq_probes", "an integer >= 1")
        need(self.top_k >= 1, "top_k", "an integer >= 1")
        need(self.landscape_grid >= 2, "landscape_grid", "an integer >= 2")
        need(self.landscape_points >= 2, "landscape_points", "an integer >= 2")
        need(self.landscape_span > 0, "landscape_span", "a number > 0")

    @property
    def bn_modes(self) -> tuple:
        """BatchNorm modes to evaluate, the headline one first."""
        return ("recompute", "interpolate") if self.bn_mode == "both" else (self.bn_mode,)
