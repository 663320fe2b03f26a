"""pip-installed engines (vLLM, mlx-lm, exo) on a real node: a venv per pinned requirement,
created by the node's python and filled by real pip from a wheel folder (no index: the node
is offline), behind a symlink that switches only once the install succeeded.

vLLM itself cannot run here (no GPU) and is not on the machine, so the installs use a small
real package with a console script (`wheel`, two releases); the install path is the one
deploy runs for every engine, over real SSH.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clusterctl.cli import app
from clusterctl.deploy.desired import DeployError
from clusterctl.deploy.executor import NullReporter
from clusterctl.deploy.model import Desired
from clusterctl.deploy.rollout import NodeRun
from clusterctl.engines.install import VenvInstall, venv_install
from clusterctl.errors import ExitCode
from clusterctl.inventory import PythonEngine, load_inventory
from clusterctl.transport.connect import connect
from tests import assets
from tests.e2e.test_deploy import deploy
from tests.e2e.testbed import Testbed

pytestmark = pytest.mark.real
runner = CliRunner()
LINK = "/opt/clusterctl/engines/vllm"


def _inventory(tb: Testbed, tmp: Path, requirement: str) -> Path:
    engine = f"vllm: {{requirement: '{requirement}', python: /usr/bin/python3, find_links: '{assets.wheelhouse()}'}}"
    text = tb.cluster_yaml("venv", engine) + textwrap.dedent(f"""\
        nodes:
          node1: {{address: {tb.node("node1").ip}, ram: 8GiB}}
        models:
          gemma: {{source: 'file://{assets.test_model_path()}'}}
        services:
          big: {{engine: vllm, node: node1, model: gemma, port: 8000, context: 2048}}
        """)
    path = tmp / "venv.yaml"
    path.write_text(text)
    resolved = runner.invoke(app, ["resolve", str(path)])
    assert resolved.exit_code == 0, resolved.output
    return path


def test_an_engine_without_its_executable_is_refused_and_nothing_is_switched(
        testbed_factory: Callable[..., Testbed], tmp_path: Path) -> None:
    tb = testbed_factory(1)
    path = _inventory(tb, tmp_path, "wheel==0.45.1")
    code, data = deploy(path)
    assert code == ExitCode.DEPLOY_FAILED, json.dumps(data, indent=1)
    node = data["nodes"]["node1"]  # type: ignore[index]
    assert [s["kind"] for s in node["steps"] if s["phase"] == "acquire"] == ["install-engine", "push-weight"]
    assert node["steps"][0]["reason"] == "wheel==0.45.1: not installed"
    assert node["failed"].startswith("node1: installing vllm failed: wheel==0.45.1 has no vllm executable")
    listing = tb.node("node1").run(["ls", "-A", "/opt/clusterctl/engines"])
    assert listing.stdout.split() == [v for v in listing.stdout.split() if v.endswith(".log")]  # no venv, no link
    assert tb.node("node1").run(["test", "-e", "/opt/models/gemma/gemma-3-270m-q4_k_m.gguf"]).returncode == 1
    assert tb.node("node1").run(["test", "-e", "/opt/clusterctl/bin/big.sh"]).returncode == 1  # stopped there


def _install(run: NodeRun, requirement: str, find_links: str) -> VenvInstall:
    inv_node = run.inv.nodes["node1"]
    v = venv_install(inv_node, "vllm", PythonEngine(requirement=requirement, python="/usr/bin/python3",
                                                     find_links=find_links))
    v = dataclasses.replace(v, binary=f"{v.link}/bin/wheel")  # the executable this package provides
    run.executor().install(v)
    return v


def test_upgrades_switch_the_link_keep_one_back_and_a_failed_one_changes_nothing(
        testbed_factory: Callable[..., Testbed], tmp_path: Path) -> None:
    tb = testbed_factory(1)
    node = tb.node("node1")
    inv = load_inventory(_inventory(tb, tmp_path, "wheel==0.44.0"))
    wheels = str(assets.wheelhouse())
    transport = connect("node1", inv.nodes["node1"], inv.cluster.ssh)
    try:
        run = NodeRun(inv, Desired(node="node1", base="/opt/clusterctl", manager="systemd"), transport,
                       NullReporter(), {})

        def serving() -> tuple[str, str]:
            link = node.run(["readlink", LINK]).stdout.strip()
            version = node.run([f"{LINK}/bin/wheel", "version"]).stdout.strip()
            return link, version

        v1 = _install(run, "wheel==0.44.0", wheels)
        assert serving() == (v1.venv.rsplit("/", 1)[-1], "wheel 0.44.0")
        manifest = json.loads(node.run(["cat", "/opt/clusterctl/state/manifest.json"]).stdout)
        assert manifest[LINK] == {"venv": v1.key, "requirement": "wheel==0.44.0"}

        v2 = _install(run, "wheel==0.45.1", wheels)
        assert serving() == (v2.venv.rsplit("/", 1)[-1], "wheel 0.45.1")
        assert node.run(["test", "-d", v1.venv]).returncode == 0  # one back is kept

        with pytest.raises(DeployError, match=r"installing vllm failed: pip could not install wheel==9\.9\.9"):
            _install(run, "wheel==9.9.9", wheels)
        assert "9.9.9" in run.result.log_tail
        assert serving() == (v2.venv.rsplit("/", 1)[-1], "wheel 0.45.1")  # the old one still serves

        v3 = _install(run, "wheel==0.44.0", wheels + "/")  # another key: a new venv
        assert serving() == (v3.venv.rsplit("/", 1)[-1], "wheel 0.44.0")
        venvs = sorted(node.run(["find", "/opt/clusterctl/engines", "-maxdepth", "1", "-type", "d",
                                 "-name", "vllm-*"]).stdout.split())
        assert venvs == sorted([v2.venv, v3.venv])  # v1 (two back) and the failed one are gone
    finally:
        transport.close()


def test_pypis_exo_is_installed_for_real_and_refused_as_another_project(
        testbed_factory: Callable[..., Testbed], tmp_path: Path) -> None:
    tb = testbed_factory(1)
    wheels = assets.wheelhouse() / "exo-pypi"
    engine = f"exo: {{requirement: 'exo==0.1.2', python: /usr/bin/python3, find_links: '{wheels}'}}"
    text = tb.cluster_yaml("namesake", engine) + textwrap.dedent(f"""\
        nodes:
          node1: {{address: {tb.node("node1").ip}, ram: 8GiB}}
        models:
          tiny: {{source: 'file://{assets.tiny_model_dir()}/config.json', format: mlx,
                  files: [{", ".join(assets.TINY_FILES)}]}}
        services:
          swarm: {{engine: exo, node: node1, model: tiny, port: 52415}}
        """)
    path = tmp_path / "namesake.yaml"
    path.write_text(text)
    assert runner.invoke(app, ["resolve", str(path)]).exit_code == 0
    code, data = deploy(path)
    assert code == ExitCode.DEPLOY_FAILED, json.dumps(data, indent=1)
    node = data["nodes"]["node1"]  # type: ignore[index]
    assert node["failed"].startswith(
        "node1: installing exo failed: exo==0.1.2 is another project of the same name: its exo runs "
        "exo.cli:main, exo's runs exo.main:main")
    listing = tb.node("node1").run(["ls", "-A", "/opt/clusterctl/engines"]).stdout.split()
    assert [e for e in listing if not e.endswith(".log")] == []  # the venv removed, no link made
    assert tb.node("node1").run(["test", "-e", "/opt/clusterctl/bin/swarm.sh"]).returncode == 1
