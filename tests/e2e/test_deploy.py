"""`clusterctl deploy` on the real testbed: nodes with systemd and sshd in their own network
namespaces, reached over real SSH with strict host keys; real llama.cpp binaries and the real
Gemma 3 270M model, pushed over SFTP.

1. seed 000's shape: a head llama-server on node1 using rpc-server workers on node2 and
   node3, and the router on node1; a completion through the router succeeds; each worker's
   firewall accepts its port from the head's node and drops it from the other worker's;
2. a second deploy changes nothing; a dry run writes nothing;
3. seed 004's shape: two llama-servers on one node (8080 and 8081);
4. a bad change (a flag the engine rejects) is rolled back and the old service keeps answering.
"""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clusterctl.cli import app
from clusterctl.deploy import router_wheel
from clusterctl.errors import ExitCode
from tests import assets
from tests.e2e.testbed import Testbed

pytestmark = pytest.mark.real
runner = CliRunner()
VOLATILE = ("var/log", "var/lib/systemd", "var/cache", "var/tmp", "root/.cache", "var/lib/private")


def inventory(tb: Testbed, tmp: Path, services: str, router: str = "") -> Path:
    n1, n2, n3 = (tb.node(f"node{i}") for i in (1, 2, 3))
    text = textwrap.dedent(f"""\
        cluster:
          name: testbed
          ssh: {{user: root, key: '{tb.key_path}', known_hosts: '{tb.known_hosts}', connect_timeout: 5s}}
          defaults: {{models_dir: /opt/models, link_speed: 1Gbit}}
          engines: {{llama_cpp: '{assets.llama_bin_dir()}', {assets.router_engine()}}}
        nodes:
          node1: {{address: {n1.ip}, ram: 4GiB}}
          node2: {{address: {n2.ip}, ram: 4GiB}}
          node3: {{address: {n3.ip}, ram: 4GiB}}
        models:
          gemma: {{source: 'file://{assets.test_model_path()}'}}
        services:
        """) + textwrap.indent(textwrap.dedent(services), "  ") + textwrap.dedent(router)
    path = tmp / "testbed.yaml"
    path.write_text(text)
    resolved = runner.invoke(app, ["resolve", str(path)])
    assert resolved.exit_code == 0, resolved.output
    return path


SEED000 = """\
head:
  engine: llama-server
  node: node1
  model: gemma
  port: 8080
  context: 4096
  threads: 1
  rpc_workers: [rpc2, rpc3]
  startup_timeout: 120s
  chat_template_file: 'QA_TEMPLATE'
rpc2: {engine: rpc-server, node: node2, port: 50052, bind: NODE2, threads: 1}
rpc3: {engine: rpc-server, node: node3, port: 50052, bind: NODE3, threads: 1}
"""

def _package_for_nodes() -> Path:
    """A copy of the clusterctl package where the router's unit on a node can import it: the
    checkout may live under /tmp, which nodes cover with a tmpfs and units with PrivateTmp."""
    import atexit
    import os
    import shutil

    import clusterctl

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    target = cache / "clusterctl" / f"router-package-{os.getpid()}"
    if not (target / "clusterctl").exists():
        shutil.copytree(Path(clusterctl.__file__).parent, target / "clusterctl",
                        ignore=shutil.ignore_patterns("__pycache__"))
        atexit.register(shutil.rmtree, target, True)
    return target


ROUTER = f"""\
router:
  node: node1
  port: 8000
  default: [head]
  routes: {{analyze: [head]}}
  command: [/usr/bin/env, 'PYTHONPATH={_package_for_nodes()}', '{sys.executable}', -m, clusterctl.cli]
"""


# the router as a user deploys it: no `command`, deploy installs it (cluster.engines.router)
ROUTER_INSTALLED = """\
router:
  node: node1
  port: 8000
  default: [head]
  routes: {analyze: [head]}
"""


NO_VERIFY = ("--phase", "acquire", "--phase", "router", "--phase", "services")


def resolve(path: Path) -> Path:
    """`clusterctl resolve`: pin the models' metadata in the lock file, as a user does before deploy."""
    resolved = runner.invoke(app, ["resolve", str(path)])
    assert resolved.exit_code == 0, resolved.output
    return path


def deploy(path: Path, *args: str, verify: bool = False) -> tuple[int, dict[str, object]]:
    """Deploy, by default without the verify phase (tests/e2e/test_verify.py covers it: the real
    Gemma 270M's degenerate answers make it fail, as they should)."""
    result = runner.invoke(app, ["deploy", "--inventory", str(path), "--json", *(() if verify else NO_VERIFY), *args])
    try:
        data = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"deploy printed no JSON (exit {result.exit_code}):\n{result.output}")
    return result.exit_code, data


def snapshot(tb: Testbed) -> dict[str, str]:
    """Every file each node has written to its overlay, with its hash (volatile dirs aside)."""
    out = {}
    for node in (tb.node(f"node{i}") for i in (1, 2, 3)):
        upper = node.dir / "rw" / "upper"
        for path in sorted(upper.rglob("*")):
            rel = path.relative_to(upper).as_posix()
            if path.is_file() and not path.is_symlink() and not rel.startswith(VOLATILE):
                out[f"{node.name}/{rel}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def chat(tb: Testbed, node: str, port: int, model: str) -> dict[str, object]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8})
    r = tb.node(node).run(["curl", "-sS", "--max-time", "60", "-H", "Content-Type: application/json",
                           "-d", body, f"http://127.0.0.1:{port}/v1/chat/completions"], timeout=90)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def test_seed000_shape_rpc_head_and_router(testbed_factory: Callable[..., Testbed], tmp_path: Path) -> None:
    testbed3 = testbed_factory(3)  # fresh nodes: the first deploy's steps are exact
    n2, n3 = testbed3.node("node2").ip, testbed3.node("node3").ip
    qa = Path(__file__).resolve().parents[2] / "tools" / "data" / "question-answer.jinja"  # Gemma 270M is a base model
    seed = SEED000.replace("NODE2", n2).replace("NODE3", n3).replace("QA_TEMPLATE", str(qa))
    path = inventory(testbed3, tmp_path, seed, ROUTER_INSTALLED)

    before = snapshot(testbed3)
    code, dry = deploy(path, "--dry-run")
    assert code == 0, dry
    assert dry["dry_run"] is True and dry["changes"] > 0
    assert snapshot(testbed3) == before, "a dry run wrote to a node"

    code, first = deploy(path, verify=True)  # the whole deploy, verify included, right after a first start
    checks = first["verify"]["checks"]  # type: ignore[index]
    # every check passes but, possibly, the smoke answer of the 270M base model split over RPC
    # (its sentence about the sea repeats itself: verify is right to say so)
    failed = [(c["subject"], c["name"]) for c in checks if c["status"] != "ok"]
    assert failed in ([], [("head", "smoke")]), json.dumps(checks, indent=1)
    assert code == (ExitCode.VERIFY_FAILED if failed else 0), json.dumps(first, indent=1)[-3000:]
    assert all(c["status"] == "ok" for c in checks if c["subject"] == "router" or c["name"] == "route")
    assert [(c["subject"], c["detail"]) for c in checks if c["name"] == "route"] == [("route analyze", "-> head")]
    assert ("head", "rpc rpc2") in {(c["subject"], c["name"]) for c in checks}
    nodes = first["nodes"]
    assert isinstance(nodes, dict)
    kinds = {n: sorted({s["kind"] for s in nodes[n]["steps"]}) for n in nodes}
    assert kinds["node1"] == ["daemon-reload", "install-engine", "push-engine", "push-weight", "restart", "upload"]
    router = testbed3.node("node1").run(["bash", "-c", "tr '\\0' ' ' < /proc/$(systemctl show -p MainPID --value "
                                                       "clusterctl-router.service)/cmdline"]).stdout
    assert router.startswith("/opt/clusterctl/venv-"), router  # the installed router, not the controller's
    version = testbed3.node("node1").run(["/opt/clusterctl/venv/bin/python", "-c",
                                          "import importlib.metadata as m; print(m.version('clusterctl-router'))"])
    assert version.stdout.strip() == router_wheel.build(router_wheel.cache_folder()).version
    assert kinds["node2"] == ["daemon-reload", "push-engine", "restart", "upload"]  # no weights on workers
    answer = chat(testbed3, "node1", 8000, "analyze")
    assert answer["model"] == "head" or answer.get("choices"), answer
    unit = testbed3.node("node1").run(["systemctl", "is-active", "clusterctl-head.service"])
    assert unit.stdout.strip() == "active"
    head_cmd = testbed3.node("node1").run(["bash", "-c", "tr '\\0' ' ' < /proc/$(pgrep -x llama-server)/cmdline"])
    assert f"--rpc {n2}:50052,{n3}:50052" in head_cmd.stdout
    # the workers' firewall: the head reaches rpc2's port, another node's SYN is dropped
    table = testbed3.node("node2").run(["nft", "list", "table", "inet", "clusterctl_rpc2"]).stdout
    assert f"tcp dport 50052 ip saddr {testbed3.node('node1').ip} accept" in table, table
    probe = ["timeout", "3", "bash", "-c", f"exec 3<>/dev/tcp/{n2}/50052"]
    assert testbed3.node("node1").run(probe).returncode == 0
    assert testbed3.node("node3").run(probe).returncode == 124  # timed out: dropped, not even refused

    code, again = deploy(path)
    assert code == 0 and again["changes"] == 0, json.dumps(again, indent=1)
    text = runner.invoke(app, ["deploy", "--inventory", str(path), *NO_VERIFY])
    assert text.exit_code == 0 and text.stdout.strip().splitlines()[-1] == "no changes"


def test_seed004_shape_two_servers_on_one_node_and_rollback(testbed3: Testbed, tmp_path: Path) -> None:
    services = """\
    heavy: {engine: llama-server, node: node3, model: gemma, port: 8080, context: 2048, threads: 1}
    light: {engine: llama-server, node: node3, model: gemma, port: 8081, context: 1024, parallel: 2, threads: 1}
    """
    path = inventory(testbed3, tmp_path, services)
    code, first = deploy(path, "node3")
    assert code == 0, json.dumps(first, indent=1)
    assert chat(testbed3, "node3", 8080, "heavy")["choices"]
    assert chat(testbed3, "node3", 8081, "light")["choices"]
    pushes = [s for s in first["nodes"]["node3"]["steps"] if s["kind"] == "push-weight"]  # type: ignore[index]
    assert len(pushes) == 1  # one copy of the model serves both

    bad = "port: 8081, context: 1024, extra_args: [--no-such-flag]"
    path.write_text(path.read_text().replace("port: 8081, context: 1024", bad))
    code, failed = deploy(path, "node3")
    assert code == ExitCode.DEPLOY_FAILED
    node3 = failed["nodes"]["node3"]  # type: ignore[index]
    assert "light" in node3["failed"] and "previous version is serving again" in node3["failed"]
    assert "/opt/clusterctl/bin/light.sh" in node3["rolled_back"]
    assert "no-such-flag" in node3["log_tail"] or "error" in node3["log_tail"].lower()
    assert chat(testbed3, "node3", 8081, "light")["choices"]  # the old version answers
    assert chat(testbed3, "node3", 8080, "heavy")["choices"]
    script = testbed3.node("node3").run(["cat", "/opt/clusterctl/bin/light.sh"]).stdout
    assert "--no-such-flag" not in script


def test_missing_engine_is_refused_before_anything_is_written(testbed_factory: Callable[..., Testbed],
                                                               tmp_path: Path) -> None:
    tb = testbed_factory(3)
    services = "chat: {engine: llama-server, node: node2, model: gemma, port: 8080, context: 1024}\n"
    path = inventory(tb, tmp_path, services)
    path.write_text("\n".join(line for line in path.read_text().splitlines() if "engines:" not in line) + "\n")
    before = snapshot(tb)
    code, data = deploy(path, "node2")
    assert code == ExitCode.DEPLOY_FAILED
    failed = data["nodes"]["node2"]["failed"]  # type: ignore[index]
    assert "engine(s) missing: /opt/clusterctl/engines/llama.cpp/bin/llama-server (llama.cpp for chat)" in failed
    assert snapshot(tb) == before


def test_a_router_node_without_python_311_is_refused_before_anything_is_written(
        testbed_factory: Callable[..., Testbed], tmp_path: Path) -> None:
    tb = testbed_factory(3)
    # an interpreter that answers the version probe as Python 3.9 would
    old = "/usr/local/bin/python3.9"
    tb.node("node1").run(["bash", "-c", f"printf '#!/bin/sh\\necho 3 9\\n' > {old} && chmod 755 {old}"])
    services = "chat: {engine: llama-server, node: node1, model: gemma, port: 8080, context: 1024}\n"
    router = "router: {node: node1, port: 8000, default: [chat]}\n"
    path = inventory(tb, tmp_path, services, router)
    path.write_text(path.read_text().replace("router: {python: /usr/bin/python3,", f"router: {{python: {old},"))
    before = snapshot(tb)
    code, data = deploy(path, "node1")
    assert code == ExitCode.DEPLOY_FAILED
    assert data["nodes"]["node1"]["failed"] == (  # type: ignore[index]
        f"node1: {old} is Python 3.9; the router needs Python 3.11 or newer (install it (Debian/Ubuntu: apt "
        "install python3.11 python3.11-venv) and set cluster.engines.router.python to it; nothing was written)")
    assert snapshot(tb) == before


def test_a_service_dropped_from_the_inventory_is_reported_then_pruned(testbed_factory: Callable[..., Testbed],
                                                                       tmp_path: Path) -> None:
    """An rpc-server worker dropped with its head's rpc_workers: reported and left running, then
    --prune stops it, deletes its files and takes its firewall table out of node2's nftables."""
    tb = testbed_factory(3)  # fresh nodes: no service of another test is an orphan here
    n2 = tb.node("node2").ip
    old = f"old: {{engine: rpc-server, node: node2, port: 50052, bind: {n2}, threads: 1}}\n"
    keep = "keep: {engine: llama-server, node: node3, model: gemma, port: 8080, context: 1024, threads: 1%s}\n"
    path = inventory(tb, tmp_path, keep % ", rpc_workers: [old]" + old)
    code, first = deploy(path)
    assert code == 0, json.dumps(first, indent=1)
    node2, node3 = tb.node("node2"), tb.node("node3")

    def active(node: object, unit: str) -> str:
        return node.run(["systemctl", "is-active", unit]).stdout.strip()  # type: ignore[attr-defined]

    assert active(node2, "clusterctl-old.service") == "active" and active(node3, "clusterctl-keep.service") == "active"
    assert node2.run(["nft", "list", "table", "inet", "clusterctl_old"]).returncode == 0
    # renamed with its port kept: the listener's cgroup names old as the holder of the port
    inventory(tb, tmp_path, keep % ", rpc_workers: [new]" + old.replace("old:", "new:", 1))
    code, refused = deploy(path, "node2")
    assert code == ExitCode.DEPLOY_FAILED, json.dumps(refused, indent=1)
    assert refused["nodes"]["node2"]["failed"] == (  # type: ignore[index]
        f"node2: port 50052 is taken on {n2} by old (clusterctl-old.service), which the inventory no longer "
        "gives this node; new would not start (deploy --prune removes it first)")
    assert active(node2, "clusterctl-old.service") == "active"
    inventory(tb, tmp_path, keep % "")  # the same file, without old
    code, reported = deploy(path)
    assert code == 0, json.dumps(reported, indent=1)
    assert reported["nodes"]["node2"]["orphans"] == ["old"]  # type: ignore[index]
    assert reported["nodes"]["node3"]["orphans"] == []  # type: ignore[index]
    text = runner.invoke(app, ["deploy", "--inventory", str(path), *NO_VERIFY])
    assert text.exit_code == 0, text.output
    assert "  orphan node2/old: not in the inventory for this node; left alone: deploy --prune removes it" \
        in text.stdout.splitlines()
    assert active(node2, "clusterctl-old.service") == "active"

    code, pruned = deploy(path, "--prune")
    assert code == 0, json.dumps(pruned, indent=1)
    steps = pruned["nodes"]["node2"]["steps"]  # type: ignore[index]
    assert [(s["kind"], s["target"], s["done"]) for s in steps] == [("remove", "old", True),
                                                                    ("daemon-reload", "systemd", True)]
    assert active(node2, "clusterctl-old.service") == "inactive"
    gone = node2.run(["ls", "/etc/systemd/system/clusterctl-old.service", "/opt/clusterctl/bin/old.sh",
                      "/opt/clusterctl/bin/old-firewall.sh"])
    assert gone.returncode != 0 and gone.stdout.strip() == "", gone.stdout
    assert node2.run(["nft", "list", "table", "inet", "clusterctl_old"]).returncode != 0  # the rule is gone
    assert node3.run(["test", "-f", "/opt/clusterctl/bin/keep.sh"]).returncode == 0
    assert chat(tb, "node3", 8080, "keep")["choices"]

    code, again = deploy(path, "--prune")
    assert code == 0 and again["changes"] == 0, json.dumps(again, indent=1)
    assert again["nodes"]["node2"]["orphans"] == []  # type: ignore[index]
