"""The notebooks: stored without outputs, and each runs end to end on CPU with tiny settings.

Execution needs ``nbclient``, ``nbformat`` and ``ipykernel`` (the ``test`` extra); those tests
are skipped without them. The notebooks read their config, overrides, workdir and size from
``DP_JAX_NOTEBOOK_*`` variables, which here select tiny runs on generated data (the toy npz
dataset, or the data your_model.ipynb generates itself); nothing is downloaded.
"""

import json
import os

import pytest

from conftest import ROOT

NOTEBOOKS = ("quickstart", "your_model", "analysis")


def _path(name):
    return os.path.join(ROOT, "notebooks", f"{name}.ipynb")


def _tiny_overrides(toy_npz, **more):
    return json.dumps({"data.name": f"npz:{toy_npz}", "data.train_size": 0,
                       "train.batch_size": 40, "train.epochs": 1, "metrics.tensorboard": False,
                       **more})


def _execute(name, tmp_path, monkeypatch, env):
    """Run notebook ``name`` in a fresh kernel (cwd ``tmp_path``) with ``env`` set; returns the
    outputs of its code cells."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # The kernel shares the tests' persistent compilation cache (dp_jax/system/compile_cache.py).
    from dp_jax.system import compile_cache
    cache = compile_cache.cache_dir()
    if cache:
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", cache)
        monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
        monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
        monkeypatch.setenv("JAX_COMPILATION_CACHE_MAX_SIZE", str(compile_cache.MAX_SIZE))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(_path(name), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _markdown(outputs):
    return "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)


def _images(outputs):
    return sum("image/png" in o.get("data", {}) for o in outputs)


def _rounds(workdir):
    with open(workdir / "rounds.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
    with open(_path(name)) as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code
    for cell in code:
        assert cell["outputs"] == [] and cell["execution_count"] is None
    first = "".join(nb["cells"][0]["source"])
    assert nb["cells"][0]["cell_type"] == "code" and "pip" in first  # the install cell
    source = "".join("".join(c["source"]) for c in code)
    assert "registry.get" not in source and "settings.parse" not in source  # the API only
    assert "dp_jax.run(" in source or "dp_jax.load_results(" in source
    text = "".join("".join(c["source"]) for c in nb["cells"])
    for stale in ("REPO_URL", "YOUR_ORG", "not in the installed package", "when this version"):
        assert stale not in text


def test_quickstart_runs_end_to_end(tmp_path, toy_npz, monkeypatch):
    workdir = tmp_path / "wd"
    outputs = _execute("quickstart", tmp_path, monkeypatch, {
        "DP_JAX_NOTEBOOK_CONFIG": "fashion_mnist:smoke",
        "DP_JAX_NOTEBOOK_OVERRIDES": _tiny_overrides(toy_npz, **{
            "prune.rounds": 1, "prune.method": "imp,random"}),
        "DP_JAX_NOTEBOOK_WORKDIR": str(workdir)})
    rows = _rounds(workdir)
    assert {(r["method"], r["round"]) for r in rows} == {
        (m, r) for m in ("imp_k0", "random") for r in (0, 1)}
    table = _markdown(outputs)
    assert "| round | sparsity |" in table and "IMP (k=0)" in table
    summary = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert summary and "final_test_accuracy_mean" in summary[0]  # summary() as a DataFrame
    assert _images(outputs) == 1


@pytest.mark.slow  # the default run covers this path with a smaller test
def test_your_model_runs_end_to_end(tmp_path, monkeypatch):
    workdir = tmp_path / "wd"
    outputs = _execute("your_model", tmp_path, monkeypatch, {
        "DP_JAX_NOTEBOOK_TINY": "1", "DP_JAX_NOTEBOOK_WORKDIR": str(workdir)})
    rows = _rounds(workdir)
    assert {r["method"] for r in rows} == {"imp_k0", "dp", "snip", "random"}
    # The notebook's own model (144 -> 64 -> 64 -> 4) on its own 12x12 images.
    assert {r["prunable_weights"] for r in rows} == {144 * 64 + 64 * 64 + 64 * 4}
    with open(workdir / "config.json") as f:
        assert json.load(f)["data"]["name"] == "stripes:200"
    table = _markdown(outputs)
    assert "| round | sparsity |" in table and "Distilled Pruning" in table
    assert _images(outputs) == 3  # sample images, accuracy vs sparsity, accuracy vs examples


@pytest.mark.slow  # the default run covers this path with a smaller test
def test_analysis_runs_its_own_experiment_then_analyses_it(tmp_path, toy_npz, monkeypatch):
    workdir = tmp_path / "wd"  # absent: the notebook runs an experiment into it first
    outputs = _execute("analysis", tmp_path, monkeypatch, {
        "DP_JAX_NOTEBOOK_CONFIG": "fashion_mnist:smoke",
        "DP_JAX_NOTEBOOK_OVERRIDES": _tiny_overrides(toy_npz, **{
            "prune.rounds": 2, "prune.method": "imp,random"}),
        "DP_JAX_NOTEBOOK_WORKDIR": str(workdir)})
    assert {r["method"] for r in _rounds(workdir)} == {"imp_k0", "random"}
    analysis = sorted(os.listdir(workdir / "analysis"))
    for kind in ("instability", "hessian"):
        for run in ("imp_k0", "random"):
            for rnd in (0, 1, 2):
                assert f"{kind}_{run}-seed0-round{rnd:03d}.json" in analysis, analysis
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "error barrier (pp)" in html and "top eigenvalue" in html
    assert "head/kernel" in html  # the per-layer sparsity of the last round's masks
    assert _images(outputs) == 2  # instability + Hessian, mask overlap
