"""Training from a host stream of minibatches (``data.pipeline='stream'``): a part of
:class:`dp_jax.training.trainer.Trainer`, kept apart because only streamed datasets use it."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dp_jax.training.outputs import check_finite, snapshot

PyTree = Any


class StreamTraining:
    """:class:`dp_jax.training.trainer.Trainer`'s methods for streamed batches (one jitted step each)."""

    def _global_batch(self, a: np.ndarray) -> jax.Array:
        """This host's rows -> one array sharded over the 'data' axis of every host's devices."""
        if self.mesh is None:
            return jnp.asarray(a)
        spec = P("data", *([None] * (a.ndim - 1)))
        return jax.make_array_from_process_local_data(NamedSharding(self.mesh, spec), a)

    def train_stream(self, state, batches, key: jax.Array, num_steps: int, *,
                     snapshot_steps: Iterable[int] = (),
                     on_epoch: Optional[Callable[[int, dict], None]] = None):
        """Like :meth:`train`, reading each step's minibatch from ``batches``.

        ``batches`` yields objects with ``step``, ``x`` and ``y`` (this host's rows of the
        global batch; ``dp_jax.data.pipeline.HostIterator``) for the global steps
        ``state.step, state.step + 1, ...``; it decides data order and augmentation, so
        ``key`` only seeds the step's own randomness. Always a Python loop over one jitted
        step (the host feeds each step). Returns ``(state, snapshots)`` as :meth:`train`.
        """
        S = self.steps_per_epoch
        t = int(state.step)
        state = self._replicate(state)
        wanted = sorted({int(s) for s in snapshot_steps if t <= int(s) <= num_steps})
        snaps = {t: snapshot(state)} if t in wanted else {}
        epoch_metrics, first = [], t
        try:
            for batch in batches:
                if t >= num_steps:
                    break
                if int(batch.step) != t:
                    raise ValueError(f"streamed batch of step {batch.step} arrived at step {t}")
                state, m = self._step_batch(state, self._global_batch(batch.x),
                                            self._global_batch(batch.y), key)
                epoch_metrics.append(jax.tree.map(lambda v: v[None], m))
                t += 1
                if t in wanted:
                    snaps[t] = snapshot(state)
                if t % S == 0 or t == num_steps:
                    if on_epoch is not None and epoch_metrics:
                        stacked = jax.tree.map(lambda *v: jnp.concatenate(v), *epoch_metrics)
                        on_epoch((t - 1) // S, check_finite(stacked, first, t))
                    epoch_metrics, first = [], t
        finally:
            if hasattr(batches, "close"):
                batches.close()
        if t < num_steps:
            raise ValueError(f"the batch stream ended at step {t}, before step {num_steps}")
        return state, snaps

    def evaluate_stream(self, params: PyTree, batch_stats: PyTree, mask: PyTree,
                        batches, num_examples: int) -> dict:
        """Accuracy and loss over streamed ``(x, y, weight)`` host shards (weight 0 = padding)."""
        params, batch_stats, mask = self._replicate((params, batch_stats, mask))
        totals = None
        for x, y, w in batches:
            out = self._eval(params, batch_stats, mask, self._global_batch(x),
                             self._global_batch(y), self._global_batch(w))
            totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        totals = jax.device_get(totals)
        return {"accuracy": float(totals["correct"] / num_examples),
                "loss": float(totals["loss"] / num_examples)}
