"""No code from a workdir: the plugin modules a workdir's config.json names are imported by
export and analyze only when the user names them (``--plugins``) or trusts the workdir
(``--trust_workdir_plugins``) (dp_jax/tasks/settings.py from_workdir)."""

import json
import os
import subprocess
import sys
import uuid

import pytest

from conftest import ROOT
from dp_jax.config import defaults
from dp_jax.rundir import paths
from dp_jax.tasks import settings as settings_lib


def _module(tmp_path, monkeypatch):
    """A fresh module (never imported before) whose import leaves a marker file."""
    name = f"side_effect_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / f"{name}.imported"
    (tmp_path / "mods").mkdir(exist_ok=True)
    (tmp_path / "mods" / f"{name}.py").write_text(
        f"open({str(marker)!r}, 'a').write('imported\\n')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    return name, marker


def _workdir(tmp_path, **plugins):
    """A workdir's config.json (copied from anyone) naming ``plugins`` by field."""
    c = defaults.base_config().to_dict()
    c["prune"]["method"] = "imp"
    for section, modules in plugins.items():
        c[section]["plugins"] = modules
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "config.json").write_text(json.dumps(c))
    return str(wd)


def test_plugins_named_by_a_workdir_are_not_imported_unless_allowed(tmp_path, monkeypatch):
    mod, marker = _module(tmp_path, monkeypatch)
    wd = _workdir(tmp_path, prune=mod)
    with pytest.raises(ValueError) as e:
        settings_lib.from_workdir(wd)
    msg = str(e.value)
    assert "\n" not in msg and not marker.exists()
    assert f"names plugin modules {mod} (prune.plugins)" in msg
    assert f"--plugins={mod}" in msg and "--trust_workdir_plugins" in msg
    with pytest.raises(ValueError, match=f"names plugin modules {mod}"):
        settings_lib.from_workdir(wd, plugins=["something_else"])  # does not cover it
    assert not marker.exists()
    settings, raw = settings_lib.from_workdir(wd, plugins=f"{mod}")
    assert marker.read_text() == "imported\n" and [s.label for s in settings.specs] == ["imp_k0"]
    settings_lib.from_workdir(wd)  # imported now: importing it again runs nothing
    assert marker.read_text() == "imported\n"


def test_trusting_the_workdir_imports_every_field_s_plugins(tmp_path, monkeypatch):
    (a, ma), (b, mb) = _module(tmp_path, monkeypatch), _module(tmp_path, monkeypatch)
    wd = _workdir(tmp_path, data=a, model=b)
    with pytest.raises(ValueError, match=rf"{a}, {b} \(data.plugins, model.plugins\)"):
        settings_lib.from_workdir(wd, plugins=[])
    assert not ma.exists() and not mb.exists()
    settings_lib.from_workdir(wd, trust_plugins=True)
    assert ma.exists() and mb.exists()


def test_a_workdir_naming_no_plugin_needs_no_flag(tmp_path):
    settings, raw = settings_lib.from_workdir(_workdir(tmp_path))
    assert [s.label for s in settings.specs] == ["imp_k0"] and raw["prune"]["plugins"] == ""


@pytest.mark.parametrize("command", ["export", "analyze"])
def test_the_command_lines_refuse_a_copied_workdirs_plugins(tmp_path, monkeypatch, command):
    """export and analyze of a copied workdir: a one-line error, exit 2, nothing imported;
    with --plugins the command goes on (to its own error: this workdir has no runs)."""
    mod, marker = _module(tmp_path, monkeypatch)
    wd = _workdir(tmp_path, prune=mod)
    args = {"export": ["--run=imp_k0", "--seed=0", "--round=0", f"--out={tmp_path / 't.npz'}"],
            "analyze": ["--analyses=instability"]}[command]
    cmd = [sys.executable, "-m", "dp_jax.cli", command, f"--workdir={wd}"] + args
    env = dict(os.environ, JAX_PLATFORMS="cpu", DP_JAX_MALLOC_HUGETLB="0",
               PYTHONPATH=os.pathsep.join([str(tmp_path / "mods"), ROOT]))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and not marker.exists(), out.stderr
    assert err[-1].startswith(f"error: {paths.config_path(wd)} names plugin modules {mod}")
    assert "Traceback" not in out.stderr
    out = subprocess.run(cmd + [f"--plugins={mod}"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert marker.exists(), out.stderr
    assert "names plugin modules" not in out.stderr
