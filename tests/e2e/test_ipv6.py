"""A whole deploy over IPv6 only: two testbed nodes whose link carries IPv6 addresses and no
IPv4 at all. The controller reaches the nodes over SSH at their IPv6 addresses, llama-server
binds node2's IPv6 address, the router on node1 listens on ::1 and reaches the backend at
http://[fd..]:8080, and deploy's verify phase passes (health, model identity, a sane answer
through a question/answer chat template) through the router as well."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clusterctl.cli import app
from tests import assets
from tests.e2e.test_deploy import deploy
from tests.e2e.testbed import Testbed, TestbedFactory

pytestmark = pytest.mark.real
runner = CliRunner()

QA_TEMPLATE = ("{%- for m in messages %}Question: {{ m['content'] }}\n{% endfor -%}"
               "{%- if add_generation_prompt %}Answer:{% endif %}")


def ipv6_only(tb: Testbed) -> dict[str, str]:
    """Give the bridge and each node an address in a ULA /64 of this run, drop the nodes' IPv4
    addresses; returns node name -> IPv6 address, in the canonical form (RFC 5952: no leading
    zeros) that the inventory stores and `ss` prints, whatever the run id's digits are."""
    prefix = f"fd{tb.run_id[:2]}:{tb.run_id[2:6]}:6::"
    subprocess.run(["ip", "-6", "addr", "add", f"{prefix}1/64", "dev", tb.bridge, "nodad"], check=True)
    out: dict[str, str] = {}
    for node in tb.nodes:
        ip6 = str(ipaddress.IPv6Address(f"{prefix}{node.index + 16:x}"))
        node.run(["ip", "-6", "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad"], check=True)
        node.run(["ip", "-4", "addr", "flush", "dev", "eth0"], check=True)
        out[node.name] = ip6
    for node in tb.nodes:
        shown = node.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"], check=True)
        assert shown.stdout.strip() == "", shown.stdout
    return out


def test_deploy_and_verify_over_an_ipv6_only_link(testbed_factory: TestbedFactory, tmp_path: Path) -> None:
    tb = testbed_factory(2)
    ip6 = ipv6_only(tb)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("".join(f"{ip6[n.name]} {n.host_key}\n" for n in tb.nodes))
    key = tmp_path / "chat.key"
    key.write_text("sk-six-0123456789\n")
    key.chmod(0o600)
    template = tmp_path / "qa.jinja"
    template.write_text(QA_TEMPLATE)
    path = tmp_path / "six.yaml"
    path.write_text(textwrap.dedent(f"""\
        cluster:
          name: six
          ssh: {{user: root, key: '{tb.key_path}', known_hosts: '{known_hosts}', connect_timeout: 5s}}
          defaults: {{models_dir: /opt/models, link_speed: 1Gbit}}
          engines: {{llama_cpp: '{assets.llama_bin_dir()}', {assets.router_engine()}}}
        nodes:
          node1: {{address: '{ip6["node1"]}', ram: 4GiB}}
          node2: {{address: '{ip6["node2"]}', ram: 4GiB}}
        models:
          gemma: {{source: 'file://{assets.test_model_path()}'}}
        services:
          chat: {{engine: llama-server, node: node2, model: gemma, bind: '{ip6["node2"]}', port: 8080,
                  context: 2048, threads: 1, api_key: {{file: '{key}'}}, chat_template_file: '{template}'}}
        router: {{node: node1, bind: '::1', port: 8000, default: [chat]}}
        """))
    resolved = runner.invoke(app, ["resolve", str(path)])
    assert resolved.exit_code == 0, resolved.output

    code, data = deploy(path, verify=True)
    assert code == 0, json.dumps(data, indent=1)[-4000:]

    routes = json.loads(tb.node("node1").run(["cat", "/opt/clusterctl/router/routes.json"], check=True).stdout)
    assert (routes["listen_host"], routes["backends"]["chat"]["url"]) == ("::1", f"http://[{ip6['node2']}]:8080")
    listening = tb.node("node2").run(["ss", "-ltnH", "sport = :8080"], check=True).stdout.split()
    assert f"[{ip6['node2']}]:8080" in listening

    result = runner.invoke(app, ["verify", "--inventory", str(path), "--json", "--wait", "30"])
    assert result.exit_code == 0, result.stdout[-4000:]
    checks = {(c["subject"], c["name"]): c["status"] for c in json.loads(result.stdout)["checks"]}
    assert {k: v for k, v in checks.items() if v != "ok"} == {}
    assert checks[("chat", "health")] == "ok" and checks[("chat", "smoke")] == "ok"

    # through the router on node1's ::1 to node2 over the IPv6 link
    body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "What is the sea?"}],
                       "max_tokens": 8})
    r = tb.node("node1").run(["curl", "-sS", "--max-time", "120", "-H", "Content-Type: application/json",
                              "--data-binary", body, "http://[::1]:8000/v1/chat/completions"], check=True,
                             timeout=150)
    answer = json.loads(r.stdout)
    assert answer["choices"][0]["message"]["content"].strip(), answer
