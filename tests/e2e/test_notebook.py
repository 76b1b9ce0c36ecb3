"""The Colab quick-start notebook: stored without outputs, and runs end to end on CPU.

Execution needs ``nbclient``, ``nbformat`` and ``ipykernel`` (the ``test`` extra); the test is
skipped without them. The notebook reads its config, overrides and workdir from
``DP_JAX_NOTEBOOK_*`` variables, which here select the smoke config on a generated dataset.
"""

import json
import os

import pytest

from conftest import ROOT

NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def test_notebook_is_stored_without_outputs():
    with open(NOTEBOOK) as f:
        nb = json.load(f)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code
    for cell in code:
        assert cell.get("outputs", []) == [] and cell.get("execution_count") is None
    source = "".join("".join(c["source"]) for c in code)
    assert "pip" in source and "git+{REPO_URL}" in source
    assert "registry.get(config.task)" in source  # the same entry as the CLI (dp_jax.tasks)


def test_notebook_runs_end_to_end(tmp_path, toy_npz, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    workdir = tmp_path / "wd"
    monkeypatch.setenv("DP_JAX_CONFIG_DIR", os.path.join(ROOT, "configs"))
    monkeypatch.setenv("DP_JAX_NOTEBOOK_CONFIG", "fashion_mnist.py:smoke")
    monkeypatch.setenv("DP_JAX_NOTEBOOK_OVERRIDES", json.dumps({
        "data.name": f"npz:{toy_npz}", "data.train_size": 0, "train.batch_size": 40,
        "train.epochs": 1, "prune.rounds": 1, "prune.method": "imp,random"}))
    monkeypatch.setenv("DP_JAX_NOTEBOOK_WORKDIR", str(workdir))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    assert (workdir / "summary.json").exists()
    assert (workdir / "plots" / "accuracy_vs_sparsity.png").exists()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "imp_k0" in text and "random" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)
