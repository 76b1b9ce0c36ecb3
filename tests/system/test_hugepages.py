"""The entry points re-run themselves once with transparent huge pages for malloc."""

import os
import subprocess
import sys

import pytest

from dp_jax.system import hugepages

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE = ("import os, sys; from dp_jax.system import hugepages; print('start', flush=True); "
         "hugepages.reexec(); print('args', sys.argv[1:], os.environ.get('GLIBC_TUNABLES'))")


def _run(env):
    env = {k: v for k, v in dict(os.environ, **env).items() if v is not None}
    out = subprocess.run([sys.executable, "-c", PROBE, "a", "--b=1"], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


@pytest.mark.skipif(not hugepages.wanted({}), reason="glibc tunables exist on Linux/glibc only")
def test_reexec_once_with_the_tunable_and_the_same_arguments():
    env = {"GLIBC_TUNABLES": None, hugepages.ENV_SWITCH: None}
    lines = _run(env)
    # Ran twice (the second time with the tunable), then went on with the same arguments.
    assert lines == ["start", "start", "args ['a', '--b=1'] glibc.malloc.hugetlb=1"]
    lines = _run({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", hugepages.ENV_SWITCH: None})
    assert lines[-1].endswith("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    assert _run({"GLIBC_TUNABLES": None, hugepages.ENV_SWITCH: "0"}) == [
        "start", "args ['a', '--b=1'] None"]
