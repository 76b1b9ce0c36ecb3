"""The results of one or several workdirs as Python objects: records, figures, masks, tickets.

:func:`load_results` reads finished workdirs (several are merged as ``dp-jax report DIR1 DIR2``
merges them); :class:`Results` returns the numbers, tables and matplotlib figures the report
shows, without writing files unless asked.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

from dp_jax import masks as masks_lib
from dp_jax.analysis.settings import Settings as AnalysisSettings
from dp_jax.pruning import records as records_lib
from dp_jax.reports import controls as controls_lib
from dp_jax.reports import curves, merge
from dp_jax.reports import pruning as report
from dp_jax.rundir import paths as workdir_lib
from dp_jax.rundir import verified
from dp_jax.storage import fileio
from dp_jax.tasks import analyze as analyze_task
from dp_jax.tasks import export


@dataclasses.dataclass
class Results:
    """What finished workdirs hold. ``records`` are the rounds.jsonl rows (one per round's
    mask; ``test_accuracy`` None where ``prune.evaluate`` skipped its training); ``config`` is
    the (first) workdir's config.json."""
    workdirs: tuple
    records: list
    config: dict
    seeds: dict  # workdir -> the seeds it contributed
    distillation: Optional[dict] = None  # a distillation workdir's summary.json (task distill)

    def summary(self) -> dict:
        """Per method: rounds, seeds, final sparsity and accuracy (mean, sample std), dense
        accuracy and the mask search's examples and time (summary.json's ``methods``)."""
        return records_lib.method_figures(self.records)

    def to_pandas(self):
        """The records as a pandas DataFrame (needs pandas: ``pip install pandas``)."""
        try:
            import pandas as pd  # optional dependency, only for this method
        except ImportError:
            raise ImportError("Results.to_pandas needs pandas, which is not installed: "
                              "pip install pandas (or dp_jax[pandas])") from None
        return pd.DataFrame(self.records)

    def table(self) -> str:
        """The accuracy-vs-sparsity table of report.md (markdown)."""
        return report.accuracy_table(report.aggregate(self.records))

    def controls(self) -> list[dict]:
        """Every mask control (``shuffle:of=``, ``invert:of=``, ``reinit:of=``) against its
        source, per round trained in both: ``control``, ``source``, ``round``, ``sparsity``,
        ``seeds``, both runs' accuracies (``control_acc``, ``source_acc``) and the paired
        difference (``diff_mean``, ``diff_std``: control − source per seed, mean and sample
        std)."""
        return [dict(p, control=c, source=s)
                for c, s in controls_lib.control_pairs({r["method"] for r in self.records})
                for p in controls_lib.paired(self.records, c, s)]

    def figure_accuracy_vs_sparsity(self, path: Optional[str] = None):
        """Test accuracy vs weights remaining per method; written to ``path`` if given."""
        return self._maybe_save(report.figure_accuracy_vs_sparsity(
            report.aggregate(self.records), self._title()), path)

    def figure_accuracy_vs_examples(self, path: Optional[str] = None):
        """Test accuracy vs examples processed by the mask search; written to ``path``."""
        return self._maybe_save(report.figure_accuracy_vs_examples(
            report.aggregate(self.records)), path)

    def figure_training_curves(self, path: Optional[str] = None):
        """Training loss per epoch of every round (None when no epoch was logged)."""
        rows = [r for d in self.workdirs
                for r in fileio.read_jsonl(workdir_lib.metrics_path(d))]
        return self._maybe_save(curves.figure_training_curves(rows, pretty=report.pretty), path)

    def mask(self, method: str, seed: int, round: int) -> dict:
        """The mask of round ``round`` of run ``method`` (a label, e.g. ``imp_k0``), seed
        ``seed``: a params-shaped tree of bool arrays (checked against the run's checksums)."""
        workdir = self._holder(method, seed)
        if round not in self._rounds(method, seed):
            raise FileNotFoundError(f"{method} seed {seed} has no mask of round {round} in "
                                    f"{workdir}; rounds: {sorted(self._rounds(method, seed))}")
        return masks_lib.from_flat(verified.mask_arrays(workdir, method, seed, round))

    def ticket(self, method: str, seed: int, round: int, *, source: str = "auto") -> dict:
        """What ``dp-jax export`` writes, as objects: ``{"meta", "config", "record", "mask",
        "init", "trained"}`` (``source``: auto | checkpoint | retrain)."""
        workdir = self._holder(method, seed)
        return export.ticket_objects(*export.build_ticket(workdir, method, seed, round,
                                                          source=source))

    def analyze(self, analyses: Optional[Sequence[str]] = None, *, runs=None, rounds=None,
                seed: Optional[int] = None, settings: Optional[AnalysisSettings] = None,
                log=print) -> dict:
        """Instability / Hessian / landscape analyses of masks of the (single) workdir, as
        ``dp-jax analyze`` runs them; returns ``{"results": {tag: {analysis: result}}, ...}``."""
        if len(self.workdirs) != 1:
            raise ValueError("analyze works on one workdir; load it alone with load_results(dir)")
        return analyze_task.run(self.workdirs[0], analyses=analyses, runs=runs, rounds=rounds,
                                seed=seed, settings=settings or AnalysisSettings(), log=log)

    # ---- helpers -------------------------------------------------------------------------

    def _title(self) -> str:
        return (f"{self.config.get('model', {}).get('name', '')} on "
                f"{self.config.get('data', {}).get('name', '')}")

    def _rounds(self, method: str, seed: int) -> set:
        return {r["round"] for r in self.records if r["method"] == method and r["seed"] == seed}

    def _holder(self, method: str, seed: int) -> str:
        for d, seeds in self.seeds.items():
            if seed in seeds and (method, seed) in workdir_lib.list_runs(d):
                return d
        runs = sorted({(r["method"], r["seed"]) for r in self.records})
        raise ValueError(f"no run {method!r} seed {seed} in {', '.join(self.workdirs)}; runs: "
                         + ", ".join(f"{m} seed {s}" for m, s in runs))

    @staticmethod
    def _maybe_save(fig, path: Optional[str]):
        if fig is not None and path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            fig.savefig(path, dpi=120)
        return fig


def load_results(*workdirs: str) -> Results:
    """The results of finished workdirs; several are merged (their result-deciding settings
    must agree, seeds aside), as ``dp-jax report DIR1 DIR2 --out=...`` merges them."""
    if not workdirs:
        raise ValueError("load_results needs at least one workdir")
    config_path = workdir_lib.config_path(workdirs[0])
    config = fileio.read_json(config_path) if os.path.exists(config_path) else {}
    if len(workdirs) == 1 and config.get("task") == "distill":  # no pruning records
        summary = workdir_lib.summary_path(workdirs[0])
        return Results(workdirs=tuple(workdirs), records=[], config=config,
                       seeds={workdirs[0]: []}, distillation=fileio.read_json(summary)
                       if os.path.exists(summary) else None)
    for d in workdirs:
        if not os.path.exists(workdir_lib.rounds_path(d)):
            raise FileNotFoundError(f"{workdir_lib.rounds_path(d)} not found; is {d} a "
                                    "finished dp_jax workdir?")
    g = merge.gather(list(workdirs))
    return Results(workdirs=tuple(workdirs), records=g["rows"], config=g["config"],
                   seeds=g["seeds"])
