"""Data parallelism: a 4-device mesh (fake CPU devices) trains to the same result as one device."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize("model,loop", [
    ("lenet_300_100", "scan"), pytest.param("convnet", "python", marks=pytest.mark.slow)])
def test_mesh_matches_single_device(model, loop):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "scripts", "mesh_equivalence.py"),
                          model, loop], env=env, capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["devices"] == 4
    assert res["max_param_diff"] < 1e-4
    assert res["acc_single"] == pytest.approx(res["acc_mesh"], abs=1 / 128 + 1e-9)
