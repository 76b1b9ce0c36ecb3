"""Regression: every mask of the smoke experiment equals, bit for bit, the digest committed in
tests/fixtures/golden_smoke.json (made by tests/scripts/golden_smoke.py before the method
registry replaced the per-method code paths), and so do its records (minus timings) — except
the float32 losses, which another CPU's kernels may sum in another order (seen: 3e-7 relative)."""

import json
import math
import os
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/
sys.path.insert(0, os.path.join(HERE, "scripts"))

import golden_smoke  # noqa: E402


def test_smoke_outputs_are_bit_identical_to_fixture(tmp_path):
    with open(os.path.join(HERE, "fixtures", "golden_smoke.json")) as f:
        want = json.load(f)
    got = golden_smoke.run_golden(str(tmp_path))
    assert sorted(got["masks"]) == sorted(want["masks"])
    for name in want["masks"]:
        assert got["masks"][name] == want["masks"][name], name
    assert len(got["records"]) == len(want["records"])
    for g, w in zip(got["records"], want["records"]):
        assert sorted(g) == sorted(w)
        for key, value in w.items():
            if key.endswith("_loss"):
                assert math.isclose(g[key], value, rel_tol=1e-5), (w["method"], w["round"], key)
            else:  # counts, sparsities and accuracies: exact
                assert g[key] == value, (w["method"], w["round"], key)
