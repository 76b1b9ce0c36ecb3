"""Determinism tested, not assumed: recomputing a training gives bit-identical results.

Every resume guarantee (a killed run ends with the same rounds and masks) rests on this. The
cases (tests/scripts/determinism_probe.py) run with the process's default XLA flags -- on
jaxlib 0.10.x XLA:CPU hands dots, convolutions and reductions to YNNPACK fusions (here: every
dense and patch-matrix dot; in DP's inner loop also a convolution, BatchNorm sums and pooling) --
so these tests check what users run. In one process a case's programs are built once and run
twice; the fresh processes also compile afresh. Equality is exact (np.array_equal on every
leaf), never allclose.
"""

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE = os.path.join(ROOT, "tests", "scripts", "determinism_probe.py")
sys.path.insert(0, os.path.dirname(PROBE))

import determinism_probe as probe  # noqa: E402

CONVNETS = ("convnet_batch", "convnet_instance")


@functools.cache
def _twice(case: str):
    """The case's programs built once and run twice in this process: both results."""
    run = probe.BUILDERS[case]()
    return run(), run()


def _assert_bit_identical(a, b):
    la, lb = probe.leaves(a), probe.leaves(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    differ = []
    for (path, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape, path
        if not np.array_equal(x, y):
            d = np.abs(x.astype(np.float64) - y.astype(np.float64))
            differ.append(f"{path}: {int((x != y).sum())} of {x.size} differ, max |diff| "
                          f"{float(np.nanmax(d)):.3g}")
    assert not differ, "recomputation is not bit-identical:\n" + "\n".join(differ)
    assert all(np.isfinite(x).all() for _, x in la if np.issubdtype(x.dtype, np.floating))


@pytest.fixture(scope="module")
def probe_processes():
    """Two fresh processes running the ConvNet cases, started early so that they overlap the
    in-process tests; killed if still running when the module ends."""
    cmd = [sys.executable, PROBE, *CONVNETS]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


@pytest.mark.parametrize("case", CONVNETS)
def test_convnet_training_is_bit_identical_in_one_process(case, probe_processes):
    """Training a ConvNet twice gives identical params, batch stats and optimiser state."""
    first, second = _twice(case)
    _assert_bit_identical(first, second)
    if case == "convnet_batch":
        assert probe.leaves(first["batch_stats"])  # the statistics are compared too


def test_mtt_iteration_is_bit_identical():
    """One MTT iteration run twice gives identical loss, gradients and updated images."""
    first, second = _twice("mtt")
    _assert_bit_identical(first, second)
    assert float(np.abs(np.asarray(first["grad_images"])).max()) > 0


def test_dp_inner_loop_is_bit_identical():
    """DP's inner loop run twice gives identical params and losses for every inner seed."""
    first, second = _twice("dp_inner")
    _assert_bit_identical(first, second)


def test_convnet_training_is_bit_identical_across_processes(probe_processes):
    """Two fresh processes compile and train both ConvNets to the same SHA-256 as this process."""
    digests = []
    for p in probe_processes:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        digests.append(json.loads(out.strip().splitlines()[-1]))
    here = {case: probe.digest(_twice(case)[0]) for case in CONVNETS}
    assert digests[0] == digests[1] == here, "processes disagree (SHA-256 of the trained leaves)"
