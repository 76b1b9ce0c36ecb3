"""dp_jax from Python with your own model and data: a Flax model and a dataset defined here
(nothing in dp_jax/), registered, and run through ``dp_jax.run`` and through the command line
(``model.plugins``/``data.plugins`` name this module); bad input refused before any work."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import numpy as np
import pytest

import dp_jax
from dp_jax import data, models

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


class ApiMLP(nn.Module):
    num_classes: int
    hidden: int = 24

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Dense(self.hidden)(x.reshape((x.shape[0], -1))))
        return nn.Dense(self.num_classes, name="head")(x)


def bands(seed, n_train=120, n_test=60):
    """4 classes of 6x6 images with a bright row per class: (x_train, y_train, x_test, y_test)."""
    rng = np.random.default_rng(seed)

    def split(n):
        y = np.arange(n) % 4
        x = rng.integers(0, 80, (n, 6, 6, 1)).astype(np.uint8)
        x[np.arange(n), y, :, 0] += 170
        return x, y
    return (*split(n_train), *split(n_test))


def load_bands(arg, spec):
    x_train, y_train, x_test, y_test = bands(int(arg))
    return data.RawData(f"api_bands:{arg}", x_train, y_train, x_test, y_test, num_classes=4)


# Registered when this module is imported: by pytest, or by the command line as a plugin.
if "api_mlp" not in models.MODELS:
    models.register("api_mlp", ApiMLP, fields={"hidden": int})
    data.register(data.Source("api_bands", load_bands, form="api_bands:<seed>", takes_arg=True))

OVERRIDES = {
    "model.name": "api_mlp", "data.name": "api_bands:1", "data.train_size": 0,
    "train.epochs": 12, "train.batch_size": 20, "prune.rounds": 2, "prune.fraction": 0.5,
    "prune.method": "imp,dp,snip,subset:n=8", "distill.ipc": 2, "distill.batch_syn": 0,
    "distill.num_experts": 1, "distill.expert_train_epochs": 3, "distill.max_start_epoch": 1,
    "distill.expert_epochs": 1, "distill.syn_steps": 4, "distill.iterations": 4,
    "distill.eval_random": False, "distill.eval_full_epochs": 0, "distill.eval_models": 1,
    "distill.eval_epochs": 5, "distill.expert_batch_size": 20, "dp.steps": 10,
    "dp.batch_size": 8, "metrics.tensorboard": False}


def _check(results, labels):
    assert set(results.summary()) == labels
    rows = results.records
    # The registered model was built: 36 inputs -> 24 hidden -> 4 classes.
    assert {r["prunable_weights"] for r in rows} == {36 * 24 + 24 * 4}
    assert max(r["test_accuracy"] for r in rows if r["round"] == 0) > 0.6  # learnable bands
    for label in labels:
        final = [r for r in rows if r["method"] == label and r["round"] == 2]
        assert final and abs(final[0]["sparsity"] - 0.75) < 0.01


def test_own_model_and_source_through_the_api_then_the_cli(tmp_path):
    # model.hidden is a field of the registered model only: load_config accepts it.
    config = dp_jax.load_config("fashion_mnist:smoke", {**OVERRIDES, "model.hidden": 24})
    assert config.model.hidden == 24
    results = dp_jax.run(config, str(tmp_path / "api"), progress=False)
    labels = {"imp_k0", "dp", "snip", "subset_n8"}
    _check(results, labels)
    # The same experiment from the command line, the plugins naming this module.
    wd = tmp_path / "cli"
    cmd = [sys.executable, "-m", "dp_jax.main", "--config=fashion_mnist:smoke", f"--workdir={wd}",
           "--config.model.plugins=test_api", "--config.data.plugins=test_api"]
    cmd += [f"--config.{k}={','.join(v) if isinstance(v, tuple) else v}"
            for k, v in OVERRIDES.items()]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([HERE, os.path.join(ROOT, "tests"), ROOT]))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    cli = dp_jax.load_results(str(wd))
    _check(cli, labels)
    # One code path: the same records (timings aside) from both entries.
    strip = lambda r: {k: v for k, v in r.items() if not k.endswith("_s")}  # noqa: E731
    assert sorted(map(json.dumps, map(strip, cli.records))) == \
        sorted(map(json.dumps, map(strip, results.records)))


def test_arrays_from_python_and_their_fingerprint(tmp_path):
    config = dp_jax.load_config("fashion_mnist:smoke", {
        "model.name": "api_mlp", "data.train_size": 0, "train.epochs": 8,
        "train.batch_size": 20,
        "prune.rounds": 1, "prune.method": "imp", "metrics.tensorboard": False})
    arrays = bands(3)
    wd = str(tmp_path / "arrays")
    results = dp_jax.run(config, wd, data=arrays, progress=False)
    assert results.config["data"]["name"].startswith("arrays:")
    assert results.summary()["imp_k0"]["dense_test_accuracy_mean"] > 0.6
    # The same arrays resume (nothing to do); other arrays are refused as changed settings.
    dp_jax.run(config, wd, data=arrays, progress=False)
    other = list(arrays)
    other[0] = other[0].copy()
    other[0][0, 0, 0, 0] ^= 1
    with pytest.raises(ValueError, match="data.name: 'arrays:"):
        dp_jax.run(config, wd, data=other, progress=False)


@pytest.mark.parametrize("mutate, match", [
    (lambda a: (a[0][:-1], a[1], a[2], a[3]), "x_train has 119 images but y_train 120 labels"),
    (lambda a: (a[0][..., 0, 0], a[1], a[2], a[3]), r"x_train has shape \(120, 6\)"),
    (lambda a: (a[0].astype(np.float32) * np.nan, a[1], a[2], a[3]), "NaN"),
    (lambda a: (a[0], a[1] - 1, a[2], a[3]), "negative label"),
    (lambda a: (a[0], a[1], a[2], a[3] + 4), r"labels must lie in \[0, 4\)"),
])
def test_bad_arrays_are_refused_before_any_work(tmp_path, mutate, match):
    config = dp_jax.load_config("fashion_mnist:smoke", {"model.name": "api_mlp"})
    wd = tmp_path / "wd"
    with pytest.raises(ValueError, match=match):
        dp_jax.run(config, str(wd), data=mutate(bands(0)), progress=False)
    assert not wd.exists()


def test_load_config_refuses_unknown_names_fields_and_values():
    with pytest.raises(FileNotFoundError, match="no packaged config named 'nope'"):
        dp_jax.load_config("nope")
    with pytest.raises(ValueError, match="train has no field 'lrr'; valid: batch_size"):
        dp_jax.load_config("fashion_mnist", {"train.lrr": 1})
    with pytest.raises(ValueError, match="config.train.epochs='two' is invalid"):
        dp_jax.load_config("fashion_mnist", {"train.epochs": "two"})
    with pytest.raises(ValueError, match="prune.method: unknown method 'bogus'"):
        dp_jax.load_config("fashion_mnist", {"prune.method": "bogus"})


def test_a_model_that_breaks_the_contract_is_refused_before_work(tmp_path):
    class Flat(nn.Module):  # logits of the wrong shape
        num_classes: int

        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1))).reshape(-1)
    models.register("api_flat", Flat)
    try:
        config = dp_jax.load_config("fashion_mnist:smoke", {
            "model.name": "api_flat", "data.name": "api_bands:0", "data.train_size": 0,
            "prune.method": "imp"})
        with pytest.raises(ValueError, match=r"model Flat .*\(1, 4\)"):
            dp_jax.run(config, str(tmp_path / "wd"), progress=False)
        assert not os.path.exists(tmp_path / "wd" / "runs")
    finally:
        models.MODELS.pop("api_flat")
        models.MODEL_FIELDS.pop("api_flat")


def test_results_objects(tmp_path):
    config = dp_jax.load_config("fashion_mnist:smoke", {
        "model.name": "api_mlp", "data.name": "api_bands:2", "data.train_size": 0,
        "train.epochs": 4,
        "train.batch_size": 20, "prune.rounds": 1, "prune.method": "imp,random",
        "metrics.tensorboard": False})
    r = dp_jax.run(config, str(tmp_path / "wd"), progress=False)
    assert "| round |" in r.table() and "IMP" in r.table()
    assert r.figure_accuracy_vs_sparsity().axes[0].get_legend_handles_labels()[1]
    assert r.figure_training_curves() is not None
    path = str(tmp_path / "fig.png")
    r.figure_accuracy_vs_examples(path)
    assert os.path.getsize(path) > 0
    m = r.mask("imp_k0", 0, 1)
    kept = sum(int(v.sum()) for k, v in dp_jax.masks.to_flat(m).items() if k.endswith("kernel"))
    assert kept == r.records[[x["method"] for x in r.records].index("imp_k0") + 1][
        "remaining_weights"]
    t = r.ticket("imp_k0", 0, 1)
    assert t["record"]["round"] == 1 and set(t["trained"]) == {"params", "batch_stats"}
    with pytest.raises(ValueError, match="no run 'nope' seed 0"):
        r.mask("nope", 0, 1)
    df = r.to_pandas()  # pandas is in the test extra
    assert len(df) == len(r.records) and set(df["method"]) == {"imp_k0", "random"}


def test_to_pandas_without_pandas_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # makes `import pandas` fail
    r = dp_jax.Results(workdirs=("w",), records=[{"method": "imp_k0"}], config={}, seeds={})
    with pytest.raises(ImportError, match=r"pip install pandas \(or dp_jax\[pandas\]\)"):
        r.to_pandas()


def test_every_method_distiller_and_analysis_on_a_registered_model(tmp_path):
    """Every pruning method, the three distillers and the analyses run on ApiMLP and api_bands;
    a model without features is refused by distribution matching before any work."""
    every = ("imp,imp:k=2,dp,dp_imp,subset:n=8,snip,grasp,synflow,mag_init,random,reinit:of=dp")
    over = dict(OVERRIDES, **{"prune.method": every, "dp.switch_sparsity": 0.4,
                              "train.epochs": 6})
    results = dp_jax.run(dp_jax.load_config("fashion_mnist:smoke", over), str(tmp_path / "p"),
                         progress=False)
    assert set(results.summary()) == {"imp_k0", "imp_k2", "dp", "dp_imp_k0", "subset_n8", "snip",
                                      "grasp", "synflow", "mag_init", "random", "reinit_dp"}
    assert all(abs(r["sparsity"] - 0.75) < 0.01 for r in results.records if r["round"] == 2)
    from dp_jax.analysis.settings import Settings
    out = results.analyze(["instability", "hessian", "landscape"], runs=["imp_k0"], rounds=[1],
                          settings=Settings(alphas=3, bn_mode="interpolate", hessian_examples=40,
                                            hessian_batch=40, lanczos_steps=3, trace_probes=2,
                                            slq_probes=1, landscape_grid=3, landscape_points=3,
                                            landscape_examples=40), log=lambda m: None)
    (res,) = out["results"].values()
    assert set(res) == {"instability", "hessian", "landscape"}
    unset = {"model.width": None, "model.depth": None, "model.norm": None, "model.pool": None}
    for method in ("mtt", "gm", "dm"):
        c = dp_jax.load_config("distill_fashion_mnist:smoke", {**unset,
            **{k: v for k, v in over.items() if k.startswith(("model.", "data.", "distill."))},
            "distill.method": method, "distill.gm_outer_loops": 1, "distill.gm_inner_loops": 1,
            "distill.gm_batch_real": 4, "distill.dm_batch_real": 4, "distill.iterations": 2})
        r = dp_jax.run(c, str(tmp_path / method), progress=False)
        assert r.distillation["results"]["distilled"]["accuracy_mean"] >= 0


def test_distribution_matching_needs_a_models_features(tmp_path):
    """DM refuses, before distilling, a model whose classifier is not a `head` layer."""
    class NoHead(nn.Module):
        num_classes: int

        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(self.num_classes, name="out")(x.reshape((x.shape[0], -1)))
    models.register("api_nohead", NoHead)
    try:
        c = dp_jax.load_config("distill_fashion_mnist:smoke", {
            "model.width": None, "model.depth": None, "model.norm": None, "model.pool": None,
            "model.name": "api_nohead", "data.name": "api_bands:0", "data.train_size": 0,
            "distill.method": "dm", "distill.ipc": 2, "distill.batch_syn": 0})
        with pytest.raises(ValueError, match="head"):
            dp_jax.run(c, str(tmp_path / "wd"), progress=False)
        assert not os.path.exists(tmp_path / "wd" / "distilled.npz")
    finally:
        models.MODELS.pop("api_nohead")
        models.MODEL_FIELDS.pop("api_nohead")
