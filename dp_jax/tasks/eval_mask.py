"""Evaluate a mask file from elsewhere under a config's training recipe (``dp-jax eval-mask``).

The mask (an npz of bool arrays keyed by '/'-joined parameter path, as
:func:`dp_jax.masks.save` writes) is checked against the config's model, applied to the
seed's init (``rng.INIT``; ``rng.REINIT`` with ``start='reinit'``) and trained on the real
training set exactly as a pruning round is (:func:`dp_jax.pruning.rounds.train_and_eval` with the
seed's ``rng.DATA`` key), so a mask the experiment evaluated gets the same test accuracy.
The result goes to ``<workdir>/eval_mask.json``.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import logging

from dp_jax.storage import integrity
from dp_jax.storage import fileio, npz
from dp_jax import masks as masks_lib
from dp_jax.pruning import rounds as prune_lib
from dp_jax import rng
from dp_jax.pruning import setup as setup_lib
from dp_jax.tasks import settings as validate_lib
from dp_jax.rundir import lock as lock_lib
from dp_jax.rundir import paths as workdir_lib
from dp_jax.rundir import verified
from dp_jax.models import is_prunable

STARTS = {"init": rng.INIT, "reinit": rng.REINIT}


def result_path(workdir: str) -> str:
    """Where :func:`evaluate_mask` writes its result."""
    return workdir_lib.eval_mask_path(workdir)


sha256 = integrity.digest  # hex SHA-256 of a file's bytes


def _names(keys, limit: int = 4) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(repr(k) for k in keys[:limit]) + more


def check_mask_file(path: str, like) -> None:
    """Raise ValueError (one line) unless ``path`` is a mask for the params-shaped ``like``.

    Every problem is named: missing, extra, mis-shaped and non-bool entries, and pruned
    entries of parameters that are never pruned (biases, normalisation scales). A mask of a
    workdir's run must first match its run's checksum (:func:`verified.any_mask`).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"mask file {path} not found")
    arrays = npz.read(verified.any_mask(path), "mask file")
    flat = jax.tree_util.tree_flatten_with_path(like)[0]
    want = {masks_lib.path_str(p): (tuple(np.shape(v)), is_prunable(p, v))
            for p, v in flat}
    problems = []
    if set(want) - set(arrays):
        problems.append(f"missing {_names(set(want) - set(arrays))}")
    if set(arrays) - set(want):
        problems.append(f"extra {_names(set(arrays) - set(want))}")
    common = sorted(set(want) & set(arrays))
    shape = [f"{k!r} {arrays[k].shape} (expected {want[k][0]})" for k in common
             if arrays[k].shape != want[k][0]]
    if shape:
        problems.append("wrong shape " + ", ".join(shape[:4]))
    dtype = [f"{k!r} {arrays[k].dtype}" for k in common if arrays[k].dtype != np.bool_]
    if dtype:
        problems.append("not bool " + ", ".join(dtype[:4]))
    never = [k for k in common if not want[k][1] and arrays[k].dtype == np.bool_
             and arrays[k].shape == want[k][0] and not arrays[k].all()]
    if never:
        problems.append(f"pruned entries in never-pruned parameters {_names(never)}")
    if problems:
        raise ValueError(f"mask file {path} does not fit the model: " + "; ".join(problems)
                         + f" (the model has {len(want)} entries: {_names(want, 3)})")


def check_keeps_weights(path: str, mask) -> None:
    """Refuse a mask that prunes every weight (one line); warn for layers it empties (the
    network is then disconnected, as prune.on_empty_layer='warn' allows)."""
    alive, total = masks_lib.count(mask)
    if alive == 0:
        raise ValueError(f"mask file {path} keeps none of the {total} prunable weights; "
                         "allowed: a mask that keeps at least one weight of every prunable layer")
    empty = [k for k, v in masks_lib.prunable_leaves(mask).items() if not np.asarray(v).any()]
    if empty:
        logging.warning("mask file %s keeps no weight of layer(s) %s: the network is "
                        "disconnected", path, _names(empty))


@lock_lib.holding("workdir")  # it writes eval_mask.json into the workdir
def evaluate_mask(config, mask_path: str, workdir: str, *, seed: int | None = None,
                  start: str = "init") -> dict:
    """Train the masked init of ``seed`` under ``config`` and test it; writes eval_mask.json.

    Args:
      config: an experiment config (its ``data``, ``model`` and ``train`` sections are used).
      mask_path: the mask file.
      workdir: where ``eval_mask.json`` goes (created if needed).
      seed: the seed whose init and data order are used (default ``config.seed``).
      start: ``'init'`` (the seed's ``rng.INIT`` key) or ``'reinit'`` (its ``rng.REINIT``).

    Returns:
      The written record: mask path and sha256, sparsity, test accuracy and loss, config.
    """
    if start not in STARTS:
        raise ValueError(f"--start={start!r} is invalid; allowed: {', '.join(STARTS)}")
    seed = int(config.seed if seed is None else seed)
    if seed < 0:
        raise ValueError(f"--seed={seed} is invalid; allowed: an integer >= 0")
    settings = validate_lib.parse(config)
    dataset = setup_lib.load_data(settings)
    validate_lib.validate_with_data(settings, dataset)
    setup = setup_lib.build_setup(settings, dataset)
    like = jax.eval_shape(setup.init_fn, jax.random.key(0))["params"]
    check_mask_file(mask_path, like)  # before any compilation or training
    mask = masks_lib.load(mask_path, like)
    check_keeps_weights(mask_path, mask)
    t0 = time.time()
    variables = setup.init_fn(rng.key_for(seed, STARTS[start]))
    _, ev, _, tm = prune_lib.train_and_eval(setup, variables, mask, rng.key_for(seed, rng.DATA))
    alive, total = masks_lib.count(mask)
    result = {"mask": os.path.abspath(mask_path), "mask_sha256": sha256(mask_path),
              "seed": seed, "start": start, "sparsity": masks_lib.sparsity(mask),
              "remaining_weights": alive, "prunable_weights": total,
              "test_accuracy": ev["accuracy"], "test_loss": ev["loss"],
              "train_accuracy": tm.get("accuracy"),
              "train_examples": setup.num_steps * setup.trainer.batch_size,
              "wall_s": time.time() - t0, "config": config.to_dict()}
    os.makedirs(workdir, exist_ok=True)
    fileio.write_json(result_path(workdir), result)
    return result
