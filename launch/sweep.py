r"""Local sweep runner: configs x methods x seeds, one ``python -m dp_jax.main`` process per job.

  python launch/sweep.py --configs configs/cifar_convnet.py configs/cifar_convnet.py:ipc=50 \
      --methods "imp:k=390,random" dp --seeds 0,1,2 --root runs/sweep --max_parallel 2
  python launch/sweep.py ... --dry_run          # print the commands, run nothing

Each job gets its own workdir ``ROOT/<config>[_<variant>]/<method>/seed<s>`` (``<method>`` is
omitted when ``--methods`` is not given: the config's own method list). A workdir with
``summary.json`` is finished and skipped; any other existing workdir is resumed (the
experiment restarts after its last complete round). ``--methods`` items are whole
``prune.method`` values, so ``"imp,reinit:of=imp_k0"`` keeps a re-init run with its source
and shares one dense training.

For schedulers (launch/slurm.sh): ``--emit FILE`` writes the pending jobs as JSON lines and
``--job_file FILE --job_index I`` runs line I (skipping it if it has finished meanwhile), so
array indices stay stable while jobs finish.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Optional

def _slug(text: str) -> str:
    """A directory-safe rendering of a config variant or method list."""
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "-", text).strip("-") or "default"


def config_slug(spec: str) -> str:
    """``configs/cifar_convnet.py:ipc=50`` -> ``cifar_convnet_ipc=50``."""
    path, _, variant = spec.partition(":")
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem + (f"_{_slug(variant)}" if variant else "")


def make_jobs(configs: list[str], methods: Optional[list[str]], seeds: list[int], root: str,
              overrides: list[str], python: str = sys.executable) -> list[dict]:
    """Every (config, method, seed) job as ``{"workdir", "cmd", "status"}``.

    ``status`` is ``finished`` (summary.json present), ``resume`` (workdir exists) or ``new``.
    """
    jobs = []
    for spec in configs:
        for method in (methods or [None]):
            for seed in seeds:
                parts = [root, config_slug(spec)] + ([_slug(method)] if method else [])
                workdir = os.path.join(*parts, f"seed{seed}")
                cmd = [python, "-m", "dp_jax.main", f"--config={spec}", f"--workdir={workdir}",
                       f"--config.seed={seed}", "--config.seeds=1"]
                if method:
                    cmd.append(f"--config.prune.method={method}")
                cmd += [f"--config.{o}" if not o.startswith("--") else o for o in overrides]
                if os.path.exists(os.path.join(workdir, "summary.json")):
                    status = "finished"
                elif os.path.isdir(workdir):
                    status = "resume"
                else:
                    status = "new"
                jobs.append({"workdir": workdir, "cmd": cmd, "status": status})
    return jobs


def run_jobs(jobs: list[dict], *, max_parallel: int) -> int:
    """Run the pending jobs, at most ``max_parallel`` at a time; returns the number that failed.

    Each job's output goes to ``<workdir>/sweep.log``; jobs run in the current directory,
    where the config paths were given.
    """
    pending = [j for j in jobs if j["status"] != "finished"]
    running: list[tuple[dict, subprocess.Popen, object]] = []
    failed = 0
    while pending or running:
        while pending and len(running) < max_parallel:
            job = pending.pop(0)
            os.makedirs(job["workdir"], exist_ok=True)
            log = open(os.path.join(job["workdir"], "sweep.log"), "a")
            print(f"[sweep] start ({job['status']}): {shlex.join(job['cmd'])}", flush=True)
            running.append((job, subprocess.Popen(job["cmd"], stdout=log,
                                                  stderr=subprocess.STDOUT), log))
        time.sleep(1.0)
        for item in list(running):
            job, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                ok = proc.returncode == 0
                failed += not ok
                print(f"[sweep] {'done' if ok else f'FAILED ({proc.returncode})'}: {job['workdir']}",
                      flush=True)
    return failed


def parse_seeds(text: str) -> list[int]:
    """``'0,1,2'`` or ``'0-4'`` -> list of ints."""
    seeds = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            seeds += list(range(int(lo), int(hi) + 1))
        elif part:
            seeds.append(int(part))
    return seeds


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (shared with launch/slurm.sh)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=[], help="config files, each FILE[:variant]")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="prune.method values, one job each (default: the config's own)")
    ap.add_argument("--seeds", default="0", help="e.g. 0,1,2 or 0-4 (default 0)")
    ap.add_argument("--root", default="runs/sweep", help="parent directory of the workdirs")
    ap.add_argument("--override", action="append", default=[],
                    help="extra config override, e.g. train.epochs=5 (repeatable)")
    ap.add_argument("--max_parallel", type=int, default=1, help="jobs run at once (default 1)")
    ap.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the jobs")
    ap.add_argument("--emit", help="write the pending jobs as JSON lines to this file and exit")
    ap.add_argument("--job_file", help="run one job of a file written by --emit")
    ap.add_argument("--job_index", type=int, help="line of --job_file to run (0-based)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.job_file is not None:
        if args.job_index is None:
            raise SystemExit("--job_file needs --job_index")
        with open(args.job_file) as f:
            job = json.loads(f.read().splitlines()[args.job_index])
        done = os.path.exists(os.path.join(job["workdir"], "summary.json"))
        if args.dry_run or done:
            print(("# finished, skipped: " if done else "") + shlex.join(job["cmd"]))
            return 0
        return run_jobs([dict(job, status="resume")], max_parallel=1)
    if not args.configs:
        raise SystemExit("--configs is required (or --job_file)")
    jobs = make_jobs(args.configs, args.methods, parse_seeds(args.seeds), args.root,
                     args.override, python=args.python)
    pending = [j for j in jobs if j["status"] != "finished"]
    for j in jobs:
        if j["status"] == "finished":
            print(f"# finished, skipped: {j['workdir']}", file=sys.stderr)
    if args.emit:
        os.makedirs(os.path.dirname(os.path.abspath(args.emit)), exist_ok=True)
        with open(args.emit, "w") as f:
            f.writelines(json.dumps(j) + "\n" for j in pending)
        print(len(pending))
        return 0
    if args.dry_run:
        for j in pending:
            print(("# resume\n" if j["status"] == "resume" else "") + shlex.join(j["cmd"]))
        print(f"# {len(pending)} to run, {len(jobs) - len(pending)} finished", file=sys.stderr)
        return 0
    failed = run_jobs(jobs, max_parallel=max(1, args.max_parallel))
    print(f"[sweep] {len(pending) - failed} succeeded, {failed} failed, "
          f"{len(jobs) - len(pending)} already finished", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
