"""`render`: golden files for every example, determinism, and the real tools' verdicts:
systemd-analyze verify, bash -n, shellcheck, promtool, plistlib, and the real llama.cpp
binaries' --help for every flag rendered."""

from __future__ import annotations

import json
import os
import plistlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clusterctl import render as render_mod
from clusterctl.cli import app
from clusterctl.engines import launch_specs
from clusterctl.errors import ExitCode
from clusterctl.inventory import load_inventory
from clusterctl.lockfile import lock_path, metas_for, read_lock
from clusterctl.planner import make_plan
from clusterctl.render import Rendered, RenderError, render
from tests import assets

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
EXAMPLES = sorted(p.stem for p in (ROOT / "inventories").glob("*.yaml"))
UPDATE = os.environ.get("CLUSTERCTL_UPDATE_GOLDEN") == "1"
runner = CliRunner()


SPLIT = """\
cluster: {name: split}
nodes:
  a: {address: 10.1.0.1, accelerators: [{kind: cuda, count: 1, memory: 24GiB}]}
  b: {address: 10.1.0.2, accelerators: [{kind: cuda, count: 1, memory: 24GiB}]}
models:
  m: {source: hf://org/repo/m.gguf}
services:
  head: {engine: llama-server, node: a, model: m, port: 8080, rpc_workers: [wa, wb]}
  wa: {engine: rpc-server, node: a, port: 50052}
  wb: {engine: rpc-server, node: b, port: 50052, bind: 10.1.0.2}
"""


def rendered(name: str) -> Rendered:
    inv = load_inventory(ROOT / "inventories" / f"{name}.yaml")
    metas = metas_for(inv, read_lock(lock_path(ROOT / "inventories" / f"{name}.yaml")))
    return render(inv, make_plan(inv, metas))


def write(result: Rendered, root: Path) -> None:
    for f in result.files:
        path = root / f.node / f.path.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f.content)
        path.chmod(f.mode)


@pytest.mark.parametrize("name", EXAMPLES)
def test_golden_files(name: str) -> None:
    """Exactly these files with exactly this content (CLUSTERCTL_UPDATE_GOLDEN=1 rewrites them)."""
    result = rendered(name)
    root = GOLDEN / name
    if UPDATE:
        shutil.rmtree(root, ignore_errors=True)
        write(result, root)
    expected = {str(p.relative_to(root)): p.read_text() for p in root.rglob("*") if p.is_file()}
    actual = {f"{f.node}{f.path}": f.content for f in result.files}
    assert sorted(actual) == sorted(expected)
    for path, content in actual.items():
        assert content == expected[path], path


@pytest.mark.parametrize("name", EXAMPLES)
def test_rendering_is_deterministic(name: str) -> None:
    a, b = rendered(name), rendered(name)
    def key(r: Rendered) -> list[tuple[str, str, str, int]]:
        return [(f.node, f.path, f.sha256, f.mode) for f in r.files]

    assert key(a) == key(b)


def all_files() -> list[tuple[str, Rendered]]:
    return [(name, rendered(name)) for name in EXAMPLES]


@pytest.mark.real
def test_every_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """Each unit, with ExecStart pointed at its rendered script, verifies cleanly."""
    checked = 0
    for name, result in all_files():
        write(result, tmp_path / name)
        for f in result.files:
            if not f.path.endswith(".service"):
                continue
            unit = (tmp_path / name / f.node / f.path.lstrip("/")).read_text()
            script = re.search(r"^ExecStart=(\S+)", unit, re.M)
            assert script is not None
            local = tmp_path / name / f.node / script.group(1).lstrip("/")
            assert local.exists(), f"{f.path}: ExecStart names {script.group(1)}, which is not rendered"
            copy = tmp_path / "units" / name / f.node / Path(f.path).name
            copy.parent.mkdir(parents=True, exist_ok=True)
            for exec_line in re.findall(r"^Exec\w+=(\S+)", unit, re.M):
                target = tmp_path / name / f.node / exec_line.lstrip("/")
                assert target.exists(), f"{f.path}: {exec_line} is not rendered"
                unit = unit.replace(f"={exec_line}", f"={target}")
            copy.write_text(unit)
            proc = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True,
                                  check=False)
            assert proc.returncode == 0 and proc.stderr.strip() == "", f"{name} {f.node}{f.path}: {proc.stderr}"
            checked += 1
    assert checked >= 20


@pytest.mark.real
def test_every_script_passes_bash_n_and_shellcheck(tmp_path: Path) -> None:
    scripts = []
    for name, result in all_files():
        write(result, tmp_path / name)
        scripts += [tmp_path / name / f.node / f.path.lstrip("/") for f in result.files if f.path.endswith(".sh")]
    assert len(scripts) >= 20
    for script in scripts:
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text, script
        subprocess.run(["bash", "-n", str(script)], check=True)
    proc = subprocess.run(["shellcheck", "--severity=style", *map(str, scripts)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.real
def test_prometheus_configs_pass_promtool(tmp_path: Path) -> None:
    configs = 0
    for name, result in all_files():
        for f in result.files:
            if f.path.endswith("prometheus.yml"):
                path = tmp_path / f"{name}.yml"
                path.write_text(f.content)
                proc = subprocess.run(["promtool", "check", "config", "--syntax-only", str(path)],
                                      capture_output=True, text=True, check=False)
                assert proc.returncode == 0, proc.stdout + proc.stderr
                configs += 1
    assert configs == len([n for n in EXAMPLES if load_inventory(ROOT / "inventories" / f"{n}.yaml").router])


def test_launchd_plists_parse_and_run_the_script() -> None:
    result = rendered("arthur-rdma")
    plists = [f for f in result.files if f.path.endswith(".plist")]
    assert {(f.node, f.path) for f in plists} >= {("alpha", "/Library/LaunchDaemons/io.clusterctl.deepseek.plist")}
    for f in plists:
        data = plistlib.loads(f.content.encode())
        script = data["ProgramArguments"][1]
        assert data["ProgramArguments"][0] == "/bin/bash" and data["KeepAlive"] == {"SuccessfulExit": False}
        assert any(g.path == script and g.node == f.node for g in result.files)


@pytest.mark.real
def test_flags_are_known_to_the_real_binaries(tmp_path: Path) -> None:
    """Every option rendered for llama-server / rpc-server appears in the real binary's --help."""
    bins = assets.llama_bin_dir()
    helps = {
        "llama-server": subprocess.run([str(bins / "llama-server"), "--help"], stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, check=False).stdout,
        "rpc-server": subprocess.run([str(bins / "ggml-rpc-server"), "--help"], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, check=False).stdout,
    }
    checked = set()
    split = tmp_path / "split.yaml"
    split.write_text(SPLIT)
    for path in [*(ROOT / "inventories" / f"{n}.yaml" for n in EXAMPLES), split]:
        inv = load_inventory(path)
        name = path.stem
        for spec in launch_specs(inv):
            if spec.engine not in helps:
                continue
            extra = set(inv.services[spec.service].extra_args)
            for word in spec.argv[1:]:
                if word.startswith("--") and word not in extra:
                    assert re.search(rf"(^|[\s,]){re.escape(word)}([\s,=]|$)", helps[spec.engine], re.M), \
                        f"{spec.engine} does not know {word} ({name}/{spec.service})"
                    checked.add((spec.engine, word))
    assert {e for e, _ in checked} == {"llama-server", "rpc-server"}
    assert ("llama-server", "--rpc") in checked and ("llama-server", "--api-key-file") in checked


def test_no_secret_reaches_any_file(monkeypatch: pytest.MonkeyPatch) -> None:
    canary = "sk-canary-4f1b9e"
    for var in ("BEEFCAKE2_STRAND_KEY", "BEEFCAKE2_DEEPSEEK_KEY", "HF_TOKEN"):
        monkeypatch.setenv(var, canary)
    result = rendered("beefcake2")
    assert all(canary not in f.content for f in result.files)
    keyed = {(n, s.path, s.ref) for n, s in result.secrets}
    assert ("node2", "/etc/clusterctl/secrets/strand.key", "env:BEEFCAKE2_STRAND_KEY") in keyed
    script = next(f for f in result.files if f.path == "/opt/clusterctl/bin/strand.sh")
    assert "--api-key-file /etc/clusterctl/secrets/strand.key" in script.content
    assert "--api-key " not in script.content


def test_rpc_workers_start_before_their_head(tmp_path: Path) -> None:
    path = tmp_path / "split.yaml"
    path.write_text(SPLIT)
    result = render(load_inventory(path))
    unit = next(f for f in result.files if f.path == "/etc/systemd/system/clusterctl-head.service")
    assert "After=network-online.target clusterctl-wa.service" in unit.content
    assert "Wants=clusterctl-wa.service" in unit.content
    script = next(f for f in result.files if f.path == "/opt/clusterctl/bin/head.sh")
    assert "--rpc 127.0.0.1:50052,10.1.0.2:50052" in script.content
    worker = next(f for f in result.files if f.node == "b" and f.path == "/opt/clusterctl/bin/wb.sh")
    assert "--host 10.1.0.2" in worker.content


def test_template_error_names_template_and_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bad.j2").write_text("line one\n{{ missing_variable }}\n")
    monkeypatch.setattr(render_mod, "templates_dir", lambda: tmp_path)
    render_mod.environment.cache_clear()
    try:
        with pytest.raises(RenderError) as info:
            render_mod.render_template("bad.j2")
        assert info.value.message.startswith("template bad.j2:2: 'missing_variable' is undefined")
    finally:
        render_mod.environment.cache_clear()


def test_cli_render_json_and_diff(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = runner.invoke(app, ["render", str(ROOT / "inventories/bestbox.yaml"), "--out", str(out), "--json"])
    assert first.exit_code == 0, first.output
    files = json.loads(first.stdout)["files"]
    assert {f["path"] for f in files} >= {"/etc/systemd/system/clusterctl-heavy.service",
                                          "/opt/clusterctl/bin/light.sh", "/opt/clusterctl/router/routes.json"}
    assert (out / "bestbox/opt/clusterctl/bin/light.sh").stat().st_mode & 0o777 == 0o755
    same = runner.invoke(app, ["render", str(ROOT / "inventories/bestbox.yaml"), "--out", str(out), "--diff"])
    assert same.exit_code == 0 and same.stdout.strip() == "no changes"
    (out / "bestbox/opt/clusterctl/bin/light.sh").write_text("#!/usr/bin/env bash\nexit 0\n")
    changed = runner.invoke(app, ["render", str(ROOT / "inventories/bestbox.yaml"), "--out", str(out),
                                  "--diff", "--json"])
    assert changed.exit_code == ExitCode.DIFFERS == 10
    [change] = json.loads(changed.stdout)["changes"]
    assert (change["path"], change["kind"], change["restarts"]) == ("/opt/clusterctl/bin/light.sh", "changed",
                                                                   ["light"])
