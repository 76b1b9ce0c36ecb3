"""Seeds as one program: S seeds' trainings run as one vmapped program (``parallel.vmap_seeds``).

Round r of one method is trained for every seed at once (:meth:`dp_jax.training.trainer.Trainer.train_seeds`);
masks are still searched seed by seed (each method's own plan), and every seed keeps its own
keys, checkpoints and records, so the run directory is the one sequential seeds write (only
summary.json's ``vmap_seeds`` says how it was computed). Run i
of the group follows the trajectory it follows alone; the values agree to float tolerance (the
batched kernels sum in another order).

The group always has all S slots: after a kill, seeds that are behind run in a group padded
with copies of one of them (their results are dropped), so the compiled program, and with it
every seed's numbers, never depend on where the kill came.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from dp_jax.system import compile_time
from dp_jax.pruning import records as records_lib
from dp_jax.pruning import rounds as prune_lib
from dp_jax import rng
from dp_jax.training import trainer as train_lib

MODES = ("auto", "on", "off")


def enabled(mode: str, num_seeds: int, *, stream: bool, data_parallel: bool) -> bool:
    """Whether the seeds run as one program: ``on``/``off``, or ``auto``.

    ``auto`` is on for accelerators and off on CPU, where the suite measured S seeds' training
    as one program no faster for an MLP (0.97x for LeNet-300-100 at batch 128: its matrix
    products are large already) and 4x slower for conv nets (XLA:CPU's batched convolutions);
    off for one seed, streamed data and data-parallel runs (which ``on`` refuses).
    """
    if mode not in MODES:
        raise ValueError(f"parallel.vmap_seeds must be one of {MODES}, got {mode!r}")
    if mode == "on" and (stream or data_parallel):
        what = "data.pipeline='stream'" if stream else "parallel.data_parallel=True"
        raise ValueError(f"parallel.vmap_seeds='on' does not combine with {what}; use 'off'")
    if mode == "off" or num_seeds < 2 or stream or data_parallel:
        return False
    return mode == "on" or jax.default_backend() != "cpu"


def _fill(items: list, width: int) -> list:
    return list(items) + [items[0]] * (width - len(items))


def train_and_eval_seeds(setup: prune_lib.Setup, variables: list, masks: list, keys: list, *,
                         width: int, start_step: int = 0, snapshot_steps=(), logs: list):
    """:func:`dp_jax.pruning.rounds.train_and_eval` of ``len(variables) <= width`` runs as one program.

    Returns one ``(trained, eval_metrics, snapshots, train_metrics)`` per run.
    """
    n = len(variables)
    states = train_lib.stack([train_lib.create_state(v, m, setup.tx, start_step=start_step)
                              for v, m in zip(_fill(variables, width), _fill(masks, width))])
    last = [{} for _ in range(n)]

    def on_epoch(epoch, metrics):
        for i in range(n):
            last[i].update(metrics[i])
            setup.log_epoch(epoch=epoch, **logs[i], **metrics[i])

    states, snaps = setup.trainer.train_seeds(
        states, setup.x_train, setup.y_train, jnp.stack(_fill(keys, width)), setup.num_steps,
        snapshot_steps=snapshot_steps, on_epoch=on_epoch)
    snaps = {k: train_lib.unstack(v) for k, v in snaps.items()}
    out = []
    for i, st in enumerate(train_lib.unstack(states)[:n]):
        ev = setup.trainer.evaluate(st.params, st.batch_stats, st.mask, setup.x_test,
                                    setup.y_test)
        out.append(({"params": st.params, "batch_stats": st.batch_stats}, ev,
                    {k: v[i] for k, v in snaps.items()}, last[i]))
    return out


def run_rounds_seeds(setup: prune_lib.Setup, runs: list, denses: list, plans: list, *,
                     width: int, trains=lambda rnd: True, on_round=lambda r: None) -> list:
    """:func:`dp_jax.pruning.rounds.run_rounds` of one method for several seeds, trained as one program.

    ``runs``, ``denses`` and ``plans`` are per seed (:class:`dp_jax.pruning.rounds.Run`, the dense
    result, the method's :class:`dp_jax.methods.base.Plan`); ``trains`` as in ``run_rounds``
    (the same for every seed). Returns each seed's records.
    """
    # [mask, trained, records, next round] per seed
    at = [list(prune_lib.begin_rounds(r, d, on_round)) for r, d in zip(runs, denses)]
    keys = [rng.key_for(r.seed, rng.DATA) for r in runs]
    for rnd in range(min(a[3] for a in at), setup.rounds + 1):
        group = [i for i, a in enumerate(at) if a[3] <= rnd]
        c0, t_mask = compile_time.seconds(), {}
        for i in group:
            t0 = time.time()
            at[i][0] = jax.block_until_ready(plans[i].next_mask(rnd, at[i][0], at[i][1]))
            t_mask[i] = time.time() - t0
        points = [plans[i].start_point(rnd) for i in group]
        if len({step for _, step in points}) > 1:
            raise ValueError(f"{runs[0].spec.label}: round {rnd} starts at different steps per "
                             "seed; set parallel.vmap_seeds='off'")
        t0 = time.time()
        if trains(rnd):
            results = train_and_eval_seeds(
                setup, [v for v, _ in points], [at[i][0] for i in group],
                [keys[i] for i in group], width=width, start_step=points[0][1],
                logs=[{"run": runs[i].spec.label, "seed": runs[i].seed, "round": rnd}
                      for i in group])
        else:  # prune.evaluate skips the round: masks only, the last trained weights kept
            results = [(at[i][1], records_lib.NOT_TRAINED, {}, {}) for i in group]
        # The group's time is shared equally: per-seed costs still sum to the wall time.
        share = (time.time() - t0) / len(group)
        compile_share = (compile_time.seconds() - c0) / len(group)
        for i, (trained, ev, _, tm) in zip(group, results):
            at[i][1], at[i][3] = trained, rnd + 1
            prune_lib.finish_round(
                runs[i], rnd, at[i][0], trained, ev, tm, at[i][2], t_mask=t_mask[i],
                train_s=share, compile_s=compile_share,
                search_examples=plans[i].search_examples(rnd),
                uses_trained=plans[i].uses_trained(rnd))
            on_round(at[i][2][-1])
    return [a[2] for a in at]
