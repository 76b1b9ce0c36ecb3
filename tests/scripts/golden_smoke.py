"""Digest of a smoke experiment (records minus timings, SHA-256 of every mask) for regression tests.

  python tests/scripts/golden_smoke.py OUT.json

runs the default experiment's smoke variant on a generated 8x8 dataset with every method that
existed before the method registry (MTT distillation included, at tiny sizes) and writes the
digest. ``tests/e2e/test_golden.py`` runs the same experiment and compares against the committed
``tests/fixtures/golden_smoke.json``: any change to masks or records is caught bit for bit.
"""

import hashlib
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/ for conftest's helpers

from dp_jax.pruning.records import TIMINGS  # noqa: E402
METHODS = "imp,imp:k=3,random,dp,reinit:of=dp,dp_imp"


def golden_config(npz_path):
    """fashion_mnist:smoke on the generated dataset, all pre-registry methods, tiny MTT."""
    from conftest import load_config_module
    c = load_config_module("fashion_mnist").get_config("smoke")
    c.data.name = f"npz:{npz_path}"
    c.data.train_size = 0
    c.train.batch_size = 40
    c.train.eval_batch_size = 64
    c.prune.method = METHODS
    c.prune.rounds = 3
    d = c.distill
    d.ipc = 2
    d.num_experts = 1
    d.expert_train_epochs = 3
    d.expert_batch_size = 40
    d.max_start_epoch = 1
    d.expert_epochs = 1
    d.syn_steps = 3
    d.batch_syn = 0
    d.iterations = 3
    d.checkpoint_every = 2
    c.dp.steps = 20
    c.dp.batch_size = 10
    c.dp.switch_sparsity = 0.5
    return c


def digest(workdir):
    """``{"records": [...], "masks": {run/round: {param: sha256}}}`` of a finished workdir."""
    from dp_jax.storage import fileio
    rows = fileio.read_jsonl(os.path.join(workdir, "rounds.jsonl"))
    rows = sorted(({k: v for k, v in r.items() if k not in TIMINGS} for r in rows),
                  key=lambda r: (r["method"], r["seed"], r["round"]))
    masks = {}
    runs = os.path.join(workdir, "runs")
    for run in sorted(os.listdir(runs)):
        mdir = os.path.join(runs, run, "masks")
        for f in sorted(os.listdir(mdir)) if os.path.isdir(mdir) else []:
            with np.load(os.path.join(mdir, f)) as z:
                masks[f"{run}/{f}"] = {k: hashlib.sha256(np.ascontiguousarray(z[k]).tobytes())
                                       .hexdigest() for k in sorted(z.files)}
    return {"records": rows, "masks": masks}


def run_golden(tmpdir):
    """Run the golden experiment in ``tmpdir``; returns its digest."""
    from conftest import make_npz
    from dp_jax.tasks import prune as experiment
    npz = make_npz(os.path.join(tmpdir, "toy.npz"))
    wd = os.path.join(tmpdir, "wd")
    experiment.run(golden_config(npz), wd)
    return digest(wd)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        out = run_golden(d)
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
