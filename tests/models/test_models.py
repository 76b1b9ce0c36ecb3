"""Tests for dp_jax.models: golden parameter counts, shapes, BatchNorm state, config errors, pruning masks.

Large models are only traced (``jax.eval_shape``); real forward passes use narrow variants so the
file runs in well under a minute on a 2-core CPU.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dp_jax import models
from dp_jax.models import count_params, create_model, init_variables, is_prunable
from dp_jax.models.layers import norm_layer, num_groups_for

IMAGE_SHAPES = [(28, 28, 1), (32, 32, 3)]

# id -> (config, uses BatchNorm, number of prunable leaves)
CASES = {
    "lenet_300_100": ({"name": "lenet_300_100"}, False, 3),
    "convnet": ({"name": "convnet"}, False, 4),
    "convnet_batch_max": ({"name": "convnet", "norm": "batch", "pool": "max"}, True, 4),
    "convnet_nonorm": ({"name": "convnet", "norm": "none"}, False, 4),
    "resnet18": ({"name": "resnet18"}, True, 21),
    "resnet18_idc": ({"name": "resnet18", "width": 32}, True, 21),
    "resnet18_group": ({"name": "resnet18", "norm": "group"}, False, 21),
    "resnet18_instance": ({"name": "resnet18", "norm": "instance"}, False, 21),
    "resnet10": ({"name": "resnet10"}, True, 13),
    "alexnet": ({"name": "alexnet"}, False, 6),
}

# Narrow versions for real forward passes (same structure, cheap to compile and run).
SMALL_CASES = {
    "lenet_300_100": ({"name": "lenet_300_100"}, False),
    "convnet": ({"name": "convnet", "width": 8}, False),
    "convnet_batch": ({"name": "convnet", "width": 8, "norm": "batch"}, True),
    "resnet18": ({"name": "resnet18", "width": 4}, True),
    "resnet10": ({"name": "resnet10", "width": 4}, True),
    "alexnet": ({"name": "alexnet"}, False),
}
SMALL_IMAGE = (16, 16, 3)

# One tiny model whose real initialisation is shared by the init tests: on XLA:CPU every distinct
# PRNG draw shape costs a separate compilation, so real inits are kept to one (cached) program.
TINY_CFG = {"name": "convnet", "width": 64, "depth": 1, "norm": "batch"}
TINY_IMAGE = (8, 8, 3)


def _cfg(d: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(d)


def _shapes(model, image_shape):
    """Variable shapes via abstract evaluation (no parameters are materialised)."""
    x = jnp.zeros((1, *image_shape), jnp.float32)
    return jax.eval_shape(lambda k: model.init(k, x, train=False), jax.random.key(0))


def _numpy_variables(model, image_shape, seed=0):
    """Variables of the right structure drawn with NumPy (He-scaled kernels, unit scales/vars).

    Avoids compiling JAX PRNG code for every layer shape; real initialisation is tested separately.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = math.prod(leaf.shape[:-1])
            return jnp.asarray(rng.normal(size=leaf.shape) * math.sqrt(2.0 / fan_in), jnp.float32)
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, jnp.float32)
        return jnp.asarray(rng.normal(size=leaf.shape) * 0.1, jnp.float32)

    variables = jax.tree_util.tree_map_with_path(fill, _shapes(model, image_shape))
    if "batch_stats" in variables:  # fresh running stats, as after init
        variables["batch_stats"] = jax.tree_util.tree_map_with_path(
            lambda p, l: jnp.ones_like(l) if p[-1].key == "var" else jnp.zeros_like(l),
            variables["batch_stats"],
        )
    return variables


def _images(shape, seed):
    # NumPy draws: a JAX PRNG draw would compile a program per shape.
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _conv(k, cin, cout, bias=True):
    return k * k * cin * cout + (cout if bias else 0)


def _dense(nin, nout):
    return nin * nout + nout


# ---------------------------------------------------------------- golden parameter counts


def _resnet_count(stem_k, base, blocks, cin, num_classes):
    """BasicBlock ResNet from layer shapes: bias-free convs, 2 affine params per norm channel."""
    n = _conv(stem_k, cin, base, bias=False) + 2 * base
    c = base
    for s, nb in enumerate(blocks):
        w = base * 2**s
        for b in range(nb):
            n += _conv(3, c, w, bias=False) + 2 * w + _conv(3, w, w, bias=False) + 2 * w
            if c != w or (s > 0 and b == 0):
                n += _conv(1, c, w, bias=False) + 2 * w
            c = w
    return n + _dense(c, num_classes)


GOLDEN = [
    ("lenet_300_100", {}, (28, 28, 1), 10, 266_610),
    ("lenet_300_100", {}, (28, 28, 1), 10, _dense(784, 300) + _dense(300, 100) + _dense(100, 10)),
    # MTT ConvNet-3, width 128, instancenorm, CIFAR-10.
    ("convnet", {}, (32, 32, 3), 10, 320_010),
    (
        "convnet",
        {},
        (32, 32, 3),
        10,
        _conv(3, 3, 128) + 2 * _conv(3, 128, 128) + 3 * 2 * 128 + _dense(4 * 4 * 128, 10),
    ),
    # Grayscale: the first conv is padded so 28x28 ends at the same 4x4 grid.
    ("convnet", {}, (28, 28, 1), 10, _conv(3, 1, 128) + 2 * _conv(3, 128, 128) + 768 + _dense(2048, 10)),
    ("convnet", {"norm": "none"}, (32, 32, 3), 10, 320_010 - 768),
    ("convnet", {"norm": "batch"}, (32, 32, 3), 10, 320_010),
    # Depth 4 on 64 px (Tiny ImageNet setting of MTT).
    ("convnet", {"depth": 4}, (64, 64, 3), 200, _conv(3, 3, 128) + 3 * _conv(3, 128, 128) + 4 * 256 + _dense(2048, 200)),
    # The well-known CIFAR ResNet-18 figure.
    ("resnet18", {}, (32, 32, 3), 10, 11_173_962),
    ("resnet18", {}, (32, 32, 3), 10, _resnet_count(3, 64, (2, 2, 2, 2), 3, 10)),
    ("resnet18", {"width": 32}, (32, 32, 3), 10, _resnet_count(3, 32, (2, 2, 2, 2), 3, 10)),
    ("resnet18", {"width_multiplier": 0.5}, (32, 32, 3), 10, _resnet_count(3, 32, (2, 2, 2, 2), 3, 10)),
    ("resnet18", {"norm": "group"}, (32, 32, 3), 100, _resnet_count(3, 64, (2, 2, 2, 2), 3, 100)),
    ("resnet18", {"num_blocks": (1, 1, 1, 1)}, (32, 32, 3), 10, _resnet_count(3, 64, (1, 1, 1, 1), 3, 10)),
    ("resnet10", {}, (224, 224, 3), 1000, _resnet_count(7, 64, (1, 1, 1, 1), 3, 1000)),
    ("resnet10", {}, (224, 224, 3), 1000, 5_418_792),
    ("resnet10", {}, (32, 32, 3), 10, _resnet_count(7, 64, (1, 1, 1, 1), 3, 10)),
    (
        "alexnet",
        {},
        (32, 32, 3),
        10,
        _conv(5, 3, 128)
        + _conv(5, 128, 192)
        + _conv(3, 192, 256)
        + _conv(3, 256, 192)
        + _conv(3, 192, 192)
        + _dense(4 * 4 * 192, 10),
    ),
    ("alexnet", {}, (32, 32, 3), 10, 1_872_202),
    ("alexnet", {}, (28, 28, 1), 10, 1_872_202 - _conv(5, 3, 128) + _conv(5, 1, 128)),
]


@pytest.mark.parametrize("name,fields,image_shape,num_classes,expected", GOLDEN)
def test_golden_param_counts(name, fields, image_shape, num_classes, expected):
    model = create_model(_cfg({"name": name, **fields}), num_classes=num_classes)
    assert count_params(_shapes(model, image_shape)["params"]) == expected


def test_hand_counts_match_the_well_known_figures():
    assert _resnet_count(3, 64, (2, 2, 2, 2), 3, 10) == 11_173_962
    assert _conv(3, 3, 128) + 2 * _conv(3, 128, 128) + 768 + _dense(2048, 10) == 320_010


# ---------------------------------------------------------------- shapes and collections


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("image_shape", IMAGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_output_shapes_and_collections(case, image_shape):
    cfg, uses_bn, _ = CASES[case]
    model = create_model(_cfg(cfg), num_classes=7)
    variables = _shapes(model, image_shape)
    assert set(variables) == ({"params", "batch_stats"} if uses_bn else {"params"})
    x = jnp.zeros((3, *image_shape), jnp.float32)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert out.shape == (3, 7) and out.dtype == jnp.float32
    if uses_bn:
        out, state = jax.eval_shape(
            lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x
        )
        assert out.shape == (3, 7)
        assert jax.tree_util.tree_structure(state["batch_stats"]) == jax.tree_util.tree_structure(
            variables["batch_stats"]
        )
    else:
        out = jax.eval_shape(lambda v, x: model.apply(v, x, train=True), variables, x)
        assert out.shape == (3, 7)


def test_resnet10_imagenet_resolution():
    model = create_model(_cfg({"name": "resnet10"}), num_classes=100)
    variables = _shapes(model, (224, 224, 3))
    x = jnp.zeros((2, 224, 224, 3), jnp.float32)
    assert jax.eval_shape(lambda v, x: model.apply(v, x), variables, x).shape == (2, 100)


def test_convnet_depth_and_resolution():
    model = create_model(_cfg({"name": "convnet", "depth": 4}), num_classes=10)
    assert _shapes(model, (64, 64, 3))["params"]["head"]["kernel"].shape == (4 * 4 * 128, 10)
    too_deep = create_model(_cfg({"name": "convnet", "depth": 6}), num_classes=10)
    with pytest.raises(ValueError, match="too small"):
        _shapes(too_deep, (32, 32, 3))


def test_grayscale_padding_matches_reference_grid():
    for name, fan_in in [("convnet", 4 * 4 * 128), ("alexnet", 4 * 4 * 192)]:
        model = create_model(_cfg({"name": name}), num_classes=10)
        assert _shapes(model, (28, 28, 1))["params"]["head"]["kernel"].shape == (fan_in, 10)


def test_leaf_names_and_layouts():
    params = _shapes(create_model(_cfg({"name": "convnet"}), num_classes=10), (32, 32, 3))["params"]
    assert params["conv_0"]["kernel"].shape == (3, 3, 3, 128)  # HWIO
    assert params["head"]["kernel"].shape == (2048, 10)  # (in, out)
    assert set(params["norm_0"]) == {"scale", "bias"}
    r18 = _shapes(create_model(_cfg({"name": "resnet18"}), num_classes=10), (32, 32, 3))
    assert "bias" not in r18["params"]["stem_conv"]  # convs before a norm carry no bias
    assert set(r18["batch_stats"]["stem_norm"]) == {"mean", "var"}


# ---------------------------------------------------------------- real forward passes


@pytest.mark.parametrize("case", sorted(SMALL_CASES))
def test_forward_eval_deterministic_and_batch_stats(case):
    cfg, uses_bn = SMALL_CASES[case]
    model = create_model(_cfg(cfg), num_classes=10)
    variables = _numpy_variables(model, SMALL_IMAGE)
    x = _images((4, *SMALL_IMAGE), seed=42)
    apply_eval = jax.jit(lambda v, x: model.apply(v, x, train=False))
    a, b = apply_eval(variables, x), apply_eval(variables, x)
    assert a.shape == (4, 10) and a.dtype == jnp.float32
    assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    if uses_bn:
        out, state = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
            variables, x
        )
        assert out.shape == (4, 10)
        old, new = variables["batch_stats"], state["batch_stats"]
        changed = jax.tree_util.tree_map(lambda p, q: not np.allclose(p, q), old, new)
        assert all(jax.tree_util.tree_leaves(changed)), "every running statistic should move"
        # Eval mode reads the (updated) running statistics.
        c = apply_eval({**variables, "batch_stats": new}, x)
        assert not np.allclose(a, c)
    else:
        c = jax.jit(lambda v, x: model.apply(v, x, train=True))(variables, x)
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-5)


def test_batchnorm_momentum_and_epsilon():
    model = create_model(_cfg({"name": "convnet", "width": 4, "depth": 1, "norm": "batch"}), num_classes=3)
    variables = _numpy_variables(model, (8, 8, 3))
    x = _images((5, 8, 8, 3), seed=1) * 3.0 + 1.0

    @jax.jit
    def step(v, x):
        return model.apply(
            v, x, train=True, mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda mdl, method: mdl.name == "conv_0",
        )

    _, state = step(variables, x)
    h = np.asarray(state["intermediates"]["conv_0"]["__call__"][0])
    stats = state["batch_stats"]["norm_0"]
    # Flax momentum 0.9 == PyTorch momentum 0.1, starting from mean 0 / var 1.
    np.testing.assert_allclose(stats["mean"], 0.1 * h.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * h.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    bn = norm_layer("batch", 4, train=True)
    assert (bn.momentum, bn.epsilon) == (0.9, 1e-5)


def test_instance_and_group_norm_definitions():
    x = _images((2, 5, 5, 8), seed=0) * 2.0 + 0.5
    inst = norm_layer("instance", 8, train=False)
    y = jax.jit(lambda x: inst.apply({"params": {"scale": jnp.ones(8), "bias": jnp.zeros(8)}}, x))(x)
    mu = x.mean(axis=(1, 2), keepdims=True)
    var = x.var(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(y, (x - mu) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
    assert num_groups_for(512) == 32 and num_groups_for(16) == 16 and num_groups_for(48) == 24
    grp = norm_layer("group", 64, train=False)
    assert grp.num_groups == 32 and grp.epsilon == 1e-5
    assert norm_layer("none", 8, train=False) is None


@pytest.fixture(scope="module")
def tiny():
    model = create_model(_cfg(TINY_CFG), num_classes=10)
    return model, init_variables(model, jax.random.key(0), TINY_IMAGE)


def test_init_variables_structure_and_scales(tiny):
    model, variables = tiny
    assert isinstance(variables, dict) and set(variables) == {"params", "batch_stats"}
    assert isinstance(variables["params"], dict)
    params = variables["params"]
    k = np.asarray(params["conv_0"]["kernel"])
    assert k.shape == (3, 3, 3, 64)
    assert abs(k.std() / math.sqrt(2.0 / (3 * 3 * 3)) - 1.0) < 0.1  # Kaiming normal, fan-in
    assert abs(k.mean()) < 0.1
    assert np.all(np.asarray(params["conv_0"]["bias"]) == 0)
    assert np.all(np.asarray(params["head"]["bias"]) == 0)
    np.testing.assert_array_equal(params["norm_0"]["scale"], 1.0)
    np.testing.assert_array_equal(variables["batch_stats"]["norm_0"]["mean"], 0.0)
    np.testing.assert_array_equal(variables["batch_stats"]["norm_0"]["var"], 1.0)
    h = np.asarray(params["head"]["kernel"])  # LeCun normal: variance 1 / fan_in
    assert abs(h.std() / math.sqrt(1.0 / h.shape[0]) - 1.0) < 0.1


def test_init_variables_matches_model_init_and_depends_on_key(tiny):
    model, a = tiny
    b = jax.jit(lambda k: model.init(k, jnp.zeros((1, *TINY_IMAGE)), train=False))(jax.random.key(0))
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-6, atol=1e-6), a, b)
    c = init_variables(model, jax.random.key(1), TINY_IMAGE)  # cached program, new key
    assert not np.allclose(a["params"]["conv_0"]["kernel"], c["params"]["conv_0"]["kernel"])
    d = init_variables(model, jax.random.key(0), list(TINY_IMAGE))
    np.testing.assert_array_equal(a["params"]["head"]["kernel"], d["params"]["head"]["kernel"])


# ---------------------------------------------------------------- pruning helpers


@pytest.mark.parametrize("case", sorted(CASES))
def test_is_prunable_selects_conv_and_dense_kernels(case):
    cfg, _, n_prunable = CASES[case]
    params = _shapes(create_model(_cfg(cfg), num_classes=10), (32, 32, 3))["params"]
    leaves = jax.tree_util.tree_leaves_with_path(params)
    as_str = [(tuple(k.key for k in path), leaf) for path, leaf in leaves]
    selected = [p for p, leaf in as_str if is_prunable(p, leaf)]
    assert len(selected) == n_prunable
    assert all(p[-1] == "kernel" for p in selected)
    assert all(is_prunable(p, leaf) == (p[-1] == "kernel") for p, leaf in as_str)
    # Key paths from jax.tree_util work as well as string tuples.
    assert sum(is_prunable(path, leaf) for path, leaf in leaves) == n_prunable
    assert is_prunable(("head", "kernel"), np.zeros((3, 2)))
    assert not is_prunable(("odd", "kernel"), np.zeros((3,)))
    assert not is_prunable(("head", "bias"), np.zeros((3, 2)))
    assert not is_prunable((), np.zeros((3, 2)))


def test_count_params_on_arrays_and_shapes(tiny):
    model, variables = tiny
    expected = _conv(3, 3, 64) + 2 * 64 + _dense(4 * 4 * 64, 10)
    assert count_params(variables["params"]) == expected
    assert count_params(_shapes(model, TINY_IMAGE)["params"]) == expected
    assert count_params({"a": np.zeros(()), "b": [np.zeros((2, 3))]}) == 7


# ---------------------------------------------------------------- configuration


def test_registry_contents():
    # The built-ins (other test modules register models of their own in this process).
    assert sorted(models._BUILTIN) == ["alexnet", "convnet", "lenet_300_100", "resnet10",
                                       "resnet18"]
    assert models._BUILTIN <= set(models.MODELS)
    assert set(models.MODEL_FIELDS) == set(models.MODELS)


def test_config_kinds_and_none_defaults():
    none_fields = {f: None for f in models.CONFIG_FIELDS}
    model = create_model(_cfg({"name": "lenet_300_100", **none_fields}), num_classes=10)
    assert isinstance(model, models.LeNet300100)
    spec = models.ModelSpec.from_config({"name": "convnet", "width": 16, "depth": None})
    conv = create_model(spec, num_classes=5)
    assert (conv.width, conv.depth, conv.norm, conv.pool, conv.num_classes) == (16, 3, "instance", "avg", 5)
    r18 = create_model({"name": "resnet18", "num_blocks": [1, 1, 2, 2]}, num_classes=10)
    assert r18.num_blocks == (1, 1, 2, 2) and r18.stem == "cifar"
    r10 = create_model({"name": "resnet10", "width_multiplier": 0.5}, num_classes=10)
    assert r10.base_width == 32 and r10.stem == "imagenet" and r10.num_blocks == (1, 1, 1, 1)


def test_unknown_model_name():
    with pytest.raises(ValueError) as e:
        create_model(_cfg({"name": "vgg11"}), num_classes=10)
    assert "vgg11" in str(e.value) and str(sorted(models.MODELS)) in str(e.value)
    with pytest.raises(ValueError, match="unknown model"):
        create_model({"name": None}, num_classes=10)


@pytest.mark.parametrize(
    "name,field,value",
    [
        ("lenet_300_100", "width", 300),
        ("lenet_300_100", "norm", "batch"),
        ("convnet", "num_blocks", (1, 1, 1, 1)),
        ("convnet", "width_multiplier", 0.5),
        ("resnet18", "depth", 3),
        ("resnet18", "pool", "avg"),
        ("resnet10", "num_blocks", (2, 2, 2, 2)),
        ("resnet10", "depth", 10),
        ("alexnet", "width", 64),
        ("alexnet", "norm", "batch"),
    ],
)
def test_field_not_accepted(name, field, value):
    with pytest.raises(ValueError) as e:
        create_model(_cfg({"name": name, field: value}), num_classes=10)
    msg = str(e.value)
    assert repr(field) in msg and repr(name) in msg and str(list(models.MODEL_FIELDS[name])) in msg


@pytest.mark.parametrize(
    "name,field,value,allowed",
    [
        ("convnet", "norm", "layer", "['batch', 'instance', 'none']"),
        ("convnet", "norm", "group", "['batch', 'instance', 'none']"),
        ("convnet", "pool", "min", "['avg', 'max']"),
        ("convnet", "width", 0, "positive integer"),
        ("convnet", "width", -8, "positive integer"),
        ("convnet", "width", 2.5, "positive integer"),
        ("convnet", "width", True, "positive integer"),
        ("convnet", "depth", 0, "positive integer"),
        ("resnet18", "norm", "none", "['batch', 'group', 'instance']"),
        ("resnet18", "width", 0, "positive integer"),
        ("resnet18", "width_multiplier", 0.0, "positive finite number"),
        ("resnet18", "width_multiplier", -1.0, "positive finite number"),
        ("resnet18", "width_multiplier", float("nan"), "positive finite number"),
        ("resnet18", "width_multiplier", 0.001, "at least 1 channel"),
        ("resnet18", "num_blocks", (2, 2, 2), "4 positive integers"),
        ("resnet18", "num_blocks", (2, 0, 2, 2), "4 positive integers"),
        ("resnet18", "num_blocks", "2222", "4 positive integers"),
        ("resnet10", "norm", "layer", "['batch', 'group', 'instance']"),
        ("resnet10", "width_multiplier", "half", "positive finite number"),
    ],
)
def test_invalid_values(name, field, value, allowed):
    with pytest.raises(ValueError) as e:
        create_model({"name": name, field: value}, num_classes=10)
    msg = str(e.value)
    assert field in msg and allowed in msg


def test_invalid_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        create_model(_cfg({"name": "lenet_300_100"}), num_classes=0)
