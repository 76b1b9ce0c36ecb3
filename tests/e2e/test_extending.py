"""The worked examples of docs/extending.md: a model, a dataset source, a distiller and a task
added from this module (nothing in dp_jax/), each run end to end through the experiment."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from dp_jax import data, models, methods
from dp_jax.distill import common, registry as distill_registry
from dp_jax.storage import fileio
from dp_jax.tasks import prune as experiment
from dp_jax.tasks import registry as task_registry


class TinyMLP(nn.Module):
    num_classes: int
    hidden: int = 32

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Dense(self.hidden)(x.reshape((x.shape[0], -1))))
        return nn.Dense(self.num_classes, name="head")(x)


def load_bands(arg, spec):
    """4 classes of 6x6 images, a bright row band per class (seeded by ``arg``)."""
    rng = np.random.default_rng(int(arg))

    def split(n):
        y = np.arange(n) % 4
        x = rng.uniform(0, 0.3, (n, 6, 6, 1))
        for i, c in enumerate(y):
            x[i, c, :, 0] += 0.6
        return x.astype(np.float32), y
    (xt, yt), (xs, ys) = split(80), split(40)
    return data.RawData(f"bands:{arg}", xt, yt, xs, ys, num_classes=4)


def build_class_means(config, dataset, *, trajectories=None, mask=None):
    images, labels = common.initial_images(config, dataset)
    means = jnp.stack([dataset.x_train[dataset.y_train == c].mean(0)
                       for c in range(dataset.num_classes)])[labels]

    def step(state, it):  # each stored image moves halfway to its class mean
        x = state["images"] + 0.5 * (means - state["images"])
        return {"images": x}, jnp.mean((x - means) ** 2), {}

    return common.DistillProgram(name="class_means", state={"images": images}, step=step,
                         lr=lambda s: float(config.distill.lr_init), labels=labels, factor=1,
                         examples=0, hint="distill.iterations")


@pytest.fixture
def extended():
    """Registers the examples for one test and removes them after it."""
    models.register("tiny_mlp", TinyMLP, fields={"hidden": int})
    data.register(data.Source("bands", load_bands, form="bands:<seed>", takes_arg=True))
    distill_registry.register(distill_registry.Distiller(
        "class_means", "Class means", build_class_means, describe=lambda d: "class means"))
    try:
        yield
    finally:
        models.MODELS.pop("tiny_mlp")
        models.MODEL_FIELDS.pop("tiny_mlp")
        data.SOURCES.pop("bands")
        distill_registry.DISTILLERS.pop("class_means")


def _config(tiny_config):
    c = tiny_config
    c.data.name = "bands:3"
    c.data.preprocess = "none"
    c.model.name = "tiny_mlp"
    c.model.hidden = 16
    c.train.epochs = 20
    c.train.batch_size = 20
    c.distill.method = "class_means"
    c.distill.ipc = 2
    c.distill.batch_syn = 0
    c.distill.iterations = 3
    c.distill.checkpoint_every = 3
    c.distill.eval_random = False
    c.distill.eval_full_epochs = 0
    c.dp.steps = 5
    c.dp.batch_size = 8
    c.dp.augment = "none"
    c.prune.method = "imp,dp"
    c.metrics.tensorboard = False
    return c


def test_registered_model_source_and_distiller_run_end_to_end(extended, tiny_config, tmp_path):
    wd = str(tmp_path / "wd")
    summary = experiment.run(_config(tiny_config), wd)
    assert set(summary["methods"]) == {"imp_k0", "dp"}
    rows = fileio.read_jsonl(f"{wd}/rounds.jsonl")
    # The registered model was built: 36 inputs -> 16 hidden -> 4 classes.
    assert {r["prunable_weights"] for r in rows} == {36 * 16 + 16 * 4}
    # The bands are learnable: the dense network beats chance (25 %) clearly.
    assert max(r["test_accuracy"] for r in rows if r["round"] == 0) > 0.6
    # The distiller made the set DP trained on: 2 images per class, each halfway to the class
    # mean after every one of its 3 iterations.
    ds = data.load_dataset(data.DataSpec.from_config(name="bands:3", preprocess="none"), seed=0)
    from dp_jax.distill import load_distilled
    dset = load_distilled(f"{wd}/distilled.npz")
    assert dset.images.shape == (8, 6, 6, 1)
    means = np.stack([ds.x_train[ds.y_train == c].mean(0) for c in range(4)])[dset.labels]
    # x3 = mean + (x0 - mean) / 8, and x0 is a real training image of the same class.
    x0 = means + 8 * (dset.images - means)
    for img, label in zip(x0, dset.labels):
        same_class = ds.x_train[ds.y_train == label]
        assert np.abs(same_class - img).max(axis=(1, 2, 3)).min() < 1e-4


def test_registries_refuse_taken_names(extended):
    with pytest.raises(ValueError, match="already registered"):
        models.register("convnet", TinyMLP)
    with pytest.raises(ValueError, match="already registered"):
        data.register(data.Source("npz", load_bands, takes_arg=True))
    with pytest.raises(ValueError, match="already registered"):
        distill_registry.register(distill_registry.Distiller("mtt", "x", build_class_means,
                                                             describe=str))
    with pytest.raises(ValueError, match="already registered"):
        methods.register(type("Imp2", (methods.Method,), {"name": "imp"})())
    with pytest.raises(ValueError, match="already registered"):
        task_registry.register("prune", lambda config, workdir, **kw: {})


def test_a_registered_task_is_dispatched_by_name(tmp_path):
    calls = []
    task_registry.register("count_params", lambda config, workdir, **kw: calls.append(workdir)
                           or {"methods": {}})
    try:
        assert task_registry.get("count_params")(None, str(tmp_path)) == {"methods": {}}
        assert calls == [str(tmp_path)]
        with pytest.raises(ValueError, match="allowed: prune, distill, count_params"):
            task_registry.get("nope")
    finally:
        task_registry.TASKS.pop("count_params")
