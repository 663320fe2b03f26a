"""The router's wheel: built from the running code, the same bytes for the same code, exactly
the modules the router imports, the controller's pins, a console script; installed for real
with pip into a fresh venv from the wheelhouse, its `clusterctl-router` checks a route table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import clusterctl
from clusterctl.deploy import router_wheel
from clusterctl.deploy.facts import parse_pythons
from clusterctl.inventory import load_inventory
from clusterctl.render import render
from tests import assets

ROOT = Path(__file__).resolve().parents[2]


def test_the_same_code_gives_the_same_bytes_and_the_version_names_the_code(tmp_path: Path) -> None:
    a = router_wheel.build(tmp_path / "a")
    b = router_wheel.build(tmp_path / "b")
    assert a.sha256 == b.sha256 and a.path.read_bytes() == b.path.read_bytes()
    assert a.version.startswith(f"{clusterctl.__version__}+g") and len(a.version.split("+g")[1]) == 12
    assert a.filename == f"clusterctl_router-{a.version}-py3-none-any.whl"
    assert router_wheel.build(tmp_path / "a").path == a.path  # reused, not rebuilt


def test_it_holds_the_router_and_what_it_imports_and_nothing_else(tmp_path: Path) -> None:
    wheel = router_wheel.build(tmp_path)
    with zipfile.ZipFile(wheel.path) as zf:
        names = zf.namelist()
        info = f"clusterctl_router-{wheel.version}.dist-info"
        meta = zf.read(f"{info}/METADATA").decode()
        entry = zf.read(f"{info}/entry_points.txt").decode()
    modules = sorted(n for n in names if not n.startswith(info))
    root = Path(clusterctl.__file__).parent
    assert modules == sorted(["clusterctl/__init__.py", "clusterctl/errors.py"] +
                             [f"clusterctl/{p.relative_to(root).as_posix()}" for p in (root / "router").rglob("*.py")])
    assert entry == "[console_scripts]\nclusterctl-router = clusterctl.router.cli:router_app\n"
    requires = [line.removeprefix("Requires-Dist: ") for line in meta.splitlines() if line.startswith("Requires-Dist")]
    assert [r.split(">")[0].split(";")[0].strip() for r in requires] == [
        "aiohttp", "orjson", "prometheus-client", "pydantic", "typer", "uvloop"]
    assert "Requires-Python: >=3.11" in meta and "paramiko" not in meta and "fabric" not in meta


def test_the_interpreter_probe_is_read_per_command() -> None:
    text = "/usr/bin/python3 3 11\npython3.9 3 9\n/opt/broken 0 0\ngarbage\n"
    assert parse_pythons(text) == {"/usr/bin/python3": (3, 11), "python3.9": (3, 9), "/opt/broken": (0, 0)}


@pytest.mark.real
def test_pip_installs_it_from_the_wheelhouse_alone_and_the_router_runs(tmp_path: Path) -> None:
    wheel = router_wheel.build(tmp_path / "w")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "--no-index", "--find-links", str(assets.router_wheelhouse()), str(wheel.path)], check=True)
    routes = tmp_path / "routes.json"
    inv = load_inventory(ROOT / "inventories" / "local-demo.yaml")
    routes.write_text(next(f.content for f in render(inv).files if f.path.endswith("routes.json")))
    table = json.loads(routes.read_text())
    proc = subprocess.run([str(venv / "bin/clusterctl-router"), "check", "--routes", str(routes), "--no-files"],
                          capture_output=True, text=True, check=False)
    assert (proc.returncode, proc.stdout) == (
        0, f"{routes}: ok ({len(table['backends'])} backends, {len(table['routes'])} routes, 0 rules)\n"), proc.stderr
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the venv alone, not this checkout
    imported = subprocess.run([str(venv / "bin/python"), "-c", "import clusterctl.cli"], capture_output=True,
                              text=True, check=False, env=clean)
    assert imported.returncode == 1 and "No module named 'clusterctl.cli'" in imported.stderr
