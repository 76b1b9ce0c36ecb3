"""Gradient matching (DC/DSA/IDC) and distribution matching (DM): the losses against NumPy, exact
image gradients, Siamese augmentation, no retracing, divergence, validation, and determinism plus
resume after SIGKILL through the CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dp_jax import distill, rng
from dp_jax.storage import fileio
from dp_jax.rundir import paths as workdir_lib
from dp_jax.data import load_dataset
from dp_jax.data.augment import make_augment, siamese
from dp_jax.distill import common, dm, gm
from dp_jax.config.defaults import distill_defaults
from dp_jax.tasks import distill as distill_task
from dp_jax.tasks.distill import distill_into
from dp_jax.models import apply_features, create_model, init_variables
from dp_jax.models.convs import fast_convs
from dp_jax.training.outputs import TrainingDivergedError

from conftest import ROOT, load_config_module

F64 = np.float64


class MLP(nn.Module):
    """flatten -> Dense(hidden) -> ReLU -> Dense(num_classes) ("head")."""
    hidden: int = 5
    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Dense(self.hidden, name="hidden")(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes, name="head")(x)


def _mlp_problem(seed=0, b=6, m=2, classes=3, shape=(2, 2, 1)):
    k = jax.random.split(jax.random.key(seed), 4)
    model = MLP(num_classes=classes)
    params = jax.jit(model.init)(k[0], jnp.zeros((1,) + shape))["params"]
    # Non-zero biases so that they matter to the gradients the distances must ignore.
    params = jax.tree.map(lambda a, kk: a + 0.3 * jax.random.normal(kk, a.shape), params,
                          jax.tree.unflatten(jax.tree.structure(params),
                                             list(jax.random.split(k[1], 4))))
    params = jax.tree.map(lambda a: np.asarray(a, F64), params)
    real = np.asarray(jax.random.normal(k[2], (classes, b) + shape), F64)
    syn = np.asarray(jax.random.normal(k[3], (classes * m,) + shape), F64)
    return model, params, real, syn


def _np_forward(p, x):
    xf = x.reshape(x.shape[0], -1)
    z = xf @ p["hidden"]["kernel"] + p["hidden"]["bias"]
    h = np.maximum(z, 0.0)
    return xf, z, h, h @ p["head"]["kernel"] + p["head"]["bias"]


def _np_grads(p, x, label):
    """Hand-derived gradients of the mean cross-entropy of the MLP (all examples of ``label``)."""
    xf, z, h, logits = _np_forward(p, x)
    e = np.exp(logits - logits.max(1, keepdims=True))
    d = e / e.sum(1, keepdims=True)
    d[:, label] -= 1.0
    d /= x.shape[0]
    dh = (d @ p["head"]["kernel"].T) * (z > 0)
    return {"head": {"kernel": h.T @ d, "bias": d.sum(0)},
            "hidden": {"kernel": xf.T @ dh, "bias": dh.sum(0)}}


def _np_distance(gr, gs, kind):
    out = 0.0
    for layer in ("hidden", "head"):  # biases are ignored
        r, s = gr[layer]["kernel"], gs[layer]["kernel"]
        if kind == "dsa":
            for j in range(r.shape[1]):  # one output node per column of a (in, out) kernel
                out += 1 - r[:, j] @ s[:, j] / (np.linalg.norm(r[:, j]) * np.linalg.norm(s[:, j])
                                                + 1e-6)
        elif kind == "mse":
            out += np.sum((r - s) ** 2)
        else:
            out += np.sum(np.abs(r - s))
    return out


def test_gm_gradients_and_distances_match_numpy():
    with jax.enable_x64(True):
        model, params, real, syn = _mlp_problem()
        mask = common.dense_mask(model, (2, 2, 1))
        g = jax.jit(lambda p, x: gm.ce_gradients(model, p, {}, x, 1, mask))(params, syn[2:4])
        want = _np_grads(params, syn[2:4], 1)
        for layer in want:
            for leaf in want[layer]:
                np.testing.assert_allclose(np.asarray(g[layer][leaf]), want[layer][leaf],
                                           rtol=1e-10, atol=1e-12)
        losses = jax.jit(lambda p, xr, xs: {kind: gm.match_loss(
            model, p, {}, xr, xs, distance=kind, mask=mask) for kind in gm.DISTANCES})(
                params, real, syn)
        for kind in gm.DISTANCES:
            ref = sum(_np_distance(_np_grads(params, real[c], c),
                                   _np_grads(params, syn[2 * c:2 * c + 2], c), kind)
                      for c in range(3))
            np.testing.assert_allclose(float(losses[kind]), ref, rtol=1e-9)
            assert ref > 1e-3


def test_dsa_distance_reads_conv_kernels_per_output_node_and_ignores_biases():
    k = jax.random.split(jax.random.key(0), 4)
    r = np.asarray(jax.random.normal(k[0], (3, 3, 2, 4)), F64)  # HWIO
    s = np.asarray(jax.random.normal(k[1], (3, 3, 2, 4)), F64)
    # DC's layout: PyTorch (out, in, h, w) -> (out, in*h*w), 1 - cosine per row, summed.
    rt, st = (a.transpose(3, 2, 0, 1).reshape(4, -1) for a in (r, s))
    ref = sum(1 - rt[o] @ st[o] / (np.linalg.norm(rt[o]) * np.linalg.norm(st[o]) + 1e-6)
              for o in range(4))
    b1, b2 = np.asarray(jax.random.normal(k[2], (4,))), np.asarray(jax.random.normal(k[3], (4,)))
    with jax.enable_x64(True):
        got = jax.jit(gm.dsa_distance)({"k": r, "b": b1}, {"k": s, "b": b2})
        np.testing.assert_allclose(float(got), ref, rtol=1e-10)

        @jax.jit
        def with_and_without_biases():
            return [(f({"k": r, "b": b1}, {"k": s, "b": b2}), f({"k": r}, {"k": s}))
                    for f in gm.DISTANCE_FNS.values()]
        for a, b in with_and_without_biases():  # 1-D leaves never count
            assert float(a) == float(b)
        # An all-zero gradient column (a dead or pruned output node): the derivative of
        # 1 - <r, s> / (|r| |s| + eps) at s = 0 is -r / eps (PyTorch's), not NaN.
        dead = s.copy()
        dead[..., 1] = 0.0
        g = jax.jit(jax.grad(lambda v: gm.dsa_distance({"k": r}, {"k": v})))(dead)
        assert bool(jnp.isfinite(g).all())
        np.testing.assert_allclose(np.asarray(g[..., 1]), -r[..., 1] / gm.COS_EPS, rtol=1e-9)


def test_dm_loss_matches_numpy():
    with jax.enable_x64(True):
        model, params, real, syn = _mlp_problem(seed=1, b=5, m=3)
        got = jax.jit(lambda p, xr, xs: dm.dm_loss(model, p, {}, xr, xs))(params, real, syn)
        ref = sum(np.sum((_np_forward(params, real[c])[2].mean(0)
                          - _np_forward(params, syn[3 * c:3 * c + 3])[2].mean(0)) ** 2)
                  for c in range(3))
        np.testing.assert_allclose(float(got), ref, rtol=1e-10)
        assert ref > 1e-3


@pytest.mark.parametrize("cfg", [dict(name="lenet_300_100"),
                                 dict(name="convnet", width=3, depth=1, norm="batch")])
def test_features_are_what_enters_the_head(cfg):
    model = create_model(ml_collections.ConfigDict(cfg), num_classes=4)
    v = init_variables(model, jax.random.key(0), (8, 8, 1))
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    feats, logits = jax.jit(lambda v, x: (apply_features(model, v, x, train=False),
                                          model.apply(v, x, train=False)))(v, x)
    head = v["params"]["head"]
    np.testing.assert_allclose(np.asarray(feats @ head["kernel"] + head["bias"]),
                               np.asarray(logits), rtol=1e-5, atol=1e-6)
    if cfg["name"] == "lenet_300_100":  # the 100 hidden units, by hand
        p = jax.tree.map(np.asarray, v["params"])
        h = np.maximum(np.asarray(x).reshape(3, -1) @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
        h = np.maximum(h @ p["fc2"]["kernel"] + p["fc2"]["bias"], 0)
        np.testing.assert_allclose(np.asarray(feats), h, rtol=1e-5, atol=1e-6)
    else:  # train mode returns the updated BatchNorm statistics too
        f2, upd = jax.jit(lambda v, x: apply_features(model, v, x, train=True,
                                                      mutable=["batch_stats"]))(v, x)
        assert f2.shape == feats.shape and "batch_stats" in upd


def _settings_d(**kw):
    d = distill_defaults()
    fields = dict(ipc=1, factor=2, dsa_strategy="crop_scale_cutout", gm_batch_real=4,
                  dm_batch_real=4, gm_outer_loops=2, gm_inner_loops=2, gm_batch_net=4)
    d.update(dict(fields, **kw))
    return d


def _real(dtype, per_class=5, classes=3, shape=(8, 8, 1), seed=0):
    x = jax.random.normal(jax.random.key(seed), (per_class * classes,) + shape, dtype)
    return common.real_data(np.asarray(x), np.arange(per_class * classes) % classes, classes)


@pytest.mark.parametrize("net", ["mlp", pytest.param("convnet", marks=pytest.mark.slow)])
def test_image_gradients_match_finite_differences(net):
    """d loss / d stored images through decoding (factor 2), Siamese DSA and the network
    (second derivatives for gm; the ConvNet through fast_convs), float64, against central
    differences."""
    with jax.enable_x64(True), fast_convs(True):
        model = MLP(hidden=6, num_classes=3) if net == "mlp" else create_model(
            ml_collections.ConfigDict(dict(name="convnet", width=3, depth=1, norm="instance")),
            num_classes=3)
        data = _real(jnp.float64)
        data = data._replace(x=data.x.astype(jnp.float64))
        labels = jnp.arange(3, dtype=jnp.int32)
        ctx = common.MatchData(data=data, labels=labels, mask=common.dense_mask(model, (8, 8, 1)))
        params = jax.tree.map(lambda a: a.astype(jnp.float64),
                              init_variables(model, jax.random.key(4), (8, 8, 1))["params"])
        images = jax.random.normal(jax.random.key(5), (3, 8, 8, 1), jnp.float64)
        direction = jax.random.normal(jax.random.key(6), images.shape, jnp.float64)
        k = jax.random.key(7)
        d = _settings_d(dsa_strategy="scale")  # bilinear resampling: the subtlest gradients
        g_prog = gm.GradientMatching(model, gm.Settings.from_config(
            d, data=data, num_stored=3, image_shape=(8, 8, 1)))
        d_prog = dm.DistributionMatching(model, dm.Settings.from_config(
            d, data=data, num_stored=3, image_shape=(8, 8, 1)))
        losses = {"gm": lambda im: g_prog.class_loss_of_images(im, params, {}, k, 1, ctx),
                  "dm": lambda im: d_prog.loss_of_images(im, params, {}, k, ctx)}
        for name, f in losses.items():
            vg = jax.jit(jax.value_and_grad(f))  # one program: its value gives the FD too
            grad = vg(images)[1]
            eps = 1e-6
            fd = (vg(images + eps * direction)[0] - vg(images - eps * direction)[0]) / (2 * eps)
            np.testing.assert_allclose(float(jnp.vdot(grad, direction)), float(fd), rtol=1e-6,
                                       err_msg=name)
            assert float(jnp.abs(grad).max()) > 0


def test_batchnorm_follows_dc_real_statistics_then_eval_mode_matching():
    """DC's BatchNorm rule: before a match the running statistics take one train-mode step on
    16 real images per class (checked against a plain ``lax`` convolution's channel moments),
    and the gradients are then taken in eval mode, so a batch's gradient is the size-weighted
    mean of its parts' (train-mode batch statistics would couple the examples)."""
    shape = (8, 8, 3)  # 3 channels: the first conv has plain 'same' padding
    model = create_model(ml_collections.ConfigDict(
        dict(name="convnet", width=3, depth=1, norm="batch")), num_classes=3)
    data = _real(jnp.float32, per_class=20, shape=shape)
    mask = common.dense_mask(model, shape)
    ctx = common.MatchData(data=data, labels=jnp.arange(3, dtype=jnp.int32), mask=mask)
    prog = gm.GradientMatching(model, gm.Settings.from_config(
        _settings_d(dsa=False), data=data, num_stored=3, image_shape=shape))
    k_it = jax.random.key(3)
    params, bn0 = common.fresh_network(model, jax.random.key(4), shape, mask)
    bn1 = prog._bn(params, bn0, k_it, 0, ctx)
    real = common.class_batches(jax.random.fold_in(prog._outer_key(k_it, 0), rng.MATCH_BN),
                                data, gm.BN_PER_CLASS).reshape((-1,) + shape)
    pre = jax.lax.conv_general_dilated(real, params["conv_0"]["kernel"], (1, 1),
                                       ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    pre = np.asarray(pre + params["conv_0"]["bias"], F64)
    for stat, batch in (("mean", pre.mean((0, 1, 2))), ("var", pre.var((0, 1, 2)))):
        np.testing.assert_allclose(bn1["norm_0"][stat],
                                   0.9 * np.asarray(bn0["norm_0"][stat]) + 0.1 * batch,
                                   rtol=1e-4, atol=1e-5, err_msg=stat)

    syn = jax.random.normal(jax.random.key(5), (6,) + shape)
    flat = lambda g: np.concatenate([np.ravel(a) for a in jax.tree.leaves(g)])  # noqa: E731
    whole = flat(gm.ce_gradients(model, params, bn1, syn, 1, mask))
    parts = (2 * flat(gm.ce_gradients(model, params, bn1, syn[:2], 1, mask))
             + 4 * flat(gm.ce_gradients(model, params, bn1, syn[2:], 1, mask))) / 6
    np.testing.assert_allclose(whole, parts, rtol=1e-4, atol=1e-6)
    y = jnp.ones((6,), jnp.int32)
    train_grad = lambda x: flat(jax.grad(  # noqa: E731
        lambda p: common.ce_loss(model, p, bn1, x, y[:x.shape[0]], train=True)[0])(params))
    coupled = (2 * train_grad(syn[:2]) + 4 * train_grad(syn[2:])) / 6
    assert np.abs(train_grad(syn) - coupled).max() > 1e-3  # the check above can fail

    images = jax.random.normal(jax.random.key(6), (3,) + shape)
    state = {"images": images, "opt": prog.tx_img.init(images)}
    state, loss, _ = prog.step(state, 0, key=jax.random.key(1), ctx=ctx)
    assert np.isfinite(float(loss)) and not np.allclose(state["images"], images)


def test_siamese_shares_one_transform_per_batch():
    aug = make_augment("dsa", strategy="color_cutout_rotate")  # a colour, a mask, a resampling
    shared = siamese(aug)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    x = jnp.concatenate([x, x[:1]])  # the first image again, at position 2

    @jax.jit
    def run(key):
        # Each example of a shared batch gets the transform of a batch of one, wherever it is.
        one_by_one = jnp.stack([aug(key, x[j:j + 1])[0] for j in range(2)])
        return shared(key, x), one_by_one, aug(key, x)

    differs = False
    for i in range(6):
        out, one_by_one, per_example = run(jax.random.key(i))
        np.testing.assert_allclose(np.asarray(out[:2]), np.asarray(one_by_one), atol=1e-6)
        np.testing.assert_allclose(np.asarray(out[2]), np.asarray(out[0]), atol=1e-6)
        differs |= not np.allclose(np.asarray(per_example[:2]), np.asarray(one_by_one))
    assert differs, "plain DSA draws per-example parameters; the check above would be vacuous"


def test_losses_vanish_when_synthetic_equals_real_under_siamese_dsa():
    """Each class has exactly 4 real images and the synthetic set is those images: a real batch
    is a permutation of them, so the losses are ~0 only if both get the same transform."""
    model = MLP(num_classes=3)
    x = jax.random.normal(jax.random.key(0), (12, 8, 8, 1))
    y = np.repeat(np.arange(3), 4)
    data = common.real_data(np.asarray(x), y, 3)
    ctx = common.MatchData(data=data, labels=jnp.asarray(y, jnp.int32),
                         mask=common.dense_mask(model, (8, 8, 1)))
    params = init_variables(model, jax.random.key(1), (8, 8, 1))["params"]
    d = _settings_d(ipc=4, factor=1, dsa_strategy="color_rotate", gm_distance="mse")
    g_prog = gm.GradientMatching(model, gm.Settings.from_config(
        d, data=data, num_stored=12, image_shape=(8, 8, 1)))
    d_prog = dm.DistributionMatching(model, dm.Settings.from_config(
        d, data=data, num_stored=12, image_shape=(8, 8, 1)))
    # Broken variants: every image drawn its own transform (real and synthetic ones differ).
    plain = make_augment("dsa", strategy=d.dsa_strategy)

    @jax.jit
    def losses(k, c):
        real = common.class_batches(k, data, 4)
        both = plain(k, jnp.concatenate([real.reshape(12, 8, 8, 1), x]))
        broken_gm = gm.class_loss(model, params, {}, both[:4], both[12:16], 0,
                                  distance="mse", mask=ctx.mask)
        broken_dm = dm.dm_loss(model, params, {}, both[:12].reshape(real.shape), both[12:])
        return (g_prog.class_loss_of_images(x, params, {}, k, c, ctx),
                d_prog.loss_of_images(x, params, {}, k, ctx), broken_gm, broken_dm)

    for i in range(4):
        for c in range(3):
            lg, ld, broken_gm, broken_dm = losses(jax.random.key(10 + i), c)
            assert float(lg) < 1e-12 and float(ld) < 1e-10
            assert float(broken_gm) > 1e-6 and float(broken_dm) > 1e-6


def test_jitted_steps_trace_once_across_iterations():
    model = MLP(num_classes=3)
    data = _real(jnp.float32)
    labels = jnp.arange(3, dtype=jnp.int32)
    ctx = common.MatchData(data=data, labels=labels, mask=common.dense_mask(model, (8, 8, 1)))
    d = _settings_d(gm_net_train="real", dsa=False)
    wrap = lambda f: chex.assert_max_traces(f, n=1)  # noqa: E731
    progs = {
        "gm": gm.GradientMatching(model, gm.Settings.from_config(
            d, data=data, num_stored=3, image_shape=(8, 8, 1)), wrap=wrap),
        "dm": dm.DistributionMatching(model, dm.Settings.from_config(
            d, data=data, num_stored=3, image_shape=(8, 8, 1)), wrap=wrap)}
    for name, prog in progs.items():
        images = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
        state = {"images": images, "opt": prog.tx_img.init(images)}
        losses = []
        for it in range(3):  # several iterations, outer loops, classes and network steps
            state, loss, _ = prog.step(state, it, key=jax.random.key(1), ctx=ctx)
            losses.append(float(loss))
        assert len(set(losses)) == 3 and all(np.isfinite(losses)), name
    assert progs["gm"]._class._cache_size() == 1 and progs["gm"]._net._cache_size() == 1
    assert progs["dm"]._update._cache_size() == 1


def _config(npz, method, **distill):
    c = load_config_module("distill_fashion_mnist").get_config(f"lenet,{method},smoke")
    c.data.name = f"npz:{npz}"
    c.distill.update(distill)
    return c


@pytest.mark.parametrize("method,field,value,match", [
    ("gm", "method", "foo", r"config.distill.method='foo' is invalid; allowed: mtt \| gm \| dm"),
    ("gm", "gm_distance", "cos", r"gm_distance='cos' is invalid; allowed: dsa \| mse \| l1"),
    ("gm", "gm_net_train", "both", r"gm_net_train='both' is invalid; allowed: syn \| real"),
    ("gm", "gm_outer_loops", 0, "gm_outer_loops=0 is invalid; allowed: an integer >= 1"),
    ("gm", "gm_inner_loops", -1, "gm_inner_loops=-1 is invalid; allowed: an integer >= 0"),
    ("gm", "gm_batch_real", 0, "gm_batch_real=0 is invalid"),
    ("gm", "gm_batch_net", 0, "gm_batch_net=0 is invalid"),
    ("gm", "gm_lr_img", 0.0, r"gm_lr_img=0.0 is invalid; allowed: a number > 0"),
    ("gm", "gm_momentum_img", 1.0, r"gm_momentum_img=1.0 is invalid; allowed: a number in"),
    ("dm", "dm_batch_real", 0, "dm_batch_real=0 is invalid"),
    ("dm", "dm_lr_img", -1.0, "dm_lr_img=-1.0 is invalid"),
    ("dm", "dm_momentum_img", -0.5, "dm_momentum_img=-0.5 is invalid")])
def test_bad_values_are_rejected_before_anything_is_written(tiny_npz, tmp_path, method, field,
                                                            value, match):
    c = _config(tiny_npz, method)
    c.distill[field] = value
    with pytest.raises(ValueError, match=match):
        distill_task.run(c, str(tmp_path / "wd"))
    assert not os.path.exists(tmp_path / "wd")


@pytest.mark.parametrize("method,field", [("gm", "gm_lr_img"), ("dm", "dm_lr_img")])
def test_divergence_names_the_field(tiny_npz, tmp_path, method, field):
    c = _config(tiny_npz, method, dsa=False, iterations=3, eval_every=0, gm_outer_loops=1,
                gm_inner_loops=0)
    c.distill[field] = 1e38
    dataset = load_dataset(c.data, seed=0)
    with pytest.raises(TrainingDivergedError, match=f"lower distill.{field}"):
        distill_into(c, str(tmp_path), dataset)


CLI = {"iterations": 12, "checkpoint_every": 3, "eval_every": 0, "eval_random": False,
       "eval_full_epochs": 0, "eval_models": 1, "eval_epochs": 1, "eval_augment": "none",
       "factor": 2, "gm_net_train": "real", "dsa_strategy": "crop_flip"}


def _arrays(path):
    with np.load(path) as z:
        return {k: z[k] for k in ("images", "stored_images", "labels", "lr")}, json.loads(
            str(z["meta"]))


def _distill_rows(workdir):
    return [{k: v for k, v in r.items() if k != "wall_s"}
            for r in fileio.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if r["phase"] == "distill"]


def _in_process(cfg, workdir):
    os.makedirs(workdir)
    metrics = os.path.join(workdir, "metrics.jsonl")
    distill_into(cfg, workdir, load_dataset(cfg.data, seed=cfg.seed),
                 log=lambda **kw: fileio.append_jsonl(metrics, kw))
    return _arrays(os.path.join(workdir, "distilled.npz"))


def _kill_mid_distillation(cmd, wd, env):
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    marker = os.path.join(workdir_lib.distill_checkpoints(wd), "3")
    deadline = time.time() + 120
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = fileio.RoundCheckpointer(workdir_lib.distill_checkpoints(wd))
    latest = ckpt.latest()
    ckpt.close()
    assert latest < CLI["iterations"], "killed after the distillation had finished"
    assert not os.path.exists(os.path.join(wd, "distilled.npz"))


class Interrupted(RuntimeError):
    pass


@pytest.mark.parametrize("method", ["gm", "dm"])
def test_deterministic_and_resumes_after_an_interruption(tiny_npz, tmp_path, method):
    cfg = _config(tiny_npz, method, **CLI)
    want, meta = _in_process(cfg, str(tmp_path / "ref"))
    got, _ = _in_process(_config(tiny_npz, method, **CLI), str(tmp_path / "again"))
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"second run: {k}")
    assert meta["distill"]["method"] == method and meta["cost"]["expert_examples"] == 0
    assert float(want["lr"]) == pytest.approx(cfg.distill.lr_init)
    # Dies during iteration 5, after the checkpoint of iteration 3; the rerun resumes from it.
    wd = str(tmp_path / "resumed")
    os.makedirs(wd)
    metrics = os.path.join(wd, "metrics.jsonl")

    def dying_log(**row):
        fileio.append_jsonl(metrics, row)
        if row.get("iteration") == 5:
            raise Interrupted
    dataset = load_dataset(cfg.data, seed=cfg.seed)
    with pytest.raises(Interrupted):
        distill_into(cfg, wd, dataset, log=dying_log)
    distill_into(cfg, wd, dataset, log=lambda **kw: fileio.append_jsonl(metrics, kw))
    got, _ = _arrays(os.path.join(wd, "distilled.npz"))
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"resumed: {k}")
    rows = _distill_rows(str(tmp_path / "ref"))
    assert _distill_rows(wd) == rows and len(rows) == CLI["iterations"]


# gm's CLI run compiles more than dm's; the in-process resume above covers gm by default.
@pytest.mark.parametrize("method", [pytest.param("gm", marks=pytest.mark.slow), "dm"])
def test_resumes_after_sigkill_through_the_cli(tiny_npz, tmp_path, method):
    cfg = _config(tiny_npz, method, **CLI)
    want, _ = _in_process(cfg, str(tmp_path / "ref"))
    wd = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "dp_jax.main",
           f"--config=configs/distill_fashion_mnist.py:lenet,{method},smoke", f"--workdir={wd}",
           f"--config.data.name=npz:{tiny_npz}"] + [
        f"--config.distill.{k}={v}" for k, v in CLI.items()]
    # The resumed process reuses the killed one's compiled programs (results are unaffected:
    # the same executables), which halves its start-up on a CPU.
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    _kill_mid_distillation(cmd, wd, env)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    got, _ = _arrays(os.path.join(wd, "distilled.npz"))
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"resumed: {k}")
    assert _distill_rows(wd) == _distill_rows(str(tmp_path / "ref"))
    assert not os.path.exists(os.path.join(wd, "experts"))
    with open(os.path.join(wd, "report.md")) as f:
        assert ("Gradient matching" if method == "gm" else "Distribution matching") in f.read()
    # The method and its fields decide the set: the workdir refuses other settings.
    fields = workdir_lib.identity_fields(cfg.to_dict())
    assert fields["distill.method"] == method and "distill.gm_distance" in fields
    other = cfg.to_dict()
    other["distill"]["dm_lr_img"] = 2.0
    with pytest.raises(ValueError, match="distill.dm_lr_img"):
        workdir_lib.check_identity(wd, other)
