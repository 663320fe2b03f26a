"""Reliability: host identity, unreachable, dying and slow nodes (docs/reliability.md).

`clusterctl deploy` on the real testbed (systemd + sshd nodes on a bridge). The services are
cheap `custom` ones (a Python HTTP server, probed over TCP) with a small pushed weight file, so
each deploy exercises every phase in a few seconds. Faults come from tests/faults.py and are
undone when each test ends.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusterctl.errors import ExitCode
from tests.e2e.testbed import Node, Testbed, TestbedFactory
from tests.faults import (
    blob,
    deploy,
    finish,
    has_qdisc,
    inventory,
    link_down,
    netem,
    node_result,
    on_node,
    packet_loss,
    remove_services,
    shaped,
    start_deploy,
    steps,
    unit,
    wait_for,
    web,
)
from tests.sshd import keygen, public_key, sha256_fingerprint

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("systemd_nodes")]


PORTS = {"node1": 8101, "node2": 8102, "node3": 8103}


def three_services(prefix: str = "rel-web") -> str:
    return "".join(web(f"{prefix}{n[-1]}", n, port, model="rel-w") for n, port in PORTS.items())


def weights(tmp: Path, size: int = 2 << 20) -> str:
    return f"rel-w: {{source: 'file://{blob(tmp / 'w.bin', size)}'}}\n"


@pytest.fixture
def undo(testbed3: Testbed) -> Iterator[None]:
    yield
    for node in testbed3.nodes:
        remove_services(node, [f"rel-web{node.name[-1]}"], ["rel-w"])


def accepted_logins(node: Node) -> int:
    out = node.run(["journalctl", "--no-pager", "-o", "cat", "-u", "ssh.service"], timeout=30).stdout
    return sum(1 for line in out.splitlines() if line.startswith("Accepted publickey"))


def fingerprint(node: Node) -> str:
    return sha256_fingerprint(node.host_key.split()[1])


def active(node: Node, service: str) -> bool:
    return node.run(["systemctl", "is-active", unit(service)]).stdout.strip() == "active"


def all_done(data: dict[str, object], node: str) -> bool:
    s = steps(data, node)
    return bool(s) and all(step["done"] for step in s)


# -- host identity ----------------------------------------------------------------------------


def test_unknown_host_key_fails_that_node_only(testbed3: Testbed, tmp_path: Path, undo: None) -> None:
    node2 = testbed3.node("node2")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("".join(line for line in testbed3.known_hosts.read_text().splitlines(True)
                                   if not line.startswith(f"{node2.ip} ")))
    before = known_hosts.read_bytes()
    logins = accepted_logins(node2)
    path = inventory(testbed3, tmp_path, three_services(), models=weights(tmp_path), known_hosts=known_hosts)

    run = deploy(path, "--max-fail", "1")
    assert run.code == ExitCode.NETWORK, run.output
    data = run.json()
    failed = node_result(data, "node2")["failed"]
    assert isinstance(failed, str)
    assert failed.startswith(f"node2: unknown host key: {node2.ip} offered ssh-ed25519 {fingerprint(node2)}, "
                             f"which is not in {known_hosts}; nothing was run on it")
    assert "`clusterctl trust -i INVENTORY node2` records it after you confirm" in failed
    assert steps(data, "node2") == []
    for name in ("node1", "node3"):  # the others proceed
        assert node_result(data, name)["ok"] is True and all_done(data, name)
        assert active(testbed3.node(name), f"rel-web{name[-1]}")
    assert accepted_logins(node2) == logins  # never authenticated, so nothing ran there
    assert not on_node(node2, f"/etc/systemd/system/{unit('rel-web2')}").exists()
    assert known_hosts.read_bytes() == before


def test_changed_host_key_is_refused_naming_both_fingerprints(testbed3: Testbed, tmp_path: Path,
                                                              undo: None) -> None:
    node2 = testbed3.node("node2")
    keygen(tmp_path / "impostor", "impostor")
    key_type, b64 = public_key(tmp_path / "impostor")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("".join(f"{node2.ip} {key_type} {b64}\n" if line.startswith(f"{node2.ip} ") else line
                                   for line in testbed3.known_hosts.read_text().splitlines(True)))
    before = known_hosts.read_bytes()
    mtime = known_hosts.stat().st_mtime_ns
    logins = accepted_logins(node2)
    path = inventory(testbed3, tmp_path, three_services(), models=weights(tmp_path), known_hosts=known_hosts)

    run = deploy(path, "--max-fail", "1")
    assert run.code == ExitCode.NETWORK, run.output
    data = run.json()
    failed = node_result(data, "node2")["failed"]
    assert isinstance(failed, str)
    assert failed.startswith(
        f"node2: HOST KEY CHANGED for {node2.ip}: {known_hosts} has ssh-ed25519 {sha256_fingerprint(b64)}, "
        f"the node offered ssh-ed25519 {fingerprint(node2)}; nothing was run and {known_hosts} was left unchanged")
    assert "someone may be intercepting the connection" in failed
    assert all_done(data, "node1") and all_done(data, "node3")
    assert accepted_logins(node2) == logins
    assert known_hosts.read_bytes() == before and known_hosts.stat().st_mtime_ns == mtime


# -- unreachable, dying and slow nodes --------------------------------------------------------


def test_node_down_at_start_counts_towards_max_fail(testbed3: Testbed, tmp_path: Path, undo: None) -> None:
    node3 = testbed3.node("node3")
    path = inventory(testbed3, tmp_path, three_services(), models=weights(tmp_path), connect_timeout="2s")
    with link_down(testbed3, node3):
        run = deploy(path)
        assert run.code == ExitCode.NETWORK, run.output
        assert run.seconds < 2 + 15  # connect_timeout, plus start-up
        data = run.json()
        failed = node_result(data, "node3")["failed"]
        assert failed == (f"node3: timed out after 2s connecting to root@{node3.ip}:22 (is the node up and the "
                          "address right? a firewall may be dropping packets)")
        # one failure > --max-fail 0: the others gathered facts but nothing ran anywhere
        for name in ("node1", "node2"):
            assert node_result(data, name)["ok"] is True
            assert steps(data, name) and not any(s["done"] for s in steps(data, name))
            assert not active(testbed3.node(name), f"rel-web{name[-1]}")

        run = deploy(path, "--max-fail", "1")
        assert run.code == ExitCode.NETWORK, run.output  # node3 still failed: reported as such
        data = run.json()
        assert node_result(data, "node3")["failed"] == failed
        for name in ("node1", "node2"):  # tolerated: the later phases ran for the others
            assert all_done(data, name)
            assert active(testbed3.node(name), f"rel-web{name[-1]}")
    run = deploy(path)  # back up: node3 catches up, the others have nothing to do
    assert run.code == 0, run.output
    data = run.json()
    assert all_done(data, "node3") and steps(data, "node1") == [] and steps(data, "node2") == []


def test_link_dying_mid_push_is_detected_not_a_hang(testbed_factory: TestbedFactory, tmp_path: Path) -> None:
    tb = testbed_factory(1)
    node1 = tb.node("node1")
    path = inventory(tb, tmp_path, web("rel-web1", "node1", 8101, model="rel-w"), models=weights(tmp_path, 48 << 20))
    part = on_node(node1, "/opt/models/rel-w/w.bin.part")
    with shaped(tb, node1, "40mbit"):
        proc = start_deploy(path)
        try:
            wait_for("the push to be under way", lambda: part.exists() and part.stat().st_size > (4 << 20), 60)
        except BaseException:
            proc.kill()
            proc.wait(30)
            raise
        with link_down(tb, node1):
            run = finish(proc, 60)  # keepalive 15 s: a dead peer should be noticed well within a minute
    assert run.code == ExitCode.NETWORK, run.output
    failed = node_result(run.json(), "node1")["failed"]
    assert isinstance(failed, str) and failed.startswith("node1: ")


def test_slow_lossy_link_completes_without_false_failure(testbed3: Testbed, tmp_path: Path, undo: None) -> None:
    """8 Mbit/s towards the node and 2 % of the packets lost both ways (this kernel has no netem:
    `test_delayed_lossy_link_with_netem` adds the 50 ms delay where it has)."""
    node3 = testbed3.node("node3")
    path = inventory(testbed3, tmp_path, web("rel-web3", "node3", 8103, model="rel-w"), models=weights(tmp_path),
                     nodes=["node3"])
    with shaped(testbed3, node3, "8mbit"), packet_loss(node3, 2):
        started = time.monotonic()
        run = deploy(path, timeout=240)
        assert run.code == 0, run.output
        assert all_done(run.json(), "node3")
        again = deploy(path, timeout=240)
        assert again.code == 0 and again.json()["changes"] == 0, again.output  # nothing seen as changed
        assert time.monotonic() - started < 240
    assert active(node3, "rel-web3")


def test_delayed_lossy_link_with_netem(testbed3: Testbed, tmp_path: Path, undo: None) -> None:
    node3 = testbed3.node("node3")
    if not has_qdisc(testbed3, node3, "netem"):
        pytest.skip("this kernel has no sch_netem (CONFIG_NET_SCH_NETEM): no packet delay can be injected")
    path = inventory(testbed3, tmp_path, web("rel-web3", "node3", 8103, model="rel-w"), models=weights(tmp_path),
                     nodes=["node3"])
    with netem(testbed3, node3, "delay 50ms loss 2%"):
        run = deploy(path, timeout=240)
        assert run.code == 0, run.output
        assert all_done(run.json(), "node3")
        again = deploy(path, timeout=240)
        assert again.code == 0 and again.json()["changes"] == 0, json.dumps(again.json(), indent=1)


# -- accelerators ---------------------------------------------------------------------------------


def test_less_gpu_memory_than_the_inventory_says_is_refused(testbed3: Testbed, tmp_path: Path, undo: None) -> None:
    """No GPU here: a stand-in `nvidia-smi` in the node answers the query deploy makes (the
    driver's CSV format, memory in MiB). Real GPUs: see docs/reliability.md."""
    node1 = testbed3.node("node1")
    fake = on_node(node1, "/usr/local/bin/nvidia-smi")
    path = inventory(testbed3, tmp_path, web("rel-web1", "node1", 8101), nodes=["node1"],
                     node_keys={"node1": "accelerators: [{kind: cuda, count: 1, memory: 80GiB}]"})
    hint = " (fix the node's accelerators in the inventory and run clusterctl plan)"
    try:
        run = deploy(path)  # no nvidia-smi at all: the driver is missing or the GPU gone
        assert run.code == ExitCode.DEPLOY_FAILED, run.output
        assert node_result(run.json(), "node1")["failed"] == (
            "node1: the inventory says 1 GPU(s) of 80 GiB; the node reports no GPU" + hint)
        fake.parent.mkdir(parents=True, exist_ok=True)
        fake.write_text("#!/bin/sh\necho 'NVIDIA GeForce RTX 4090, 24564'\n")
        fake.chmod(0o755)
        run = deploy(path)
        assert run.code == ExitCode.DEPLOY_FAILED, run.output
        assert node_result(run.json(), "node1")["failed"] == (
            "node1: the inventory says 1 GPU(s) of 80 GiB; the node reports 24 GiB" + hint)
        assert not any(s["done"] for s in steps(run.json(), "node1"))
        fake.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559'\n")  # 79.6 GiB: within 5 %
        run = deploy(path)
        assert run.code == 0, run.output
        assert all_done(run.json(), "node1")
    finally:
        fake.unlink(missing_ok=True)
