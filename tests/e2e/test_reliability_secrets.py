"""Reliability: secrets and exposure (docs/reliability.md, "Secrets and exposure").

One deploy of a keyed llama-server and a keyed router, both bound to the node's address, with
canary values for the service key, the router key and the hub token. While every command that
shows anything runs (plan, render, deploy --dry-run, deploy, verify; text and --json: clusterctl
has no verbosity levels), a sampler reads every command line and environment on the node and
inotify records the mode of each secret file the moment it appears. Then the canaries are
looked for everywhere: outputs, argv, environments, every file the node wrote outside the
secrets directory, its whole journal. And requests without the right key get 401.
"""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from clusterctl.errors import ExitCode
from tests.e2e.test_deploy import _package_for_nodes
from tests.e2e.testbed import Node, Testbed
from tests.faults import (
    NO_VERIFY,
    SECRETS,
    ArgvSampler,
    CreationModes,
    Run,
    cli,
    grep_node,
    inventory,
    on_node,
    remove_services,
)

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("systemd_nodes")]


CANARIES = {
    "REL_CHAT_KEY": f"sk-canary-chat-{secrets.token_hex(8)}",
    "REL_ROUTER_KEY": f"sk-canary-router-{secrets.token_hex(8)}",
    "REL_HF_TOKEN": f"hf_canary_{secrets.token_hex(8)}",
}
CHAT, ROUTER = 8170, 8171


@dataclass
class Exposure:
    node: Node
    outputs: dict[str, Run] = field(default_factory=dict)
    sampler: ArgvSampler | None = None
    modes: list[tuple[str, int]] = field(default_factory=list)
    journal: str = ""
    rendered: Path | None = None


@pytest.fixture(scope="module")
def exposure(testbed3: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exposure]:
    node3 = testbed3.node("node3")
    tmp = tmp_path_factory.mktemp("secrets")
    service = (f"rel-keyed: {{engine: llama-server, node: node3, model: gemma, port: {CHAT}, bind: {node3.ip}, "
               "context: 1024, threads: 1, startup_timeout: 60s, api_key: {env: REL_CHAT_KEY}}\n")
    router = (f"router:\n  node: node3\n  port: {ROUTER}\n  bind: {node3.ip}\n  api_key: {{env: REL_ROUTER_KEY}}\n"
              f"  default: [rel-keyed]\n  routes: {{chat: [rel-keyed]}}\n  command: [/usr/bin/env, "
              f"'PYTHONPATH={_package_for_nodes()}', '{sys.executable}', -m, clusterctl.cli]\n")
    path = inventory(testbed3, tmp, service, router=router, nodes=["node3"],
                     cluster="huggingface: {token: {env: REL_HF_TOKEN}}\n")
    found = Exposure(node3, rendered=tmp / "rendered")
    node3.run(["mkdir", "-p", SECRETS], check=True)  # for the inotify watch; deploy would create it the same way
    try:
        with ArgvSampler([node3], needles=list(CANARIES.values())) as sampler, \
                CreationModes(on_node(node3, SECRETS)) as modes:
            commands = {
                "resolve": ["resolve", str(path)],
                "plan": ["plan", str(path)],
                "plan --json": ["plan", str(path), "--json"],
                "render": ["render", str(path), "--out", str(found.rendered)],
                "render --json": ["render", str(path), "--out", str(found.rendered), "--json"],
                "deploy --dry-run": ["deploy", "-i", str(path), "--dry-run"],
                "deploy --dry-run --json": ["deploy", "-i", str(path), "--dry-run", "--json"],
                "deploy": ["deploy", "-i", str(path), *NO_VERIFY],
                "deploy --json": ["deploy", "-i", str(path), "--json", *NO_VERIFY],
                "verify": ["verify", "-i", str(path), "--wait", "5"],
                "verify --json": ["verify", "-i", str(path), "--wait", "5", "--json"],
            }
            for name, args in commands.items():
                found.outputs[name] = cli(*args, env=CANARIES, timeout=300)
        found.sampler, found.modes = sampler, modes.modes
        found.journal = node3.run(["journalctl", "--no-pager", "-o", "cat"], timeout=60).stdout
        yield found
    finally:
        remove_services(node3, ["rel-keyed", "router"], paths=[
            f"{SECRETS}/clusterctl-router.key", f"{SECRETS}/clusterctl-router-upstream-rel-keyed.key",
            "/opt/clusterctl/router/routes.json", "/opt/clusterctl/monitoring"])


def test_commands_ran(exposure: Exposure) -> None:
    codes = {name: run.code for name, run in exposure.outputs.items()}
    assert codes == {"resolve": 0, "plan": 0, "plan --json": 0, "render": 0, "render --json": 0,
                     "deploy --dry-run": 0, "deploy --dry-run --json": 0, "deploy": 0, "deploy --json": 0,
                     # the real Gemma 270M fails the smoke check by design (tests/e2e/test_verify.py)
                     "verify": ExitCode.VERIFY_FAILED, "verify --json": ExitCode.VERIFY_FAILED}, {
        name: run.output[-2000:] for name, run in exposure.outputs.items() if run.code not in (0, 9)}


def test_secrets_never_in_any_output(exposure: Exposure) -> None:
    for name, run in exposure.outputs.items():
        for var, canary in CANARIES.items():
            assert canary not in run.output, f"{var} printed by `clusterctl {name}`"
    assert exposure.rendered is not None
    for path in exposure.rendered.rglob("*"):
        if path.is_file():
            assert not any(c.encode() in path.read_bytes() for c in CANARIES.values()), path
    # plan/diff output names each secret, never shows it
    dry = exposure.outputs["deploy --dry-run"].stdout
    assert dry.count("secret        (sensitive)") == 3, dry
    data = exposure.outputs["deploy --dry-run --json"].json()
    secret_steps = [s for n in data["nodes"].values() for s in n["steps"] if s["kind"] == "secret"]
    assert len(secret_steps) == 3 and all(s["sensitive"] for s in secret_steps)
    assert not any(p.startswith(SECRETS) for n in data["nodes"].values() for p in n["diffs"])
    assert "(sensitive)" in exposure.outputs["render"].stdout


def test_secrets_never_in_remote_argv_or_environment(exposure: Exposure) -> None:
    sampler = exposure.sampler
    assert sampler is not None and sampler.samples > 100
    server = [line for line in sampler.seen if "llama-server" in line and "--alias rel-keyed" in line]
    assert server and all(f"--api-key-file {SECRETS}/rel-keyed.key" in line for line in server)
    assert any("clusterctl.cli router serve" in line for line in sampler.seen)  # the router was sampled too
    for canary in CANARIES.values():
        assert sampler.matching(canary) == []
    assert sampler.environ_hits == set()


def test_secrets_never_in_node_files_or_journal(exposure: Exposure) -> None:
    node = exposure.node
    assert "clusterctl-rel-keyed.service" in exposure.journal  # the journal has the services' lines
    for var, canary in CANARIES.items():
        assert canary not in exposure.journal, f"{var} in the journal"
        assert grep_node(node, canary, skip=[f"{SECRETS}/"]) == [], f"{var} in a file outside {SECRETS}"
    # and inside it, exactly where it belongs
    assert on_node(node, f"{SECRETS}/rel-keyed.key").read_text().strip() == CANARIES["REL_CHAT_KEY"]


def test_secret_files_are_0600_from_creation(exposure: Exposure) -> None:
    """The transport-level proof (mode given in the SFTP open itself) is
    tests/e2e/test_transport_ssh.py::test_put_creates_parents_with_the_final_mode."""
    created = [name for name, _ in exposure.modes]
    assert any(".clusterctl-" in name for name in created)  # the temp files were seen as they appeared
    for name in ("rel-keyed.key", "clusterctl-router.key", "clusterctl-router-upstream-rel-keyed.key"):
        assert name in created
    assert all(mode & 0o077 == 0 for _, mode in exposure.modes), exposure.modes
    for name in ("rel-keyed.key", "clusterctl-router.key", "clusterctl-router-upstream-rel-keyed.key"):
        st = os.stat(on_node(exposure.node, f"{SECRETS}/{name}"))
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0


def _status(url: str, key: str | None) -> str:
    header = ["-H", f"Authorization: Bearer {key}"] if key else []
    proc = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", *header, url],
                          capture_output=True, text=True, timeout=30)
    return proc.stdout


def test_requests_without_the_key_get_401(exposure: Exposure) -> None:
    """From the controller, over the bridge: the services bind the node's address."""
    ip = exposure.node.ip
    chat_key, router_key = CANARIES["REL_CHAT_KEY"], CANARIES["REL_ROUTER_KEY"]
    for url, key, other in ((f"http://{ip}:{CHAT}/v1/models", chat_key, router_key),
                            (f"http://{ip}:{ROUTER}/v1/models", router_key, chat_key)):
        assert _status(url, None) == "401", url
        assert _status(url, "wrong") == "401", url
        assert _status(url, other) == "401", url  # keys are not interchangeable
        assert _status(url, key) == "200", url
