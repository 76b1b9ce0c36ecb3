"""The data control: IMP on a real subset (random, or a coreset) with Distilled Pruning's inner
loop.

``subset:n=N`` draws a stratified random subset of N real training images (once per seed)
and finds each round's mask exactly as DP does — the same ``dp`` inner loop (steps,
batch, DSA, schedule, inner seeds) on the masked init — with its own step size
``dp.subset_lr`` (0 = DP's: ``dp.lr``, or the distilled set's learned step size). So DP
vs ``subset`` is "distilled images vs as many real images". N defaults to the distilled
set's size when the experiment has one, else ``distill.ipc`` x classes.

``subset:n=N;select=S`` picks the N images by a coreset rule instead, N / classes per class
(:mod:`dp_jax.data.coresets`): ``herding`` and ``kcenter`` on the penultimate features of a
probe network, ``forgetting`` (the most forgotten during the probe's training), ``el2n_easy`` /
``el2n_hard`` (the lowest / highest EL2N over :data:`EL2N_NETS` probes). A probe is the
experiment's own model and optimiser (``train.*``; float32, no augmentation) trained from a
fresh init (``rng.SUBSET_CORESET`` folded with the probe's number) for :func:`probe_epochs`
epochs of the full training set: a tenth of ``train.epochs`` (EL2N's epoch 20 of 200), at
least 2 (a forgetting event needs two presentations). The probes' training, and each forward
pass over the training set that scores it, count in round 1's search examples.
``select=random`` is the default and labels stay as before (``subset_n100``;
``subset_n100_herding`` for a coreset).

Every run writes its selection once, ``runs/<label>-seed<s>/subset_indices.json`` (the sorted
indices, their class counts, the probe's budget; checksummed with the run's files), and reads it
back on resume instead of training the probes again.

The distillation comparison (``python -m dp_jax.distill.compare``, its real-subset baselines)
makes the same selections through :func:`random_indices`, :func:`coreset_key`,
:func:`train_probes` and :func:`select_indices`, sharing one probe among the rules that need it.
"""

from __future__ import annotations

import math
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from dp_jax import masks as masks_lib
from dp_jax import rng
from dp_jax.data import coresets, stratified_indices
from dp_jax.distill import load_distilled
from dp_jax.methods import base, dp as dp_method
from dp_jax.models import features as features_lib
from dp_jax.rundir import paths as workdir_lib
from dp_jax.rundir import verified
from dp_jax.storage import fileio, integrity
from dp_jax.training import small_set
from dp_jax.training import trainer as train_lib

INDICES = "subset_indices.json"  # in the run directory: the chosen training indices
EL2N_NETS = 4          # probes EL2N averages over (Paul et al. average 10; 4 bounds the cost)
PROBE_FRACTION = 0.1   # a probe trains this share of train.epochs (EL2N: epoch 20 of 200)
PROBE_MIN_EPOCHS = 2   # a forgetting event needs two presentations of an example

def subset_size(spec, ctx) -> int:
    """N: the option, else the distilled set's size, else the size DP's set would have."""
    if spec.opt("n") is not None:
        return int(spec.opt("n"))
    if ctx.distilled is not None:
        return int(ctx.distilled.x.shape[0])
    return default_size(ctx.config, int(ctx.setup.num_classes))


def default_size(config, num_classes: int) -> int:
    """The distilled set's size: that of the file at ``distill.path`` when set, else
    ``distill.ipc`` x classes x ``distill.factor``**2 (multi-formation decodes each image)."""
    d = config.distill
    if d.path:
        if os.path.exists(d.path):
            return len(load_distilled(d.path))
    return int(d.ipc) * num_classes * int(d.factor) ** 2


def subset_lr(config, distilled_set) -> float:
    """The inner loop's step size: ``dp.subset_lr``, else DP's (``dp.lr`` or the learned one)."""
    d = config.dp
    if d.subset_lr > 0:
        return float(d.subset_lr)
    if d.lr > 0:
        return float(d.lr)
    if distilled_set is not None:
        return float(distilled_set.lr)
    raise ValueError("config.dp.subset_lr=0 needs Distilled Pruning's step size, but dp.lr=0 and "
                     "no distilled set is used; allowed: dp.subset_lr > 0 (or dp.lr > 0)")


def parse_select(value: str):
    """The ``select`` option: a rule of :data:`~dp_jax.data.coresets.SELECTIONS`; ``random``
    parses to None (the default), so ``subset:n=100;select=random`` is the run ``subset:n=100``."""
    if value not in coresets.SELECTIONS:
        raise ValueError(f"select must be one of {', '.join(coresets.SELECTIONS)}, got {value!r}")
    return None if value == "random" else value


def probe_epochs(setup) -> int:
    """Epochs of one probe network: :data:`PROBE_FRACTION` of the experiment's, at least
    :data:`PROBE_MIN_EPOCHS`."""
    epochs = setup.num_steps / max(setup.trainer.steps_per_epoch, 1)
    return max(PROBE_MIN_EPOCHS, math.ceil(PROBE_FRACTION * epochs - 1e-9))


def _apply(model, variables: dict, x, *, train: bool):
    v = {k: val for k, val in variables.items() if k == "params" or val}
    if train and v.get("batch_stats"):  # batch statistics, as the training step's forward
        return model.apply(v, x, train=True, mutable=["batch_stats"])[0]
    return model.apply(v, x, train=train)


def _probe_programs(setup):
    """Compiled ``(perm, step)`` of the probe loop; ``step`` also writes the correctness of the
    minibatch's forward pass (the one it trains on) into ``flags[epoch, index]``."""
    model, tx, B = setup.model, setup.tx, setup.trainer.batch_size
    n = int(setup.y_train.shape[0])
    S = n // B

    def perm(key, step):  # the data order of the epoch holding ``step``, as the Trainer's
        return jax.random.permutation(jax.random.fold_in(key, step // S), n)

    def step(state, flags, x, y, order, key):
        t = state.step  # the position comes from the state: no host scalar per step
        idx = jax.lax.dynamic_slice_in_dim(order, (t % S) * B, B)
        xb, yb = x[idx], y[idx]
        logits = _apply(model, {"params": state.params, "batch_stats": state.batch_stats}, xb,
                        train=True)
        flags = flags.at[t // S, idx].set((jnp.argmax(logits, -1) == yb).astype(jnp.int8))
        state, _ = train_lib.train_step(state, xb, yb, jax.random.fold_in(key, t), model=model,
                                        tx=tx)
        return state, flags
    return jax.jit(perm), jax.jit(step, donate_argnums=(0, 1)), S


def train_probe(setup, key, epochs: int):
    """One probe network: ``(variables, flags (epochs, n), examples trained on)``; its init and
    data order come from ``key`` (folded with 0 and 1)."""
    perm_fn, step_fn, S = _probe_programs(setup)
    variables = setup.init_fn(jax.random.fold_in(key, 0))
    data_key = jax.random.fold_in(key, 1)
    state = train_lib.create_state(variables, masks_lib.ones_like(variables["params"]), setup.tx)
    flags = jnp.full((epochs, int(setup.y_train.shape[0])), coresets.NOT_PRESENTED, jnp.int8)
    for _ in range(epochs):
        order = perm_fn(data_key, state.step)
        for _ in range(S):
            state, flags = step_fn(state, flags, setup.x_train, setup.y_train, order, data_key)
    trained = {"params": state.params, "batch_stats": state.batch_stats}
    return trained, np.asarray(flags), epochs * S * setup.trainer.batch_size


def over_train_set(setup, fn) -> np.ndarray:
    """``fn(batch)`` over the training set in evaluation batches, concatenated on the host."""
    x, B = setup.x_train, setup.trainer.eval_batch_size
    return np.concatenate([np.asarray(fn(x[s:s + B])) for s in range(0, x.shape[0], B)])


def coreset_key(seed_key):
    """The probes' key of a seed (its root key ``seed_key``): probe ``i`` trains from
    ``fold_in(coreset_key, i)``."""
    return rng.fold(seed_key, rng.SUBSET, rng.SUBSET_CORESET)


def probe_nets(select: str) -> int:
    """How many probe networks the coreset ``select`` needs (EL2N averages over several)."""
    return EL2N_NETS if select.startswith("el2n") else 1


def train_probes(setup, key, nets: int) -> list:
    """Probes ``0 .. nets-1`` of ``key`` (:func:`train_probe`, :func:`probe_epochs` each): the
    first ``k`` of them are those of any selection that needs ``k``, so selections may share."""
    epochs = probe_epochs(setup)
    return [train_probe(setup, jax.random.fold_in(key, i), epochs) for i in range(nets)]


def select_indices(select: str, setup, key, n: int, probes=None) -> tuple[np.ndarray, dict]:
    """``(sorted indices, budget)`` of the coreset ``select`` of ``n`` images, n / classes per
    class; ``budget`` holds the probes' figures and ``examples`` they processed. ``probes``
    (from :func:`train_probes` with the same ``key``, at least :func:`probe_nets` of them) are
    used instead of training them again."""
    per, labels = n // setup.num_classes, np.asarray(setup.y_train)
    epochs, num_train = probe_epochs(setup), int(labels.shape[0])
    nets = probe_nets(select)
    probes = train_probes(setup, key, nets) if probes is None else list(probes)[:nets]
    examples = sum(p[2] for p in probes)
    if select == "forgetting":
        flags = probes[0][1]
        pick = lambda idx, k: coresets.most_forgotten(flags[:, idx], k)  # noqa: E731
    elif select in ("herding", "kcenter"):
        feats_fn = jax.jit(lambda v, xb: features_lib.apply_features(setup.model, v, xb))
        feats = over_train_set(setup, lambda xb: feats_fn(probes[0][0], xb))
        rule = getattr(coresets, select)
        pick = lambda idx, k: rule(feats[idx], k)  # noqa: E731
        examples += num_train
    else:
        logits_fn = jax.jit(lambda v, xb: _apply(setup.model, v, xb, train=False))
        logits = np.stack([over_train_set(setup, lambda xb, v=p[0]: logits_fn(v, xb))
                           for p in probes])
        scores = coresets.el2n(logits, labels)
        rule = coresets.lowest if select == "el2n_easy" else coresets.highest
        pick = lambda idx, k: rule(scores[idx], k)  # noqa: E731
        examples += nets * num_train
    idx = coresets.per_class(labels, per, setup.num_classes, pick)
    return idx, {"probe_nets": nets, "probe_epochs": epochs, "examples": int(examples)}


def random_indices(setup, seed_key, n: int) -> np.ndarray:
    """``select=random``: the stratified random draw of ``n`` training images of a seed (its root
    key ``seed_key``)."""
    pick = rng.fold(seed_key, rng.SUBSET, rng.SUBSET_PICK)
    return stratified_indices(np.asarray(setup.y_train), n, num_classes=setup.num_classes,
                              seed=int(jax.random.randint(pick, (), 0, 2**31 - 1)))


def selection(spec, ctx, n: int) -> dict:
    """The run's selection record (``indices``, ``per_class``, ``examples`` of the probes):
    read from its :data:`INDICES` file, else made (probes trained) and written once."""
    setup, select = ctx.setup, spec.opt("select") or "random"
    who = {"select": select, "n": int(n), "seed": int(ctx.seed),
           "num_train": int(setup.y_train.shape[0])}
    got = _read_record(ctx.workdir, spec.label, ctx.seed, who)
    if got is not None:
        return got
    if select == "random":
        idx, budget = random_indices(setup, ctx.seed_key, n), {"examples": 0}
    else:
        idx, budget = select_indices(select, setup, coreset_key(ctx.seed_key), n)
    labels = np.asarray(setup.y_train)[idx]
    record = dict(who, **budget, indices=idx.tolist(),
                  per_class=np.bincount(labels, minlength=setup.num_classes).tolist())
    _write_record(ctx.workdir, spec.label, ctx.seed, record)
    return record


def _read_record(workdir: str, label: str, seed: int, who: dict):
    path = os.path.join(workdir_lib.run_dir(workdir, label, seed), INDICES)
    if not os.path.exists(path):
        return None
    try:
        got = fileio.read_json(verified.run_file(workdir, label, seed, path, "subset selection"))
    except ValueError as e:  # damaged: select again, as a damaged round is recomputed
        warnings.warn(f"{e}; selecting the subset again", RuntimeWarning, stacklevel=3)
        return None
    if any(got.get(k) != v for k, v in who.items()):
        warnings.warn(f"{path} holds another selection ({ {k: got.get(k) for k in who} }); "
                      "selecting the subset again", RuntimeWarning, stacklevel=3)
        return None
    return got


def _write_record(workdir: str, label: str, seed: int, record: dict) -> None:
    d = workdir_lib.run_dir(workdir, label, seed)
    fileio.write_json(os.path.join(d, INDICES), record)
    # A run made before checksums has no manifest: recording one file there would make its
    # older, unrecorded rounds look damaged.
    if verified.made_with_checksums(workdir, label, seed):
        integrity.record(d, INDICES)


class Subset(base.Method):
    """Mask search on N real images (stratified random, or a coreset) with DP's inner loop."""
    name = "subset"
    title = "Random real subset"
    options = (base.Option("n", base.bounded_int("n (real images in the subset)", 1),
                           default=None, help="subset size (default: the distilled set's size)"),
               base.Option("select", parse_select, default=None,
                           help="how the images are chosen: " + ", ".join(coresets.SELECTIONS)))
    needs_dp = True

    def label(self, opts):
        text = f"subset_n{opts['n']}" if opts.get("n") is not None else "subset"
        return f"{text}_{opts['select']}" if opts.get("select") else text

    def describe(self, label):
        rules = "|".join(coresets.SELECTIONS[1:])
        m = re.fullmatch(rf"subset(?:_n(\d+))?(?:_({rules}))?", label)
        if m is None:
            return None
        n, select = m.groups()
        title = self.title if select is None else f"Real subset, {select}"
        return f"{title} (n={n})" if n else title

    def validate(self, spec, config, earlier):
        if not (math.isfinite(config.dp.subset_lr) and config.dp.subset_lr >= 0):
            raise ValueError(f"config.dp.subset_lr={config.dp.subset_lr!r} is invalid; allowed: "
                             "0 (DP's step size) or a number > 0")

    def validate_with_data(self, spec, config, num_train, num_classes):
        n = spec.opt("n")
        if n is None:
            n = default_size(config, num_classes)
        if n is not None and not num_classes <= n <= num_train:
            raise ValueError(f"prune.method: subset:n={n} is invalid; allowed: at least one "
                             f"image for each of the {num_classes} classes and at most the "
                             f"{num_train} training images")
        select = spec.opt("select")
        if select and n % num_classes:
            raise ValueError(f"prune.method: subset:n={n};select={select} is invalid; allowed: "
                             f"a multiple of the {num_classes} classes (select={select} takes "
                             "n / classes images of every class)")

    def plan(self, spec, ctx):
        setup, cfg = ctx.setup, ctx.config
        n = subset_size(spec, ctx)
        chosen = selection(spec, ctx, n)
        idx = jnp.asarray(np.asarray(chosen["indices"], np.int64))
        x, y = setup.x_train[idx], setup.y_train[idx]
        inner = small_set.setup_inner_train(setup, cfg.dp, subset_lr(cfg, ctx.distilled), n)
        next_mask = dp_method.small_set_next_mask(
            setup, inner, ctx.dense["variables"], x, y,
            rng.fold(ctx.seed_key, rng.SUBSET, rng.SUBSET_INNER), cfg.dp.inner_seeds)
        cost, probes = dp_method.small_set_examples(cfg.dp, n), int(chosen["examples"])
        return base.Plan(next_mask=next_mask, start_point=base.rewind_start(ctx.dense, 0),
                         search_examples=lambda rnd: cost + (probes if rnd == 1 else 0))


METHOD = Subset()
