"""Paper-scale configs: every variant validates, recipes match docs/paper.md, smoke variants run end to end.

Smoke runs use ``tfds.testing.mock_data`` (random images with the real datasets' shapes and
label counts), so they exercise the real TFDS loading path offline.
"""

import json
import os

import pytest

from dp_jax.tasks import prune as experiment, settings as validate
from dp_jax.storage import fileio

from conftest import ROOT, load_config_module

# Every config with the variants worth validating; build-dependent ones are handled below.
VARIANTS = {
    "cifar10_resnet18": ["", "width=64", "width=32,seeds=5", "hybrid", "smoke", "smoke,width=64"],
    "cifar_convnet": ["", "ipc=50", "dataset=cifar100", "dataset=cifar100,ipc=50", "smoke",
                      "smoke,dataset=cifar100", "distill"],
    "imagenet_subset": ["", "imagenette", "model=convnet", "smoke", "model=convnet,smoke",
                        "imagenet100", "imagenet100,smoke"],
}
CASES = [(name, v) for name, vs in VARIANTS.items() for v in vs]


def _paper():
    return load_config_module("_paper")


@pytest.mark.parametrize("name,variant", CASES)
def test_variant_validates(name, variant):
    mod = load_config_module(name)
    c = mod.get_config(variant)
    settings = validate.parse(c)
    # A distillation config's task reads no prune section; a pruning config needs methods.
    assert settings.specs or settings.task == "distill", "no pruning method configured"
    # Overrides from the command line need these fields to exist.
    for field in ("image_size", "augment", "pipeline", "classes"):
        assert field in c.data
    assert "multihost" in c.parallel


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_bad_variant_names_field(name):
    mod = load_config_module(name)
    with pytest.raises(ValueError, match="allowed"):
        mod.get_config("no_such_variant")
    with pytest.raises(ValueError, match="allowed"):
        mod.get_config("bogus=1")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_docstring_is_launch_command_with_compute(name):
    doc = load_config_module(name).__doc__
    assert f"python -m dp_jax.main --config=configs/{name}.py" in doc
    assert "A100-hours" in doc and "FLOP" in doc


def test_recipes_follow_paper():
    r18 = load_config_module("cifar10_resnet18")
    conv = load_config_module("cifar_convnet")
    inet = load_config_module("imagenet_subset")
    for c in (r18.get_config(), conv.get_config(), inet.get_config()):
        assert (c.train.optimizer, c.train.momentum, c.train.schedule) == ("sgd", 0.9, "multistep")
        assert tuple(c.train.decay_at) == pytest.approx((2 / 3, 5 / 6))
        assert c.train.decay_factor == 0.2
        assert c.prune.fraction == 0.2 and c.prune.scope == "global"
    c = r18.get_config()
    assert (c.model.name, c.model.width, c.data.name) == ("resnet18", 32, "tfds:cifar10")
    assert (c.train.lr, c.train.weight_decay) == (0.01, 5e-4)
    assert r18.get_config("width=64").model.width == 64
    c = conv.get_config("dataset=cifar100,ipc=50")
    assert (c.model.name, c.model.width, c.model.depth, c.model.norm) == ("convnet", 128, 3, "instance")
    assert (c.data.name, c.data.preprocess) == ("tfds:cifar100", "zca")
    c = inet.get_config()
    assert (c.model.name, c.data.image_size, c.data.name) == ("resnet10", 224, "tfds:imagenette/320px")
    assert (c.train.lr, c.train.weight_decay) == (0.01, 1e-4)
    c = inet.get_config("model=convnet")
    assert (c.model.name, c.model.depth, c.data.image_size) == ("convnet", 5, 128)
    c = inet.get_config("imagenet100")
    assert (c.train.lr, len(c.data.classes), c.data.pipeline) == (0.1, 100, "stream")


def test_paper_configs_run_dp_with_fields_that_exist():
    paper = _paper()
    c = load_config_module("cifar_convnet").get_config()
    assert "dp" in c.prune.method.split(",")
    conv = load_config_module("cifar_convnet")
    # Every MTT field the paper recipe sets names a field of the distill section.
    assert paper.set_existing(c.distill, dict(conv.MTT_COMMON, ipc=10,
                                              **conv.MTT[("cifar10", 10)])) == []


def test_set_existing_skips_missing_fields():
    paper = _paper()
    c = paper.load_base()
    assert paper.set_existing(None, {"a": 1}) == ["a"]
    assert paper.set_existing(c.train, {"epochs": 7.0, "nope": 1}) == ["nope"]
    assert c.train.epochs == 7 and isinstance(c.train.epochs, int)


# (config, variant, keep_dp). Every smoke variant runs in the default suite without Distilled
# Pruning (20-40 s each: compiles dominate); with DP (experts + MTT's second-order compile) they
# take minutes on a shared CPU and are marked slow.
FAST_SMOKE = [("cifar_convnet", "smoke"), ("cifar10_resnet18", "smoke"), ("imagenet_subset", "smoke"),
              ("imagenet_subset", "model=convnet,smoke"),
              ("imagenet_subset", "imagenet100,model=convnet,smoke")]
# The in-memory ImageNet ConvNet adds no code path the other two ImageNet variants lack.
_SLOW_WITHOUT_DP = {("imagenet_subset", "model=convnet,smoke")}
SMOKE = [pytest.param(name, variant, False,
                      marks=[pytest.mark.slow] if (name, variant) in _SLOW_WITHOUT_DP else [])
         for name, variant in FAST_SMOKE] + [
    pytest.param(name, variant, True, marks=pytest.mark.slow) for name, variant in FAST_SMOKE
]


@pytest.mark.parametrize("name,variant,keep_dp", SMOKE)
def test_smoke_runs_end_to_end(name, variant, keep_dp, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    mod = load_config_module(name)
    c = mod.get_config(variant)
    if not keep_dp:
        c.prune.method = ",".join(m for m in c.prune.method.split(",")
                                  if m.split(":")[0] not in ("dp", "dp_imp"))
    c.data.label_cache = str(tmp_path / "labels")  # the stream's class index cache
    wd = str(tmp_path / "wd")
    with tfds.testing.mock_data(num_examples=64):
        summary = experiment.run(c, wd)
    rows = fileio.read_jsonl(os.path.join(wd, "rounds.jsonl"))
    labels = {s.label for s in validate.parse(c).specs}
    assert {r["method"] for r in rows} == labels
    assert {r["round"] for r in rows} == {0, 1}
    assert all(0 <= r["test_accuracy"] <= 1 for r in rows)
    assert set(summary["methods"]) == labels
    cfg = json.load(open(os.path.join(wd, "config.json")))
    assert cfg["data"]["image_size"] == c.data.image_size


@pytest.mark.parametrize("variant", ["", "probe", "lr04", "smoke", "smoke,lr04"])
def test_stability_config_validates(variant):
    c = load_config_module("stability_fashion_mnist").get_config(variant)
    labels = {s.label for s in validate.parse(c).specs}
    assert labels == ({"imp_k0"} if "probe" in variant else {"imp_k0", "random", "dp"})
    with pytest.raises(ValueError, match="allowed"):
        load_config_module("stability_fashion_mnist").get_config("bogus")


_STUDY = {"imp_k0", "imp_k100", "dp", "dp_imp_k0", "subset_n100", "snip_oneshot",
          "grasp_oneshot", "synflow", "random"}
_CONTROLS = {"imp_k100", "lrr", "dp", "snip_oneshot", "grasp_oneshot", "random_erk", "force",
             "shuffle_dp", "shuffle_imp_k100", "shuffle_snip_oneshot", "invert_grasp_oneshot",
             "subset_n100", "subset_n100_herding", "subset_n100_el2n_easy",
             "subset_n100_el2n_hard"}


@pytest.mark.parametrize("variant,labels,epochs", [
    ("", {"imp_k0", "imp_k39"}, 15), ("lr02", {"imp_k0", "imp_k39"}, 15),
    ("resnet", {"imp_k0", "imp_k39"}, 15), ("wide", {"imp_k0", "imp_k39"}, 15),
    ("full", {"imp_k0", "imp_k100"}, 5), ("full,study", _STUDY, 5),
    ("full,study,controls", _CONTROLS, 5), ("smoke", {"imp_k0", "imp_k5"}, 2)])
def test_rewind_config_validates(variant, labels, epochs):
    c = load_config_module("rewind_fashion_mnist").get_config(variant)
    assert {s.label for s in validate.parse(c).specs} == labels
    assert c.train.epochs == epochs
    assert c.data.train_size == (0 if "full" in variant else 500 if variant == "smoke" else 5000)
    assert c.prune.evaluate == ("5,6" if "controls" in variant else "")
    with pytest.raises(ValueError, match="allowed: lr02"):
        load_config_module("rewind_fashion_mnist").get_config("bogus")


def test_converged_lenet_variant_is_the_study_contrast():
    """fashion_mnist:converged: 10-epoch trainings, 7 rounds of 36 % to the default's 95.6 %."""
    c = load_config_module("fashion_mnist").get_config("converged")
    assert {s.label for s in validate.parse(c).specs} == (_STUDY - {"imp_k100"}) | {"imp_k200"}
    assert c.train.epochs == 10
    assert abs(1 - (1 - c.prune.fraction) ** c.prune.rounds - 0.956) < 1e-3


def test_rewind_smoke_runs_both_rewind_points(tmp_path):
    """The probe's two IMP variants share one dense run; k = 5 starts from its step-5 weights."""
    c = load_config_module("rewind_fashion_mnist").get_config("smoke")  # real Fashion-MNIST
    wd = str(tmp_path / "wd")
    experiment.run(c, wd)
    rows = fileio.read_jsonl(os.path.join(wd, "rounds.jsonl"))
    by = {(r["method"], r["round"]): r for r in rows}
    assert {m for m, _ in by} == {"imp_k0", "imp_k5"}
    assert by[("imp_k0", 0)]["test_accuracy"] == by[("imp_k5", 0)]["test_accuracy"]
    assert by[("imp_k5", 1)]["rewind_step"] == 5 and by[("imp_k0", 1)]["rewind_step"] == 0
    assert abs(by[("imp_k5", 2)]["sparsity"] - 0.75) < 0.01


@pytest.mark.slow  # the default run covers this path with a smaller test
def test_paper_variant_runs_an_imported_idc_set_end_to_end(tmp_path):
    """cifar10_resnet18:paper -- an IDC-format set imported and pruned with, under mock_data."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from dp_jax.cli import distill_tools
    from dp_jax.distill import load_distilled
    fixture = os.path.join(ROOT, "tests", "fixtures", "distilled",
                           "idc_cifar10_smoke.pt")
    out = str(tmp_path / "idc.npz")
    mod = load_config_module("cifar10_resnet18")
    with tfds.testing.mock_data(num_examples=64):
        assert distill_tools.convert_main(["--format=idc", f"--data={fixture}", "--factor=2", "--lr=0.01",
                             "--config=configs/cifar10_resnet18.py:smoke", f"--out={out}"]) == 0
        c = mod.get_config(f"paper,smoke,set={out}")
        wd = str(tmp_path / "wd")
        experiment.run(c, wd)
    dset = load_distilled(out)
    assert dset.images.shape == (40, 8, 8, 3) and dset.factor == 2
    rows = fileio.read_jsonl(os.path.join(wd, "rounds.jsonl"))
    assert {r["method"] for r in rows} == {"dp", "subset"}
    dp1 = [r for r in rows if r["method"] == "dp" and r["round"] == 1][0]
    # 2 epochs over the 40 decoded images at batch 16 (2 batches per epoch).
    assert dp1["train_examples"] == 2 * 2 * 16 * c.dp.inner_seeds
    full = mod.get_config("paper,set=x.npz")
    assert (full.dp.epochs, full.dp.batch_size, full.dp.lr, full.dp.cutmix_prob) == \
        (300, 64, 0.01, 0.5)
    assert tuple(full.dp.decay_at) == (2 / 3, 5 / 6) and full.dp.decay_factor == 0.2
    with pytest.raises(ValueError, match="needs set=PATH"):
        mod.get_config("paper")
