"""mlx-lm for real: deploy installs `mlx-lm[cpu]` into a venv on a testbed node from a wheel
folder (no index), pushes the tiny Llama (tools/make-tiny-model.py), starts the rendered
launch script under systemd, and verify proves identity (the id mlx-lm serves is the model
folder), a sane smoke answer and speed; the router on the node sends requests with that id."""

from __future__ import annotations

import json
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
    text = tb.cluster_yaml("mlx", engine) + textwrap.dedent(f"""\
        nodes:
          node1: {{address: {tb.node("node1").ip}, ram: 8GiB}}
        models:
          tiny: {{source: 'file://{tiny}/config.json', format: mlx, files: [{files}]}}
        services:
          chat: {{engine: mlx-lm, node: node1, model: tiny, port: 8080, startup_timeout: 120s}}
        router:
          node: node1
          port: 8000
          default: [chat]
          routes: {{sea: [chat]}}
          command: [/usr/bin/env, 'PYTHONPATH={_package_for_nodes()}', '{sys.executable}', -m, clusterctl.cli]
        """)
    path = tmp / "mlx.yaml"
    path.write_text(text)
    return resolve(path)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Testbed, dict[str, object], Path]]:
    tb = open_testbed(1)
    try:
        path = _inventory(tb, tmp_path_factory.mktemp("mlx"))
        code, data = deploy(path, verify=True)
        data["exit_code"] = code
        yield tb, data, path
    finally:
        tb.close()


def test_deploy_installs_mlx_lm_and_verify_passes(deployed: tuple[Testbed, dict[str, object], Path]) -> None:
    tb, data, _ = deployed
    node = data["nodes"]["node1"]  # type: ignore[index]
    assert data["exit_code"] == 0, (node["failed"], node["log_tail"], data.get("verify"))
    kinds = [s["kind"] for s in node["steps"] if s["phase"] == "acquire"]
    assert kinds == ["install-engine"] + ["push-weight"] * 4
    checks = {(c["subject"], c["name"]): (c["status"], c["detail"]) for c in data["verify"]["checks"]}  # type: ignore[index]
    assert checks[("chat", "listening")] == ("ok", "bound to 127.0.0.1")
    assert checks[("chat", "health")] == ("ok", "/v1/models 200")
    assert checks[("chat", "model")] == ("ok", f"serves '{FOLDER}'")
    assert checks[("chat", "smoke")] == ("ok", f"answer: {ANSWER!r}")
    assert checks[("chat", "speed")][0] == "ok"
    assert checks[("router", "health")][0] == "ok" and checks[("route sea", "route")] == ("ok", "-> chat")
    unit = tb.node("node1").run(["systemctl", "show", "-p", "ActiveState", "--", "clusterctl-chat.service"])
    assert unit.stdout.strip() == "ActiveState=active"


def test_the_router_sends_the_folder_id_mlx_lm_serves(deployed: tuple[Testbed, dict[str, object], Path]) -> None:
    tb, data, _ = deployed
    assert data["exit_code"] == 0
    body = json.dumps({"model": "sea", "temperature": 0, "max_tokens": 32,
                       "messages": [{"role": "user", "content": "Write one sentence about the sea."}]})
    r = tb.node("node1").run(["curl", "-sS", "-i", "-H", "Content-Type: application/json", "--data-binary", body,
                              "http://127.0.0.1:8000/v1/chat/completions"])
    head, _, payload = r.stdout.replace("\r\n", "\n").partition("\n\n")
    assert head.startswith("HTTP/1.1 200"), r.stdout + r.stderr
    assert "x-clusterctl-backend: chat" in head.lower()
    assert payload, r.stdout
    answer = json.loads(payload)
    assert answer["model"] == FOLDER and answer["choices"][0]["message"]["content"] == ANSWER


def test_a_second_deploy_changes_nothing(deployed: tuple[Testbed, dict[str, object], Path]) -> None:
    _, data, path = deployed
    assert data["exit_code"] == 0
    code, again = deploy(path)
    assert code == 0, again
    assert again["changes"] == 0

