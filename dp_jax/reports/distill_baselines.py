"""Real-subset baselines of a distilled set: coreset selections of its size, trained by the set's
own evaluation, and the published figures they are compared with (see
:mod:`dp_jax.reports.distill_compare`, which writes them into compare.md and compare.json)."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Callable, Optional, Sequence

import numpy as np

from dp_jax import rng
from dp_jax.data import coresets
from dp_jax.distill import evaluate as eval_lib
from dp_jax.distill.sets import check_compatible, load_distilled
from dp_jax.methods import subset as subset_lib
from dp_jax.pruning import setup as setup_lib
from dp_jax.storage import fileio

BASELINES = coresets.SELECTIONS  # the selections a set can be compared with
DEFAULT_BASELINES = ("random", "herding", "kcenter", "forgetting")
CACHE = "baselines"  # under --out: selections/ and evaluations/, one JSON file each

# The published figures, in one place. Zhao, Mopuri & Bilen, "Dataset Condensation with Gradient
# Matching", ICLR 2021, Table 1, column "FashionMNIST, img/cls 10": test accuracy (%, mean and
# std) of networks trained on 10 real images per class chosen by each coreset method, and on DC's
# condensed set. Each entry is (mean, std), or None where the figure has not been transcribed
# from the paper's text (never filled in from memory; see docs/distillation.md).
DC_TABLE1_FMNIST_IPC10 = {
    "citation": ('Zhao, Mopuri & Bilen, "Dataset Condensation with Gradient Matching", ICLR 2021, '
                 'Table 1, column "FashionMNIST, img/cls 10" (test accuracy %, mean ± std)'),
    "dataset": "fashion_mnist",
    "ipc": 10,
    # our name -> (the paper's row, (mean, std) or None)
    "rows": {"random": ("Random", None), "herding": ("Herding", None),
             "kcenter": ("K-Center", None), "forgetting": ("Forgetting", None),
             "distilled": ("DC (the paper's method)", None)},
}


def pct(r: dict) -> str:
    """``mean ± std (n)`` of an evaluation's accuracies, in percent (— when absent)."""
    if not r:
        return "—"
    n = len(r.get("accuracies", [])) or 1
    return f"{100 * r['accuracy_mean']:.2f} ± {100 * r.get('accuracy_std', 0.0):.2f} ({n})"


def parse_baselines(text: str) -> tuple[str, ...]:
    """``--baselines``: ``none``, or comma-separated names of :data:`BASELINES`; a ValueError
    names the unknown ones and lists the allowed."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if names == ["none"]:
        return ()
    unknown = [n for n in names if n not in BASELINES]
    if not names or unknown:
        what = f"unknown {', '.join(repr(n) for n in unknown)}" if unknown else "empty"
        raise ValueError(f"--baselines={text} is invalid ({what}); allowed: none, or "
                         f"comma-separated names of {', '.join(BASELINES)}")
    return tuple(dict.fromkeys(names))


def set_size(workdir: str) -> Optional[dict]:
    """The workdir's distilled set and how many images of each class it stores; None if the
    workdir has no distilled.npz; ValueError if its classes are not equally represented."""
    path = os.path.join(workdir, "distilled.npz")
    if not os.path.exists(path):
        return None
    ds = load_distilled(path)
    labels = ds.stored_labels if ds.stored_labels is not None else ds.labels
    counts = np.bincount(np.asarray(labels, np.int64))
    if counts.size == 0 or counts.min() != counts.max():
        raise ValueError(f"{path} stores {counts.tolist()} images per class; the real-subset "
                         "baselines need the same number of every class (or --baselines=none)")
    return {"path": path, "set": ds, "per_class": int(counts[0]), "classes": int(counts.size)}


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _plain(obj):
    """``obj`` as it reads back from JSON (tuples become lists), so a cached identity compares
    equal to the one that wrote it."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _data_sha(dataset) -> str:
    """The content of the data the subsets come from and are tested on."""
    h = hashlib.sha256()
    for a in (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _cached(path: str, identity: dict, check: Callable[[dict], bool]) -> Optional[dict]:
    """The record at ``path`` if it was made by ``identity`` and passes ``check``; a damaged or
    foreign record is warned about and made again."""
    if not os.path.exists(path):
        return None
    try:
        got = fileio.read_json(path)
        ok = isinstance(got, dict) and got.get("identity") == identity and check(got)
    except (ValueError, OSError, KeyError, TypeError, IndexError) as e:
        warnings.warn(f"{path} is unreadable ({e}); making it again", RuntimeWarning,
                      stacklevel=3)
        return None
    if not ok:
        warnings.warn(f"{path} holds another or a damaged record; making it again",
                      RuntimeWarning, stacklevel=3)
        return None
    return got


class Baselines:
    """The baselines of one workdir: its settings, set, data, selections and evaluations."""

    def __init__(self, settings, size: dict, out: str, datasets: dict):
        self.s, self.size, self.out, self.datasets = settings, size, out, datasets
        self._dataset = self._setup = self._probes = self._evaluator = None

    @property
    def dataset(self):
        if self._dataset is None:
            key = _sha([self.s.data.to_dict(), self.s.seed])
            if key not in self.datasets:
                data = setup_lib.load_data(self.s)
                if not hasattr(data, "x_train"):
                    raise ValueError("the real-subset baselines need the data in memory "
                                     "(data.pipeline='memory'); use --baselines=none")
                self.datasets[key] = (data, _data_sha(data))
            self._dataset, self.data_sha = self.datasets[key]
            check_compatible(self.size["set"], self._dataset)
            if self.size["classes"] != self._dataset.num_classes:
                raise ValueError(f"{self.size['path']} stores images of {self.size['classes']} "
                                 f"classes, the data has {self._dataset.num_classes}")
        return self._dataset

    @property
    def setup(self):
        """The probes' set-up: the workdir's model and ``train.*`` optimiser on its data, as a
        pruning run of the same settings builds it (``subset`` trains its probes on it)."""
        if self._setup is None:
            self._setup = setup_lib.build_setup(self.s, self.dataset)
        return self._setup

    def _selection_identity(self, name: str) -> dict:
        self.dataset  # noqa: B018 (loads the data and its digest)
        ident = {"baseline": name, "seed": int(self.s.seed), "per_class": self.size["per_class"],
                 "data_sha256": self.data_sha}
        if name != "random":  # the probes: the model, its training, the probe rules
            ident.update(model=self.s.model.to_dict(), train=self.s.train.to_dict(),
                         probe={"fraction": subset_lib.PROBE_FRACTION,
                                "min_epochs": subset_lib.PROBE_MIN_EPOCHS,
                                "nets": subset_lib.probe_nets(name)})
        return _plain(ident)

    def _file(self, kind: str, name: str, ident: dict) -> str:
        return os.path.join(self.out, CACHE, kind, f"{name}-ipc{self.size['per_class']}-seed"
                                                   f"{int(self.s.seed)}-{_sha(ident)[:16]}.json")

    def cached_selection(self, name: str) -> Optional[dict]:
        """The cached record of selection ``name`` (checked), or None."""
        ident = self._selection_identity(name)
        path = self._file("selections", name, ident)
        per, classes = self.size["per_class"], self.size["classes"]
        y = np.asarray(self.dataset.y_train)

        def valid(rec):
            idx = np.asarray(rec["indices"], np.int64)
            return bool(idx.size == per * classes and np.all(np.diff(idx) > 0) and idx[0] >= 0
                        and idx[-1] < y.size
                        and np.all(np.bincount(y[idx], minlength=classes) == per))
        got = _cached(path, ident, valid)
        return None if got is None else dict(got, file=path)

    def make_selection(self, name: str, nets: int) -> dict:
        """Select ``name`` as ``subset:select=name`` does for the seed and write its record; the
        probes (``nets`` of them, at least what ``name`` needs) are trained once per workdir."""
        ident = self._selection_identity(name)
        path = self._file("selections", name, ident)
        n = self.size["per_class"] * self.size["classes"]
        seed_key = rng.seed_key(int(self.s.seed))
        if name == "random":
            idx, budget = subset_lib.random_indices(self.setup, seed_key, n), {"examples": 0}
        else:
            key = subset_lib.coreset_key(seed_key)
            if self._probes is None or len(self._probes) < subset_lib.probe_nets(name):
                self._probes = subset_lib.train_probes(self.setup, key, nets)
            idx, budget = subset_lib.select_indices(name, self.setup, key, n,
                                                    probes=self._probes)
        y = np.asarray(self.dataset.y_train)
        record = dict(identity=ident, **budget, indices=np.asarray(idx).tolist(),
                      class_counts=np.bincount(y[idx], minlength=self.size["classes"]).tolist())
        fileio.write_json(path, record)
        return dict(record, file=path)

    def evaluation(self, name: str, selection: dict) -> dict:
        """The selection trained and tested by the distilled set's evaluation (cached)."""
        d = self.s.distill
        lr, models = float(d.lr_init), int(d.eval_models)
        ident = {"selection": selection["identity"], "indices_sha256": _sha(selection["indices"]),
                 "model": self.s.model.to_dict(),
                 "eval": {k: v for k, v in d.to_dict().items() if k.startswith("eval_")},
                 "eval_batch_size_test": int(self.s.train.eval_batch_size),
                 "lr": lr, "key": ["set_eval_key", int(self.s.seed)], "models": models}
        ident = _plain(ident)
        path = self._file("evaluations", name, ident)
        got = _cached(path, ident, lambda rec: len(rec["result"]["accuracies"]) == models)
        if got is not None:
            return got["result"]
        if self._evaluator is None:
            self._evaluator = eval_lib.make_evaluator(self.s, self.dataset)
        result = eval_lib.evaluate_subset(self._evaluator, self.dataset, selection["indices"], lr,
                                          eval_lib.set_eval_key(int(self.s.seed)),
                                          num_models=models)
        result["lr"] = lr
        fileio.write_json(path, {"identity": ident, "result": result})
        return result

    def run(self, names: Sequence[str]) -> dict:
        """``{name: evaluation result + per_class, images, selection file, probe examples}``."""
        chosen = {n: self.cached_selection(n) for n in names}
        missing = [n for n, c in chosen.items() if c is None]
        nets = max([subset_lib.probe_nets(n) for n in missing if n != "random"] or [0])
        for n in missing:
            chosen[n] = self.make_selection(n, nets)
        out = {}
        for name in names:
            sel = chosen[name]
            res = self.evaluation(name, sel)
            out[name] = dict(res, per_class=self.size["per_class"], images=len(sel["indices"]),
                             selection=os.path.relpath(sel["file"], self.out),
                             probe_examples=int(sel.get("examples", 0)))
        return out


def baselines_table(runs: Sequence[dict], names: Sequence[str]) -> str:
    """Each set beside its real-subset baselines (same size per class, same evaluation) and the
    published row of DC's Table 1."""
    if not names:
        return ""
    lines = ["| set | images per class | distilled | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    notes = []
    for r in runs:
        b = r.get("baselines")
        if b is None:
            notes.append(f"- {r['label']}: {r.get('baselines_note', 'not evaluated')}")
            continue
        per = next(iter(b.values()))["per_class"]
        lines.append(f"| {r['label']} | {per} | {pct(r['distilled'])} | "
                     + " | ".join(pct(b[n]) for n in names) + " |")
    pub = DC_TABLE1_FMNIST_IPC10
    cells = [_published(pub["rows"][n][1]) if n in pub["rows"] else "—" for n in names]
    lines.append(f"| published: DC Table 1, FashionMNIST | {pub['ipc']} | "
                 f"{_published(pub['rows']['distilled'][1])} (DC) | " + " | ".join(cells) + " |")
    intro = ("Real training subsets with as many images of each class as the set stores, chosen "
             "as `subset:n=N;select=S` chooses them for the workdir's seed "
             "(`dp_jax/data/coresets.py` on one probe network), trained by the distilled set's "
             "own evaluation: the same K networks (inits, minibatches, augmentation), step size "
             "`distill.lr_init` (as the task's random subsets). Accuracy %, mean ± std (models).")
    rows = ", ".join(f"{name} = {paper}" for name, (paper, _) in pub["rows"].items())
    cite = (f"Published row: {pub['citation']}; rows {rows}. The published figures are for "
            f"Fashion-MNIST at {pub['ipc']} images per class under DC's own networks and "
            "protocol, not measured here; \"not transcribed\" marks a figure not yet copied "
            "from the paper.")
    return "\n".join(["## Real subsets of the same size, same evaluation", "", intro, "",
                      *lines, "", *notes, *([""] if notes else []), cite, ""])


def _published(v) -> str:
    return "not transcribed" if v is None else f"{v[0]:.1f} ± {v[1]:.1f}"
