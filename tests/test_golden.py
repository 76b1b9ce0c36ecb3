"""Regression: the smoke experiment's records (minus timings) and every mask equal, bit for bit,
the digest committed in tests/fixtures/golden_smoke.json (made by tests/scripts/golden_smoke.py
before the method registry replaced the per-method code paths)."""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "scripts"))

import golden_smoke  # noqa: E402


def test_smoke_outputs_are_bit_identical_to_fixture(tmp_path):
    with open(os.path.join(HERE, "fixtures", "golden_smoke.json")) as f:
        want = json.load(f)
    got = golden_smoke.run_golden(str(tmp_path))
    assert sorted(got["masks"]) == sorted(want["masks"])
    for name in want["masks"]:
        assert got["masks"][name] == want["masks"][name], name
    assert got["records"] == want["records"]
