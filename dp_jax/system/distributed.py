"""Multi-device and multi-host set-up: ``initialize(config)`` and process-0 helpers.

One process per host (a TPU VM worker, a SLURM task, a GPU node) runs the same
program; ``jax.distributed.initialize`` connects them so that ``jax.devices()``
lists the devices of *all* hosts and a ``Mesh`` over them spans the pod slice.
It must run before anything touches a JAX backend (even ``jax.device_count()``),
hence ``initialize`` is the first call of an experiment.

How the processes find each other (``config.parallel.multihost=True``):
  * Cloud TPU VMs, SLURM (``srun``; reads SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID,
    SLURM_LOCALID, SLURM_STEP_NODELIST), Open MPI (``mpirun``; OMPI_MCA_orte_hnp_uri ...)
    and Kubernetes JobSets are detected by JAX itself: nothing to set.
  * Anywhere else, give all three, by config or environment (config wins):
      parallel.coordinator_address  or  JAX_COORDINATOR_ADDRESS   host:port of process 0
      parallel.num_processes        or  JAX_NUM_PROCESSES         number of processes
      parallel.process_id           or  JAX_PROCESS_ID            this process, 0..n-1
    (JAX reads JAX_COORDINATOR_ADDRESS itself; the other two are read here.)
    Optional: JAX_LOCAL_DEVICE_IDS (comma-separated) restricts a process to some
    local devices, e.g. one process per GPU.

Which writes must be process-0-only. Every process computes the same replicated
results, so files written by more than one process race or duplicate:
  * config.json, metrics.jsonl, rounds.jsonl, summary.json, report.md, plots/,
    masks/*.npz, analysis/*.json, distilled.npz: process 0 only
    (``is_main_process()``; see ``main_process_only``);
  * orbax checkpoints: *every* process calls ``save``/``restore`` (orbax
    coordinates the hosts and writes each array shard once), and the checkpoint
    directory must be visible to all hosts (GCS, NFS, Filestore/gcsfuse);
  * logs and progress bars: process 0 (others may log at WARNING).
"""

from __future__ import annotations

import functools
import os
import dataclasses
from typing import Callable, ClassVar, Optional

import jax

from dp_jax.config.sections import Section

_INITIALIZED = False

ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class ParallelSettings(Section):
    """Devices, hosts and vmapped seeds (``config.parallel``)."""
    SECTION: ClassVar[str] = "parallel"
    coordinator_address: Optional[str]
    data_parallel: bool
    multihost: bool
    num_processes: Optional[int]
    process_id: Optional[int]
    vmap_seeds: str


def initialize(parallel: ParallelSettings) -> dict:
    """Connect the processes of a multi-host run when ``config.parallel.multihost`` is set.

    A no-op for single-host runs (the default) and when already initialised, so the
    notebook and tests may call it repeatedly.

    Args:
      parallel: the experiment's parallel settings; reads ``multihost`` and the optional
        ``coordinator_address``, ``num_processes``, ``process_id``.

    Returns:
      ``process_info()`` after initialisation.
    """
    global _INITIALIZED
    if not parallel.multihost or _INITIALIZED:
        return process_info()
    kwargs = {}
    address = parallel.coordinator_address
    num = parallel.num_processes
    num = os.environ.get(ENV_NUM_PROCESSES) if num is None else num
    pid = parallel.process_id
    pid = os.environ.get(ENV_PROCESS_ID) if pid is None else pid
    if address:
        kwargs["coordinator_address"] = str(address)
    if num is not None:
        kwargs["num_processes"] = int(num)
    if pid is not None:
        kwargs["process_id"] = int(pid)
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        # Initialising after a backend exists cannot work; say what to move.
        raise RuntimeError(
            "jax.distributed.initialize failed; it must run before any JAX computation "
            "(call dp_jax.system.distributed.initialize(config) first). Original error: " + str(e)) from e
    _INITIALIZED = True
    return process_info()


def process_info() -> dict:
    """``{"process_index", "process_count", "local_devices", "global_devices", "backend"}``."""
    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "local_devices": jax.local_device_count(), "global_devices": jax.device_count(),
            "backend": jax.default_backend()}


def is_main_process() -> bool:
    """True on the process that writes files (process 0)."""
    return jax.process_index() == 0


def main_process_only(fn: Callable) -> Callable:
    """Decorator: run ``fn`` on process 0 only; other processes get None."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_main_process() else None
    return wrapper


def sync(name: str) -> None:
    """Barrier across processes (e.g. after process 0 created a directory); no-op on one."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        multihost_utils.sync_global_devices(name)


def local_batch_size(global_batch_size: int, process_count: Optional[int] = None) -> int:
    """Rows of a global batch that one host feeds; raises if it does not divide evenly."""
    n = jax.process_count() if process_count is None else int(process_count)
    if global_batch_size % n:
        raise ValueError(f"config.train.batch_size={global_batch_size} is invalid; allowed: a "
                         f"multiple of the {n} processes (each host feeds an equal share)")
    return global_batch_size // n


def shutdown() -> None:
    """Disconnect from the coordinator (end of a multi-host run); no-op otherwise."""
    global _INITIALIZED
    if _INITIALIZED:
        jax.distributed.shutdown()
        _INITIALIZED = False
