"""`clusterctl verify` against the real testbed with real llama-server processes.

It passes what is healthy and fails, with the right reason: the real Gemma 3 270M's
degenerate answer, a stopped service, an impostor answering /health on the port, a listener on
the wrong address, and tokens/s below the stored baseline.

The GGUF carries no chat template. Through llama.cpp's built-in `gemma` template the answer has
no chat-template tokens, but this model does not follow Gemma's turns: it repeats the prompt.
Through a plain question/answer template file (pushed to the node) it answers with a sentence
about the sea, and the smoke check passes."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clusterctl.cli import app
from clusterctl.errors import ExitCode
from tests.e2e.test_deploy import deploy, inventory
from tests.e2e.testbed import Testbed

pytestmark = pytest.mark.real
runner = CliRunner()

SERVICES = """\
chat: {engine: llama-server, node: node2, model: gemma, port: 8080, context: 2048, threads: 1, chat_template: gemma}
other: {engine: llama-server, node: node2, model: gemma, port: 8081, context: 1024, threads: 1,
        chat_template_file: 'TEMPLATE'}
"""
QA_TEMPLATE = ("{%- for m in messages %}Question: {{ m['content'] }}\n{% endfor -%}"
               "{%- if add_generation_prompt %}Answer:{% endif %}")


def run_verify(path: Path, *args: str) -> tuple[int, dict[str, object]]:
    result = runner.invoke(app, ["verify", "--inventory", str(path), "node2", "--json", "--wait", "5", *args])
    return result.exit_code, json.loads(result.stdout)


def checks(data: dict[str, object]) -> dict[tuple[str, str], tuple[str, str]]:
    items = data["checks"]
    assert isinstance(items, list)
    return {(c["subject"], c["name"]): (c["status"], c["detail"]) for c in items}


def test_verify_on_real_services(testbed3: Testbed, tmp_path: Path) -> None:
    template = tmp_path / "qa.jinja"
    template.write_text(QA_TEMPLATE)
    path = inventory(testbed3, tmp_path, SERVICES.replace("TEMPLATE", str(template)))
    code, _ = deploy(path, "node2")
    assert code == 0
    node = testbed3.node("node2")
    pushed = node.run(["cat", "/opt/clusterctl/templates/other.jinja"], check=True)
    assert pushed.stdout == QA_TEMPLATE

    junit = tmp_path / "verify.xml"
    code, data = run_verify(path, "--junit", str(junit))
    got = checks(data)
    assert code == ExitCode.VERIFY_FAILED
    for service in ("chat", "other"):
        assert got[(service, "listening")][0] == "ok"
        assert got[(service, "health")] == ("ok", "/health 200")
        assert got[(service, "model")] == ("ok", f"serves '{service}'")
        assert got[(service, "speed")][0] == "ok"
    # the gemma template: no ChatML tokens any more, but the model echoes the prompt
    status, detail = got[("chat", "smoke")]
    assert status == "fail", detail
    assert detail.startswith("degenerate repetition: ") and "; repeats the prompt (" in detail, detail
    assert "chat-template tokens" not in detail and "<|im_end|>" not in detail
    # the question/answer template file: a sane answer
    assert got[("other", "smoke")] == ("ok", "answer: 'The sea is a natural and natural environment. It is a "
                                             "source'")
    suites = ET.parse(junit).getroot()
    assert [s.get("name") for s in suites] == ["node2"] and suites[0].get("failures") == "1"
    measured = data["measurements"]
    assert isinstance(measured, dict) and measured["chat"]["tokens_per_second"] > 1

    # a baseline far above what this machine does: speed fails with the measured figure
    tps = measured["chat"]["tokens_per_second"]
    path.with_name(f".{path.stem}.baselines.json").write_text(
        json.dumps({"services": {"chat": {"tokens_per_second": tps * 10}}}))
    _, data = run_verify(path)
    status, detail = checks(data)[("chat", "speed")]
    assert status == "fail" and "below the baseline" in detail

    # stopped: nothing listens
    node.run(["systemctl", "stop", "clusterctl-other.service"], check=True)
    _, data = run_verify(path)
    assert checks(data)[("other", "listening")] == ("fail", "nothing listens on port 8081")

    # an impostor on the port that answers /health: caught by the model identity check
    impostor = ("import http.server as h\n"
                "class H(h.BaseHTTPRequestHandler):\n"
                "    def do_GET(self):\n"
                "        body = b'{\"data\": [{\"id\": \"not-chat\"}]}' if 'models' in self.path else b'{}'\n"
                "        self.send_response(200); self.end_headers(); self.wfile.write(body)\n"
                "h.HTTPServer(('0.0.0.0', 8081), H).serve_forever()\n")
    node.run(["systemd-run", "--unit", "cct-impostor", "python3", "-c", impostor], check=True)
    try:
        node.wait_for_port(8081)
        _, data = run_verify(path)
        got = checks(data)
        assert got[("other", "listening")] == ("fail", "bound to 0.0.0.0, inventory says 127.0.0.1")
        assert got[("other", "health")][0] == "ok"
        status, detail = got[("other", "model")]
        assert status == "fail" and "not-chat" in detail and "another process" in detail
    finally:
        node.run(["systemctl", "stop", "cct-impostor"])
    node.run(["systemctl", "start", "clusterctl-other.service"], check=True)
