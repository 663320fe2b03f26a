"""llama.cpp built on a node by `clusterctl deploy`, from the pinned source archive.

The real llama-cpp-python sdist (it vendors llama.cpp) is pushed over SFTP to node2, which
builds only what its service needs (rpc-server) with its own backend flags; the head on node1
(a controller-side build) offloads to it, and a completion succeeds. A second deploy builds
nothing; a flag the toolchain rejects fails the build with its log and leaves the running
worker alone.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clusterctl.cli import app
from clusterctl.deploy.desired import file_sha256
from clusterctl.engines.install import COMMON_FLAGS, build_key
from clusterctl.errors import ExitCode
from tests import assets
from tests.e2e.test_deploy import chat, deploy
from tests.e2e.testbed import Testbed

pytestmark = pytest.mark.real
runner = CliRunner()
BIN = "/opt/clusterctl/engines/llama.cpp/bin"


def _inventory(tb: Testbed, tmp: Path, extra_flags: str = "") -> Path:
    n1, n2 = tb.node("node1"), tb.node("node2")
    archive = assets.llama_source_archive()
    text = tb.cluster_yaml("build", f"llama_cpp_build: {{source: 'file://{archive}', jobs: 2{extra_flags}}}")
    text += textwrap.dedent(f"""\
        nodes:
          node1: {{address: {n1.ip}, ram: 4GiB}}
          node2: {{address: {n2.ip}, ram: 4GiB}}
        models:
          gemma: {{source: 'file://{assets.test_model_path()}'}}
        services:
          head:
            engine: llama-server
            node: node1
            model: gemma
            port: 8080
            context: 2048
            threads: 1
            rpc_workers: [rpc2]
            binary: '{assets.llama_bin_dir() / "llama-server"}'
            startup_timeout: 120s
          rpc2: {{engine: rpc-server, node: node2, port: 50052, bind: {n2.ip}, threads: 1}}
        """)
    path = tmp / "build.yaml"
    path.write_text(text)
    resolved = runner.invoke(app, ["resolve", str(path)])
    assert resolved.exit_code == 0, resolved.output
    return path


def _steps(data: dict[str, object], node: str) -> list[dict[str, object]]:
    nodes = data["nodes"]
    assert isinstance(nodes, dict)
    return list(nodes[node]["steps"])


def test_rpc_worker_built_on_its_node_from_the_pinned_source(testbed_factory: Callable[..., Testbed],
                                                             tmp_path: Path) -> None:
    tb = testbed_factory(2)
    path = _inventory(tb, tmp_path)
    archive = assets.llama_source_archive()

    code, first = deploy(path)
    assert code == 0, json.dumps(first, indent=1)
    node2 = [(s["kind"], s["target"]) for s in _steps(first, "node2") if s["phase"] == "acquire"]
    assert node2 == [("push-source", f"/opt/clusterctl/engines/llama.cpp/sources/{archive.name}"),
                     ("build-engine", BIN)]
    build = next(s for s in _steps(first, "node2") if s["kind"] == "build-engine")
    assert build["reason"] == f"rpc-server from {archive.name} (CPU, RPC): not built here yet"
    assert not [s for s in _steps(first, "node1") if s["kind"] in ("build-engine", "push-source")]

    # the worker runs the binary built on node2, recorded with its build key
    key = build_key(file_sha256(str(archive)), None, COMMON_FLAGS)
    manifest = json.loads(tb.node("node2").run(["cat", "/opt/clusterctl/state/manifest.json"]).stdout)
    entry = manifest[f"{BIN}/rpc-server"]
    assert entry["build"] == key
    node_sha = tb.node("node2").run(["sha256sum", f"{BIN}/rpc-server"]).stdout.split()[0]
    assert entry["sha256"] == node_sha
    assert tb.node("node2").run(["test", "-x", f"{BIN}/llama-server"]).returncode == 1  # not needed there
    running = tb.node("node2").run(["pgrep", "-a", "-x", "rpc-server"]).stdout
    assert f" {BIN}/rpc-server --host " in running, running
    assert chat(tb, "node1", 8080, "head")["choices"]

    code, again = deploy(path)
    assert code == 0 and again["changes"] == 0, json.dumps(again, indent=1)

    # a flag the toolchain rejects: the build fails with cmake's own words, nothing is
    # installed, and the running worker keeps serving the head
    path = _inventory(tb, tmp_path, ", cmake_flags: [-DGGML_CUDA=ON]")
    pid = tb.node("node2").run(["pgrep", "-x", "rpc-server"]).stdout.strip()
    assert pid
    code, failed = deploy(path, "node2")
    assert code == ExitCode.DEPLOY_FAILED, json.dumps(failed, indent=1)
    nodes = failed["nodes"]
    assert isinstance(nodes, dict)
    assert "cmake could not configure the build" in nodes["node2"]["failed"]
    assert "CUDA" in nodes["node2"]["log_tail"]
    assert tb.node("node2").run(["sha256sum", f"{BIN}/rpc-server"]).stdout.split()[0] == node_sha
    assert tb.node("node2").run(["pgrep", "-x", "rpc-server"]).stdout.strip() == pid
    assert chat(tb, "node1", 8080, "head")["choices"]
