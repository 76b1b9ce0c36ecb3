"""The metrics stream of a workdir: metrics.jsonl (the record) plus browsable event files.

Every metric row (a training epoch, an expert epoch, a distillation iteration) goes to
``metrics.jsonl`` first. With ``metrics.tensorboard`` (default on) the numeric fields are also
written as TensorBoard scalars under ``tb/`` -- one TensorBoard run per training round
(``tb/<label>-seed<s>/round_XXX``, step = epoch), per expert (``tb/experts/expert_XXX``) and for
the distillation (``tb/distill``, step = iteration) -- so that ``tensorboard --logdir
<workdir>/tb`` overlays the rounds of a method. The writer is tensorboardX: maintained, pure
Python, and it needs neither TensorFlow nor the TensorBoard server to write. With
``metrics.wandb`` the same scalars go to Weights & Biases (offline unless ``WANDB_MODE`` says
otherwise), when the ``wandb`` package is installed.

metrics.jsonl stays the source of truth: after a resume it holds exactly the rows of an
uninterrupted run, while event files may show a recomputed point twice (TensorBoard draws the
later one over the earlier). Rows form *streams* (a training round of a run, an expert, the
distillation), each ordered by its position (epoch or iteration); when a process logs its
first row of a stream, the rows an earlier, interrupted process left there from that position
on are dropped: they are being recomputed.
"""

from __future__ import annotations

import numbers
import os
import dataclasses
from typing import Any, ClassVar, Optional

from dp_jax.config.sections import Section
from dp_jax.rundir import paths as workdir_lib
from dp_jax.storage import fileio

@dataclasses.dataclass(frozen=True)
class MetricsSettings(Section):
    """Where metrics go besides metrics.jsonl (``config.metrics``)."""
    SECTION: ClassVar[str] = "metrics"
    tensorboard: bool
    wandb: bool
    wandb_project: str


# Row fields that say where a row belongs, not what was measured.
_WHERE = ("phase", "run", "seed", "round", "epoch", "expert", "iteration", "set")
_POSITION = ("epoch", "iteration")  # where in its stream a row lies


def stream(row: dict) -> tuple[tuple, float]:
    """``(stream, position)`` of a metric row: the stream is the row's where-fields but its
    position (a training round of a run, an expert, the distillation, a final evaluation);
    a row without a position counts as at the stream's start."""
    key = tuple((k, row[k]) for k in _WHERE if k in row and k not in _POSITION)
    pos = next((row[k] for k in _POSITION if isinstance(row.get(k), numbers.Real)), None)
    return key, float("-inf") if pos is None else float(pos)


def tb_run(row: dict) -> Optional[tuple[str, int]]:
    """``(TensorBoard run directory relative to tb/, step)`` of a metric row, or None."""
    phase = row.get("phase")
    if phase == "experts" and "expert" in row:
        return os.path.join("experts", f"expert_{int(row['expert']):03d}"), int(row["epoch"])
    if phase in ("distill", "distill_eval") and "iteration" in row:
        return "distill", int(row["iteration"])
    if "run" in row and "epoch" in row:
        name = workdir_lib.run_name(str(row["run"]), int(row.get("seed") or 0))
        return os.path.join(name, f"round_{int(row.get('round') or 0):03d}"), int(row["epoch"])
    return None


def scalars(row: dict) -> dict[str, float]:
    """The row's measured numbers (booleans and position fields left out)."""
    prefix = "eval/" if row.get("phase") == "distill_eval" else ""
    return {prefix + k: float(v) for k, v in row.items()
            if k not in _WHERE and isinstance(v, numbers.Real) and not isinstance(v, bool)}


class MetricsLog:
    """``log(**row)``: append to metrics.jsonl and mirror the numbers to the enabled viewers."""

    def __init__(self, workdir: str, settings: Optional[MetricsSettings] = None):
        self.path = workdir_lib.metrics_path(workdir)
        self.tb_root = workdir_lib.tensorboard_dir(workdir)
        import jax
        main = jax.process_index() == 0  # like every other write: one process of a multi-host run
        self.tensorboard = main and settings is not None and settings.tensorboard
        self.wandb = (_start_wandb(workdir, settings)
                      if main and settings is not None and settings.wandb else None)
        self._writers: dict[str, Any] = {}
        # The furthest position of every stream an earlier process logged, and the streams
        # this one has logged to.
        self._earlier = self._read_earlier() if main else {}
        self._mine: set = set()

    def _read_earlier(self) -> dict[tuple, float]:
        if not os.path.exists(self.path):
            return {}
        rows = fileio.read_jsonl(self.path)
        if _torn(self.path):  # a killed writer's half line: an append would bury it mid-file
            fileio.write_jsonl(self.path, rows)
        earlier: dict[tuple, float] = {}
        for row in rows:
            key, pos = stream(row)
            earlier[key] = max(pos, earlier.get(key, pos))
        return earlier

    def __call__(self, **row) -> None:
        key, pos = stream(row)
        if key not in self._mine:
            self._mine.add(key)
            if key in self._earlier and self._earlier[key] >= pos:
                self._drop_recomputed(key, pos)
        fileio.append_jsonl(self.path, row)
        where = tb_run(row)
        if where is None:
            return
        run, step = where
        values = scalars(row)
        if self.tensorboard and values:
            writer = self._writer(run)
            for tag, v in values.items():
                writer.add_scalar(tag, v, step)
            writer.flush()  # a killed run keeps what it logged
        if self.wandb is not None and values:
            self.wandb.log({f"{run}/{k}": v for k, v in values.items()})

    def _drop_recomputed(self, key: tuple, pos: float) -> None:
        """Rewrite metrics.jsonl without the earlier rows of stream ``key`` at or after
        ``pos`` (an interrupted process logged them; this one recomputes them)."""
        rows = fileio.read_jsonl(self.path)
        fileio.write_jsonl(self.path, [r for r in rows if stream(r)[0] != key
                                       or stream(r)[1] < pos])
        self._earlier.pop(key, None)

    def _writer(self, run: str):
        if run not in self._writers:
            from tensorboardX import SummaryWriter
            self._writers[run] = SummaryWriter(os.path.join(self.tb_root, run))
        return self._writers[run]

    def close(self) -> None:
        """Flush and close every event file (and the W&B run)."""
        for w in self._writers.values():
            w.close()
        self._writers = {}
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _torn(path: str) -> bool:
    """Whether the file's last line lacks its newline (its writer was killed mid-line)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _start_wandb(workdir: str, settings):
    try:
        import wandb
    except ImportError as e:
        raise ValueError("config.metrics.wandb=True needs the wandb package (pip install "
                         "wandb); allowed without it: False") from e
    os.environ.setdefault("WANDB_MODE", "offline")  # no network unless the user asks for it
    return wandb.init(project=str(settings.wandb_project), dir=workdir,
                      name=os.path.basename(os.path.abspath(workdir)), reinit=True)
