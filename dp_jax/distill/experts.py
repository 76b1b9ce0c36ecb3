"""Expert trajectories: networks trained on real data, parameters saved after every epoch.

A buffer is a directory::

    provenance.json          what produced it (dataset, model, optimiser, augmentation, seed)
    preprocessing.npz        the input transform the experts saw (incl. ZCA matrices)
    cost.json                examples processed and wall time spent, summed over sessions
    expert_XXX/epoch_YYYY.npz  params (+ batch_stats) after epoch YYYY (0 = initialisation)
    expert_XXX/state.npz     the full training state after the last saved epoch (resume point)
    checksums.json           SHA-256 of every epoch and state file, recorded as each is written

Every epoch and state file is checked against its recorded digest before use: an expert with
a damaged, edited or unrecorded file (a kill between writing and recording) is retrained from its
init by :func:`train_experts`, with a warning (the same weights: see below); where nothing
retrains it (:func:`load_trajectories` alone) the file is refused with its path. Buffers made
before checksums existed have no manifest and are read as before.

Experts train with the repository's :class:`dp_jax.training.trainer.Trainer` (its batches depend only on
(key, step), so an expert resumed from ``state.npz`` continues exactly as if never stopped, and
asking for more epochs or more experts extends a buffer in place). Expert ``i`` uses
``fold_in(fold_in(distill_key, 0), i)``: init from ``fold_in(., 0)``, data order and
augmentation from ``fold_in(., 1)``.

Experts are trained one after another: the vmapped alternative measured slower on this CPU
whenever augmentation is on (a vmapped random op choice evaluates every op).
"""

from __future__ import annotations

import dataclasses
import io as _io
import os
import time
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dp_jax.training import optimizers
from dp_jax.storage import integrity
from dp_jax.storage import fileio
from dp_jax import masks as masks_lib
from dp_jax.training import trainer as train_lib
from dp_jax.data import stratified_indices
from dp_jax.data.augment import make_augment
from dp_jax.distill import sets as dist_lib
from dp_jax.models import ModelSpec, create_model, init_variables
from dp_jax.training.settings import TrainSettings
from dp_jax import rng

PyTree = Any
BUFFER_FORMAT = 1


def model_fields(model: ModelSpec) -> dict:
    """The architecture fields of a model spec that are set (name plus non-None fields)."""
    return model.to_dict()


def optimizer_config(dcfg) -> TrainSettings:
    """The experts' optimiser as ``optimizers.make_optimizer`` settings (constant lr)."""
    return TrainSettings.from_config(
        optimizer="sgd", lr=float(dcfg.expert_lr), momentum=float(dcfg.expert_momentum),
        weight_decay=float(dcfg.expert_weight_decay), schedule="constant", nesterov=False)


def provenance(config, dataset) -> dict:
    """What a buffer for ``config`` on ``dataset`` must have been trained with."""
    d = config.distill
    return {"format": BUFFER_FORMAT, "dataset": dataset.name,
            "data_train_size": int(config.data.train_size or 0),
            "preprocess": dataset.preprocessing["kind"],
            "image_shape": list(dataset.image_shape), "num_classes": int(dataset.num_classes),
            "model": model_fields(config.model),
            "optimizer": {"name": "sgd", "lr": float(d.expert_lr),
                          "momentum": float(d.expert_momentum),
                          "weight_decay": float(d.expert_weight_decay)},
            "batch_size": int(d.expert_batch_size), "augment": d.expert_augment,
            "expert_train_size": int(d.expert_train_size or 0), "seed": int(config.seed)}


def _npz_bytes(arrays: dict) -> bytes:
    buf = _io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _flat(tree: PyTree) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {masks_lib.path_str(p): np.asarray(v) for p, v in flat}


@dataclasses.dataclass
class Trajectories:
    """Expert parameters in memory: ``params[path]`` has shape (experts, epochs + 1, ...)."""
    params: dict[str, np.ndarray]
    batch_stats: dict[str, np.ndarray]
    like: PyTree
    like_bn: PyTree

    @property
    def num_experts(self) -> int:
        """Number of experts."""
        return next(iter(self.params.values())).shape[0]

    @property
    def num_epochs(self) -> int:
        """Number of saved epochs (the trajectory holds epochs 0..num_epochs)."""
        return next(iter(self.params.values())).shape[1] - 1

    def _tree(self, like, arrays, e, t):
        # The buffer stays in host memory (it can exceed the device's); one explicit copy of
        # the two epochs an iteration needs.
        return jax.device_put(jax.tree_util.tree_map_with_path(
            lambda p, _: arrays[masks_lib.path_str(p)][e, t], like))

    def get(self, expert: int, epoch: int) -> tuple[PyTree, PyTree]:
        """``(params, batch_stats)`` of ``expert`` after ``epoch`` epochs."""
        return (self._tree(self.like, self.params, expert, epoch),
                self._tree(self.like_bn, self.batch_stats, expert, epoch))


class ExpertBuffer:
    """Reads and writes one buffer directory (layout in the module docstring)."""

    def __init__(self, directory: str):
        self.dir = os.path.abspath(directory)

    def _expert_dir(self, i: int) -> str:
        return os.path.join(self.dir, f"expert_{i:03d}")

    def epoch_path(self, i: int, epoch: int) -> str:
        """File of expert ``i``'s parameters after ``epoch`` epochs."""
        return os.path.join(self._expert_dir(i), f"epoch_{epoch:04d}.npz")

    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self.dir)

    def _write_recorded(self, path: str, data: bytes) -> None:
        integrity.forget(self.dir, self._rel(path))
        fileio.atomic_write_bytes(path, data)
        integrity.record(self.dir, self._rel(path))

    def problem(self, path: str) -> Optional[str]:
        """Why ``path`` does not match the digest recorded at write time (None when it does, or
        for a buffer written before checksums existed)."""
        if not integrity.has_records(self.dir):
            return None
        return integrity.problem(self.dir, self._rel(path))

    def verify(self, path: str) -> None:
        """ValueError naming ``path`` when it does not match the digest recorded at write time."""
        why = self.problem(path)
        if why is not None:
            raise ValueError(f"expert file {path} is {why}; remove the buffer {self.dir} (or "
                             "that expert's directory) to retrain it, or use another "
                             "distill.buffer_dir")

    def read_provenance(self) -> Optional[dict]:
        """The stored provenance, or None for an empty buffer."""
        path = os.path.join(self.dir, "provenance.json")
        return fileio.read_json(path) if os.path.exists(path) else None

    def check(self, expected: dict, preprocessing: dict) -> None:
        """ValueError naming every field where the buffer differs from ``expected``."""
        prov = self.read_provenance()
        if prov is None:
            raise ValueError(f"expert buffer {self.dir} has no provenance.json (not a buffer?)")
        diffs = [f"{k}: buffer {prov.get(k)!r} vs config {v!r}" for k, v in expected.items()
                 if prov.get(k) != v]
        prep_path = os.path.join(self.dir, "preprocessing.npz")
        if os.path.exists(prep_path):
            with np.load(prep_path, allow_pickle=False) as z:
                stored = dist_lib.preprocessing_from_arrays({k: z[k] for k in z.files})
            diffs += [f"preprocessing {d}" for d in
                      dist_lib.compare_preprocessing(stored, preprocessing)]
        if diffs:
            raise ValueError(f"expert buffer {self.dir} does not match this config: "
                             + "; ".join(diffs) + ". Use another distill.buffer_dir or remove "
                             "the buffer to retrain the experts.")

    def initialise(self, expected: dict, preprocessing: dict) -> None:
        """Create the buffer's provenance, or check an existing one."""
        if self.read_provenance() is not None:
            self.check(expected, preprocessing)
            return
        os.makedirs(self.dir, exist_ok=True)
        fileio.atomic_write_bytes(os.path.join(self.dir, "preprocessing.npz"),
                              _npz_bytes(dist_lib.preprocessing_arrays(preprocessing)))
        fileio.write_json(os.path.join(self.dir, "provenance.json"), expected)
        integrity.record(self.dir, "provenance.json")  # a new buffer is checked from the start

    def epochs_done(self, i: int) -> int:
        """Epochs saved for expert ``i``: -1 before it starts, 0 once its init is saved."""
        path = os.path.join(self._expert_dir(i), "state.npz")
        if not os.path.exists(path):
            return -1
        why = self.problem(path)
        if why is not None:
            # Damaged, or killed between writing and recording: the expert is retrained from
            # its init (its batches depend only on (key, step), so the result is the same).
            warnings.warn(f"expert state {path} is {why}; expert {i} counts as not started "
                          "(train_experts retrains it from its init)", RuntimeWarning, stacklevel=2)
            return -1
        with np.load(path, allow_pickle=False) as z:
            return int(z["epoch"])

    def usable_epochs(self, i: int, upto: int) -> int:
        """:meth:`epochs_done`, or -1 (with a warning: expert ``i`` is to be retrained from its
        init) when one of its epoch files ``0..min(done, upto)`` is missing or damaged."""
        done = self.epochs_done(i)
        for t in range(min(done, upto) + 1):
            path = self.epoch_path(i, t)
            why = "missing" if not os.path.exists(path) else self.problem(path)
            if why is not None:
                warnings.warn(f"expert file {path} is {why}; retraining expert {i} from its "
                              "init", RuntimeWarning, stacklevel=2)
                return -1
        return done

    def save_epoch(self, i: int, epoch: int, snapshot: dict) -> None:
        """Write expert ``i``'s params (and batch stats) after ``epoch`` epochs."""
        arrays = {f"params/{k}": v for k, v in _flat(snapshot["params"]).items()}
        arrays.update({f"batch_stats/{k}": v for k, v in
                       _flat(snapshot.get("batch_stats", {})).items()})
        self._write_recorded(self.epoch_path(i, epoch), _npz_bytes(arrays))

    def save_state(self, i: int, epoch: int, state: train_lib.TrainState) -> None:
        """Write the resume point of expert ``i`` (after its epoch file)."""
        leaves = jax.device_get(jax.tree.leaves(state))
        arrays = {f"leaf_{j:05d}": np.asarray(v) for j, v in enumerate(leaves)}
        arrays["epoch"] = np.asarray(epoch)
        self._write_recorded(os.path.join(self._expert_dir(i), "state.npz"), _npz_bytes(arrays))

    def load_state(self, i: int, like: train_lib.TrainState) -> tuple[int, train_lib.TrainState]:
        """``(epoch, state)`` of expert ``i``'s resume point, shaped like ``like``."""
        path = os.path.join(self._expert_dir(i), "state.npz")
        leaves, treedef = jax.tree.flatten(like)
        self.verify(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                epoch = int(z["epoch"])
                got = [z[f"leaf_{j:05d}"] for j in range(len(leaves))]
        except Exception as e:  # zip/key errors of a damaged file
            raise ValueError(f"expert state {path} is unreadable or does not match the model: "
                             f"{e}") from e
        for j, (a, b) in enumerate(zip(got, leaves)):
            if a.shape != jnp.shape(b):
                raise ValueError(f"expert state {path}: leaf {j} has shape {a.shape}, expected "
                                 f"{jnp.shape(b)} (the buffer is for another model)")
        return epoch, jax.tree.unflatten(treedef, [jnp.asarray(a) for a in got])

    def add_cost(self, examples: int, wall_s: float, cpu_s: float = 0.0) -> None:
        """Accumulate expert-training cost."""
        cost = self.cost()
        cost["examples"] += int(examples)
        cost["wall_s"] += float(wall_s)
        cost["cpu_s"] = cost.get("cpu_s", 0.0) + float(cpu_s)
        fileio.write_json(os.path.join(self.dir, "cost.json"), cost)

    def cost(self) -> dict:
        """``{"examples", "wall_s", "cpu_s"}`` spent producing this buffer so far."""
        path = os.path.join(self.dir, "cost.json")
        return fileio.read_json(path) if os.path.exists(path) else {"examples": 0, "wall_s": 0.0}

    def load(self, num_experts: int, num_epochs: int, like_params: PyTree,
             like_bn: PyTree) -> Trajectories:
        """Epochs 0..num_epochs of experts 0..num_experts-1, stacked per parameter."""
        params: dict[str, list] = {}
        bstats: dict[str, list] = {}
        for i in range(num_experts):
            rows_p: dict[str, list] = {}
            rows_b: dict[str, list] = {}
            for t in range(num_epochs + 1):
                path = self.epoch_path(i, t)
                if os.path.exists(path):
                    self.verify(path)
                try:
                    with np.load(path, allow_pickle=False) as z:
                        arrays = {k: z[k] for k in z.files}
                except Exception as e:
                    raise ValueError(f"expert file {path} is missing or unreadable: {e}") from e
                for prefix, like, rows in (("params/", like_params, rows_p),
                                           ("batch_stats/", like_bn, rows_b)):
                    for k, leaf in _flat(like).items():
                        a = arrays.get(prefix + k)
                        if a is None or a.shape != np.shape(leaf):
                            raise ValueError(f"expert file {path}: {prefix + k} is missing or "
                                             f"has the wrong shape (buffer for another model?)")
                        rows.setdefault(k, []).append(a)
            for src, dst in ((rows_p, params), (rows_b, bstats)):
                for k, v in src.items():
                    dst.setdefault(k, []).append(np.stack(v))
        return Trajectories(params={k: np.stack(v) for k, v in params.items()},
                            batch_stats={k: np.stack(v) for k, v in bstats.items()},
                            like=like_params, like_bn=like_bn)


def expert_data(config, dataset) -> tuple[np.ndarray, np.ndarray]:
    """The experts' training set: the whole split or a stratified ``expert_train_size`` subset."""
    size = int(config.distill.expert_train_size or 0)
    if not size or size >= len(dataset.y_train):
        return dataset.x_train, dataset.y_train
    idx = stratified_indices(dataset.y_train, size, num_classes=dataset.num_classes,
                             seed=config.seed)
    return dataset.x_train[idx], dataset.y_train[idx]


def _expert_trainer(config, dataset, num_train: int):
    """``(model, optimizer, Trainer)`` of the experts' training on ``num_train`` images."""
    d = config.distill
    model = create_model(config.model, num_classes=dataset.num_classes)
    batch = int(d.expert_batch_size)
    tx = optimizers.make_optimizer(optimizer_config(d),
                                   int(d.expert_train_epochs) * (num_train // batch))
    like = jax.eval_shape(lambda k: init_variables(model, k, dataset.image_shape),
                          jax.random.key(0))
    loop = train_lib.resolve_loop(config.train.loop, like["params"], model, dataset.image_shape)
    trainer = train_lib.Trainer(model, tx, batch_size=batch, num_train=num_train, loop=loop,
                                unroll=config.train.unroll, augment=make_augment(d.expert_augment),
                                eval_batch_size=config.train.eval_batch_size)
    return model, tx, trainer


def train_experts(config, dataset, directory: str, *,
                  log: Callable[..., None] = lambda **kw: None) -> ExpertBuffer:
    """Train (or resume, or extend) ``distill.num_experts`` experts for ``distill.expert_train_epochs``.

    Args:
      config: the full config (``data``, ``model``, ``train`` for loop settings, ``distill``).
      dataset: the loaded ``Dataset`` (model input space).
      directory: the buffer directory.
      log: called with keyword metrics after every expert epoch.

    Returns:
      The buffer. Raises ValueError if ``directory`` holds a buffer made differently.
    """
    d = config.distill
    buf = ExpertBuffer(directory)
    buf.initialise(provenance(config, dataset), dataset.preprocessing)
    num, epochs = int(d.num_experts), int(d.expert_train_epochs)
    todo = {i: buf.usable_epochs(i, epochs) for i in range(num)}
    if all(done >= epochs for done in todo.values()):
        return buf
    x, y = expert_data(config, dataset)
    model, tx, trainer = _expert_trainer(config, dataset, len(y))
    batch = int(d.expert_batch_size)
    spe = len(y) // batch
    xd, yd = jnp.asarray(x), jnp.asarray(y)
    key = jax.random.fold_in(distill_key(config), rng.DISTILL_EXPERTS)
    for i, done in todo.items():
        if done >= epochs:
            continue
        ki = jax.random.fold_in(key, i)
        variables = init_variables(model, jax.random.fold_in(ki, 0), dataset.image_shape)
        state = train_lib.create_state(variables, masks_lib.ones_like(variables["params"]), tx)
        if done < 0:
            buf.save_epoch(i, 0, {"params": state.params, "batch_stats": state.batch_stats})
            buf.save_state(i, 0, state)
            done = 0
        else:
            done, state = buf.load_state(i, state)
        for e in range(done, epochs):
            t0, c0 = time.time(), time.process_time()
            end = (e + 1) * spe
            metrics = {}
            state, snaps = trainer.train(state, xd, yd, jax.random.fold_in(ki, 1), end,
                                         snapshot_steps=[end],
                                         on_epoch=lambda ep, m: metrics.update(m))
            buf.save_epoch(i, e + 1, snaps[end])
            buf.save_state(i, e + 1, state)
            wall = time.time() - t0
            buf.add_cost(spe * batch, wall, time.process_time() - c0)
            row = {"phase": "experts", "expert": i, "epoch": e + 1, "wall_s": wall, **metrics}
            if e + 1 == epochs:
                ev = trainer.evaluate(state.params, state.batch_stats, state.mask,
                                      jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test))
                row.update(test_accuracy=ev["accuracy"], test_loss=ev["loss"])
            log(**row)
    return buf


def distill_key(config) -> jax.Array:
    """The root key of everything distillation does for ``config.seed``."""
    return rng.key_for(int(config.seed), rng.DISTILL)


def load_trajectories(config, dataset, directory: str) -> Trajectories:
    """The trajectories MTT needs, after checking provenance, length and checksums.

    Raises ValueError if the buffer was made for another dataset/preprocessing/model/optimiser,
    if ``max_start_epoch + expert_epochs`` exceeds the epochs saved for some expert, or naming
    a damaged file (nothing here retrains it: :func:`train_experts` does).
    """
    d = config.distill
    buf = ExpertBuffer(directory)
    buf.check(provenance(config, dataset), dataset.preprocessing)
    need = int(d.max_start_epoch) + int(d.expert_epochs)
    for i in range(int(d.num_experts)):
        have = max(buf.epochs_done(i), 0)
        if need > have:
            raise ValueError(
                f"expert buffer {buf.dir}: expert {i} has {have} saved epochs but "
                f"distill.max_start_epoch + distill.expert_epochs = {d.max_start_epoch} + "
                f"{d.expert_epochs} = {need}; raise distill.expert_train_epochs to >= {need} or "
                "lower distill.max_start_epoch / distill.expert_epochs")
    model = create_model(config.model, num_classes=dataset.num_classes)
    like = init_variables(model, jax.random.key(0), dataset.image_shape)
    return buf.load(int(d.num_experts), need, like["params"], like.get("batch_stats", {}))
