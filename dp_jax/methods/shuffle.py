"""Random shuffling: another run's mask of each round, permuted at random within each layer.

``shuffle:of=LABEL`` keeps how many weights every layer of LABEL's round-r mask has, forgets
which ones: the "random shuffling" check of Frankle et al., ICLR 2021 ("Pruning Neural Networks
at Initialization: Why are We Missing the Mark?"). A method whose shuffled masks do as well as
its own has found per-layer densities, not weights. Each layer has one permutation per seed
(``rng.SHUFFLE`` folded with the layer's index), used for every round: the source's masks are
nested, so the shuffled ones are too. Rounds train from LABEL's own start point (the same
rewind step, the same re-init), so the mask is the only difference.

The helpers below (a source run listed before, its start point) serve ``invert`` too.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from dp_jax import masks as masks_lib
from dp_jax import rng
from dp_jax.methods import base, registry
from dp_jax.pruning.plan import TRAINED, Spec, Start, from_trained


def source_option(what: str) -> base.Option:
    """The ``of=LABEL`` option of a method built on another run."""
    return base.Option("of", str, default=None, help=f"label of the run whose {what}")


def check_source(spec: Spec, earlier: list) -> Spec:
    """The spec of ``spec``'s source run, which must be listed before it; else ValueError."""
    labels = [s.label for s in earlier]
    if spec.source is None:
        raise ValueError(f"prune.method: {spec.name} needs of=LABEL naming a run listed before "
                         f"it, e.g. {spec.name}:of={labels[0] if labels else 'imp_k0'}; runs: "
                         f"{labels + [spec.label]}")
    if spec.source not in labels:
        raise ValueError(f"prune.method: {spec.name}:of={spec.source} needs the run "
                         f"{spec.source!r} listed before it; runs: {labels + [spec.label]}")
    return earlier[labels.index(spec.source)]


def label_spec(label: str) -> Spec:
    """The spec a run label stands for, as far as the label says: the method whose label it is
    (longest name first, as the report's names), ``of=`` for a method built on another run
    (``reinit_imp_k0``), ``k=`` from a ``_kK`` suffix (``imp_k100``), else no option."""
    for m in sorted(registry.REGISTRY.values(), key=lambda m: len(m.name), reverse=True):
        if m.describe(label) is None:
            continue
        rest = label[len(m.name) + 1:]
        if rest and any(o.name == "of" for o in m.options):
            opts = {"of": rest}
        elif re.fullmatch(r"k\d+", rest):
            opts = {"k": int(rest[1:])}
        else:
            opts = {}
        return Spec(name=m.name, label=label, options=tuple(sorted(opts.items())))
    raise ValueError(f"prune.method: no registered method makes a run labelled {label!r}")


def source_start(spec: Spec) -> Start:
    """Where the source run of ``spec`` trains from, read from its label (``start`` gets the
    spec alone: the analysis and export call it without the experiment's other runs)."""
    if spec.source is None:  # no of= given: validate() refuses the entry with its own message
        return Start("rewind", 0)
    src = label_spec(spec.source)
    return registry.get(src.name).start(src)


def check_start(spec: Spec, source: Spec, start: Start) -> None:
    """Refuse a source whose start point its label does not tell (``dp:k=5`` is labelled
    ``dp``): a run built on it would train from a point other than its source's."""
    want = registry.get(source.name).start(source)
    if want != start:
        raise ValueError(f"prune.method: {spec.name}:of={source.label}: the run "
                         f"{source.label!r} trains from {start_text(want)}, which its label does "
                         f"not say (read as {start_text(start)}); allowed: a source whose label "
                         "names its rewind step (e.g. imp_kK) or that starts from the init or a "
                         "re-init")


def start_text(start: Start) -> str:
    """``'a re-init'``, ``'the init'``, ``'step K'`` (a rewind point), ... for messages."""
    if start.kind != "rewind":
        return {"reinit": "a re-init", "trained": "the previous round's training"}.get(
            start.kind, start.kind)
    return "the init" if start.step == 0 else f"step {start.step}"


def from_start(start: Start, ctx, next_mask):
    """``(next_mask, start_point)`` of a run that trains from ``start``: the dense run's weights
    at its step, the seed's re-init (the very weights ``reinit`` trains from), or the previous
    round's trained weights (learning-rate rewinding: :func:`~dp_jax.pruning.plan.from_trained`)."""
    if start.kind == TRAINED.kind:
        return from_trained(next_mask)
    if start.reinit:
        fresh = ctx.setup.init_fn(jax.random.fold_in(ctx.seed_key, rng.REINIT))
        return next_mask, lambda rnd: (fresh, 0)
    return next_mask, base.rewind_start(ctx.dense, start.step)


def describe_of(method: base.Method, label: str, title: str):
    """``'<title> <source's report name>'`` for ``<method>_<source label>``, else None."""
    prefix = method.name + "_"
    if label.startswith(prefix) and len(label) > len(prefix):
        return f"{title} {registry.pretty(label[len(prefix):])}"
    return None


def layer_permutations(mask, key: jax.Array) -> dict[str, np.ndarray]:
    """``{prunable path: permutation of its flat positions}``, layer i's from ``fold_in(key, i)``
    (i in the order of :func:`dp_jax.masks.prunable_leaves`)."""
    return {path: np.asarray(jax.random.permutation(jax.random.fold_in(key, i), np.size(leaf)))
            for i, (path, leaf) in enumerate(masks_lib.prunable_leaves(mask).items())}


def shuffle_mask(mask, perms: dict[str, np.ndarray]):
    """``mask`` with each prunable layer's flat entries permuted (``new[i] = old[perm[i]]``);
    other leaves unchanged. Per-layer counts are kept exactly."""
    new = {path: jnp.asarray(np.asarray(leaf).reshape(-1)[perms[path]].reshape(np.shape(leaf)))
           for path, leaf in masks_lib.prunable_leaves(mask).items()}
    return jax.tree_util.tree_map_with_path(
        lambda p, leaf: new.get(masks_lib.path_str(p), leaf), mask)


class Shuffle(base.Method):
    """The source run's mask of each round, permuted within each layer, from its start."""
    name = "shuffle"
    title = "Shuffled"
    options = (source_option("masks are shuffled"),)

    def label(self, opts):
        return f"shuffle_{opts['of']}" if opts.get("of") else self.name

    def describe(self, label):
        return describe_of(self, label, self.title)

    def validate(self, spec, config, earlier):
        check_start(spec, check_source(spec, earlier), self.start(spec))

    def start(self, spec):
        return source_start(spec)

    def plan(self, spec, ctx):
        like = ctx.dense["variables"]["params"]
        perms = layer_permutations(like, jax.random.fold_in(ctx.seed_key, rng.SHUFFLE))
        # The mask search is the source's (shuffling costs nothing): its examples, round by round.
        mask_of, examples = base.source_masks(self.name, spec, ctx)

        def next_mask(rnd, mask, trained):
            return shuffle_mask(mask_of(rnd), perms)
        next_mask, start_point = from_start(self.start(spec), ctx, next_mask)
        return base.Plan(next_mask=next_mask, start_point=start_point,
                         search_examples=examples)

METHOD = Shuffle()
