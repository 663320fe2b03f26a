"""Seed 002's shape on real engines: mlx-lm on two nodes behind the router (the seed runs exo
over two Macs; exo cannot be installed here and stays render-only, and the launchd rendering is
checked by plistlib in tests/unit/test_render.py). mlx-lm has no API key, so the second node's
instance binds its node's address behind the firewall rule its unit applies: the router's node
reaches it, any other address is dropped. The test model comes up first, as the seed's guide
says, and `verify` in the same deploy proves identity, a sane answer and every route."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import assets
from tests.e2e.test_deploy import _package_for_nodes, deploy, resolve
from tests.e2e.testbed import Testbed, open_testbed

pytestmark = pytest.mark.real
FOLDER = "/opt/models/tiny"
ANSWER = "The sea is wide and blue, and ships sail on it."


def _inventory(tb: Testbed, tmp: Path) -> Path:
    tiny = assets.tiny_model_dir()
    engine = assets.mlx_engine()
    files = ", ".join(assets.TINY_FILES)
    beta = tb.node("node2").ip
    text = tb.cluster_yaml("arthur-rdma", engine) + textwrap.dedent(f"""\
        nodes:
          node1: {{address: {tb.node("node1").ip}, ram: 8GiB}}
          node2: {{address: {beta}, ram: 8GiB}}
        models:
          tiny: {{source: 'file://{tiny}/config.json', format: mlx, files: [{files}]}}
        services:
          alpha: {{engine: mlx-lm, node: node1, model: tiny, port: 8080, startup_timeout: 120s}}
          beta: {{engine: mlx-lm, node: node2, model: tiny, port: 8080, bind: {beta}, startup_timeout: 120s}}
        router:
          node: node1
          port: 8000
          default: [alpha]
          routes: {{test: [beta, alpha]}}
          command: [/usr/bin/env, 'PYTHONPATH={_package_for_nodes()}', '{sys.executable}', -m, clusterctl.cli]
        """)
    path = tmp / "arthur-rdma.yaml"
    path.write_text(text)
    return resolve(path)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Testbed, dict[str, object]]]:
    tb = open_testbed(2)
    try:
        path = _inventory(tb, tmp_path_factory.mktemp("seed002"))
        code, data = deploy(path, verify=True)
        data["exit_code"] = code
        yield tb, data
    finally:
        tb.close()


def _ask(tb: Testbed, route: str) -> tuple[str, dict[str, object]]:
    body = json.dumps({"model": route, "temperature": 0, "max_tokens": 32,
                       "messages": [{"role": "user", "content": "Write one sentence about the sea."}]})
    r = tb.node("node1").run(["curl", "-sS", "-i", "-H", "Content-Type: application/json", "--data-binary", body,
                              "http://127.0.0.1:8000/v1/chat/completions"])
    head, _, payload = r.stdout.replace("\r\n", "\n").partition("\n\n")
    assert head.startswith("HTTP/1.1 200"), r.stdout + r.stderr
    backend = next(line.split(":", 1)[1].strip() for line in head.splitlines()
                   if line.lower().startswith("x-clusterctl-backend:"))
    return backend, json.loads(payload)


def test_both_nodes_serve_and_verify_passes_every_check(deployed: tuple[Testbed, dict[str, object]]) -> None:
    tb, data = deployed
    nodes = data["nodes"]
    assert data["exit_code"] == 0, json.dumps(nodes, indent=1)[-3000:]
    checks = {(c["subject"], c["name"]): (c["status"], c["detail"]) for c in data["verify"]["checks"]}  # type: ignore[index]
    assert checks[("alpha", "listening")] == ("ok", "bound to 127.0.0.1")
    assert checks[("beta", "listening")] == ("ok", f"bound to {tb.node('node2').ip}")
    for svc in ("alpha", "beta"):
        assert checks[(svc, "model")] == ("ok", f"serves '{FOLDER}'")
        assert checks[(svc, "smoke")] == ("ok", f"answer: {ANSWER!r}")
    assert checks[("route test", "route")] == ("ok", "-> beta")
    assert [s["kind"] for s in nodes["node2"]["steps"] if s["phase"] == "acquire"] == (  # type: ignore[index]
        ["install-engine"] + ["push-weight"] * 4)


def test_the_router_reaches_the_other_node_through_its_firewall(deployed: tuple[Testbed, dict[str, object]]) -> None:
    tb, data = deployed
    assert data["exit_code"] == 0
    backend, answer = _ask(tb, "test")
    assert backend == "beta" and answer["model"] == FOLDER
    assert answer["choices"][0]["message"]["content"] == ANSWER  # type: ignore[index]
    assert _ask(tb, "auto")[0] == "alpha"
    table = tb.node("node2").run(["nft", "list", "table", "inet", "clusterctl_beta"]).stdout
    assert f"tcp dport 8080 ip saddr {tb.node('node1').ip} accept" in table, table
    # from the machine outside the nodes (an address the rule does not name) the port is dropped
    probe = subprocess.run(["timeout", "3", "bash", "-c", f"exec 3<>/dev/tcp/{tb.node('node2').ip}/8080"],
                           check=False)
    assert probe.returncode == 124
    models = tb.node("node1").run(["curl", "-sS", "--max-time", "5", f"http://{tb.node('node2').ip}:8080/v1/models"])
    assert models.returncode == 0 and FOLDER in models.stdout
