"""The analysis registry: built-ins, refusals, and an extra analysis run end to end.

The extra analysis ("weightnorm": the L2 norm of copy 0's masked weights) is registered from
this module, together with a report section, and run by ``dp_jax.tasks.analyze.run`` on a tiny
finished workdir; its JSON file is checked against a NumPy computation.
"""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dp_jax import masks as masks_lib
from dp_jax.analysis import instability, registry, resume
from dp_jax.data import load_dataset
from dp_jax.pruning import setup as setup_lib
from dp_jax.reports import analysis as report_lib
from dp_jax.tasks import analyze as run_lib
from dp_jax.tasks import prune as experiment
from dp_jax.tasks import settings as settings_lib


def test_builtins_in_order_with_their_copies():
    assert list(registry.ANALYSES)[:3] == ["instability", "hessian", "landscape"]
    assert {n: registry.get(n).copies for n in ("instability", "hessian", "landscape")} == {
        "instability": 2, "hessian": 1, "landscape": 3}
    assert list(report_lib.SECTIONS)[:3] == ["instability", "hessian", "landscape"]
    fields = registry.get("landscape").extra_fields("imp_k0-seed0-round001")
    assert fields == {"directions_file": "landscape_imp_k0-seed0-round001_directions.npz"}
    assert registry.get("hessian").summary({"top_eigenvalues": [2.5, 1.0]}) == "lambda_max 2.5"


def test_refusals():
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.Analysis("hessian", lambda ctx, ss, point: ({}, {})))
    assert registry.get("hessian").run is registry.run_hessian  # the built-in is kept
    for bad in ("weight_norm", "Hessian", "done", ""):  # file names are <name>_<stem>.json
        with pytest.raises(ValueError, match="invalid"):
            registry.register(registry.Analysis(bad, lambda ctx, ss, point: ({}, {})))
        assert bad not in registry.ANALYSES
    with pytest.raises(ValueError, match=re.escape("allowed: instability | hessian | landscape")):
        registry.get("sharpness")
    with pytest.raises(ValueError, match="--analyses: unknown"):
        run_lib.select(["sharpness"])
    with pytest.raises(ValueError, match="already has a report section"):
        report_lib.register("hessian", report_lib.SECTIONS["hessian"])
    with pytest.raises(ValueError, match="unknown"):
        report_lib.register("sharpness", report_lib.SECTIONS["hessian"])


def test_select_keeps_registry_order():
    assert [a.name for a in run_lib.select(["landscape", "instability"])] == [
        "instability", "landscape"]
    assert [a.name for a in run_lib.select(None)] == list(registry.ANALYSES)


def _weight_norm(ctx, ss, point):
    """L2 norm of copy 0's masked weights (every parameter)."""
    params = masks_lib.apply(point.copies[0]["params"], point.mask)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params)))
    return {"l2": float(norm), "copy0": point.train_info["copy0"]}, {}


@pytest.fixture
def workdir(tiny_config, tmp_path):
    c = tiny_config
    c.prune.rounds = 1
    c.prune.method = "imp"
    wd = str(tmp_path / "wd")
    experiment.run(c, wd)
    return wd


def _numpy_norm(workdir: str, rnd: int) -> float:
    """The same norm from the round's kept checkpoint and mask file, in NumPy."""
    mask = dict(np.load(os.path.join(workdir, "runs", "imp_k0-seed0", "masks",
                                     f"round_{rnd:03d}.npz")))
    cfg, _ = settings_lib.from_workdir(workdir)
    setup = setup_lib.build_setup(cfg, load_dataset(cfg.data, seed=cfg.seed))
    like = setup.init_fn(jax.random.key(0))
    trained = resume.kept_trained(workdir, "imp_k0", 0, rnd,
                                  {"params": like["params"], "batch_stats": {}})
    flat = {masks_lib.path_str(p): np.asarray(v, np.float64)
            for p, v in jax.tree_util.tree_flatten_with_path(trained["params"])[0]}
    assert set(flat) == set(mask)
    return float(np.sqrt(sum(np.sum((flat[k] * mask[k]) ** 2) for k in flat)))


def test_an_extra_analysis_runs_from_the_registry(workdir, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("copy 0 is kept, so a one-copy analysis trains nothing")
    monkeypatch.setattr(instability, "spawn_copies", no_training)
    extra = registry.Analysis("weightnorm", _weight_norm, copies=1,
                              summary=lambda r: f"weight norm {r['l2']:.3f}",
                              extra_fields=lambda stem: {"stem": stem})
    section = report_lib.Section(
        "weightnorm_*.json", lambda workdir, rows, pdir: None,
        lambda workdir, rows: ["### Weight norms", ""] + [
            f"- {r['run']} round {r['round']}: {r['l2']:.4f}" for r in rows])
    logs = []
    try:
        registry.register(extra)
        report_lib.register("weightnorm", section)
        with pytest.raises(ValueError, match="already registered"):
            registry.register(extra)
        out = run_lib.run(workdir, analyses=["weightnorm"], log=logs.append)
    finally:
        registry.ANALYSES.pop("weightnorm", None)
        report_lib.SECTIONS.pop("weightnorm", None)
    assert "weightnorm" not in registry.ANALYSES
    adir = os.path.join(workdir, "analysis")
    for rnd in (0, 1):
        stem = f"imp_k0-seed0-round{rnd:03d}"
        with open(os.path.join(adir, f"weightnorm_{stem}.json")) as f:
            got = json.load(f)
        assert got["l2"] == pytest.approx(_numpy_norm(workdir, rnd), rel=1e-5)
        assert got["copy0"] == "kept checkpoint"
        assert (got["run"], got["seed"], got["round"], got["stem"]) == ("imp_k0", 0, rnd, stem)
        assert (got["sparsity"] == 0.0) == (rnd == 0)
        assert out["results"][stem]["weightnorm"] == got
        with open(os.path.join(adir, f"done_{stem}.json")) as f:
            assert json.load(f)["results"] == {"weightnorm": f"weightnorm_{stem}.json"}
    assert out["rewind_curves"] == {}  # no selected analysis draws one
    assert any(m.startswith("imp_k0-seed0-round001: weight norm ") for m in logs), logs
    with open(os.path.join(workdir, "report.md")) as f:
        report = f.read()
    assert "### Weight norms" in report and "- imp_k0 round 1: " in report
    assert not os.path.exists(os.path.join(adir, "instability_dense_k_seed0.json"))
