"""Reliability: services that cannot start, start slowly, hang, lose their rpc worker or cannot
be rolled back (docs/reliability.md, "Services"). Real llama-server and rpc-server processes with
the real Gemma 3 270M (small contexts, one thread) where the engine matters, cheap `custom`
services elsewhere. Everything runs on the shared `testbed3` and is removed afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from clusterctl.errors import ExitCode
from tests.e2e.testbed import Node, Testbed
from tests.faults import (
    Run,
    cli,
    deploy,
    finish,
    foreign,
    inventory,
    main_pid,
    node_result,
    on_node,
    remove_services,
    start_deploy,
    starts,
    steps,
    unit,
    unit_prop,
    web,
)

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("systemd_nodes")]


def llama(name: str, node: str, port: int, extra: str = "", *, startup: str = "60s") -> str:
    fields = (f"engine: llama-server, node: {node}, model: gemma, port: {port}, context: 1024, threads: 1, "
              f"startup_timeout: {startup}")
    return f"{name}: {{{fields}{', ' + extra if extra else ''}}}\n"


def failure(run: Run, node: str = "node1") -> str:
    value = node_result(run.json(), node)["failed"]
    assert isinstance(value, str), run.output
    return value


def state(node: Node, service: str) -> str:
    return unit_prop(node, service, "ActiveState")


# -- a port held by a process deploy does not own ---------------------------------------------


@dataclass
class PortTaken:
    llama: Run  # a llama-server (HTTP health check) deployed on the port
    custom: Run  # a custom service (TCP probe) deployed on the port
    pid_before: int
    pid_after: int
    answers_after: bool
    unit_file_left: bool


@pytest.fixture(scope="module")
def port_taken(testbed3: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PortTaken]:
    node1 = testbed3.node("node1")
    tmp = tmp_path_factory.mktemp("port")
    argv = ["python3", "-m", "http.server", "--bind", "127.0.0.1", "--directory", "/nonexistent", "8152"]
    try:
        with foreign(node1, argv, port=8152) as owner:
            pid = main_pid(node1, owner)
            path = inventory(testbed3, tmp, llama("rel-taken", "node1", 8152, startup="10s"),
                             nodes=["node1"])
            first = deploy(path)
            left = on_node(node1, f"/etc/systemd/system/{unit('rel-taken')}").exists()
            path = inventory(testbed3, tmp, web("rel-taken2", "node1", 8152), nodes=["node1"], name="custom.yaml")
            second = deploy(path)
            answers = node1.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
                                 "http://127.0.0.1:8152/"]).stdout not in ("", "000")
            yield PortTaken(first, second, pid, main_pid(node1, owner), answers, left)
    finally:
        remove_services(node1, ["rel-taken", "rel-taken2"])


def taken(service: str) -> str:
    return (f"node1: port 8152 is taken on 127.0.0.1 by another process (python3); {service} would not start "
            "(stop that "
            "process or give the service another port; clusterctl does not kill processes it did not start)")


def test_port_held_by_a_foreign_process_is_refused_and_the_process_survives(port_taken: PortTaken) -> None:
    run = port_taken.llama
    assert run.code == ExitCode.DEPLOY_FAILED, run.output
    assert failure(run) == taken("rel-taken")  # in preflight: nothing written, nothing started
    assert run.seconds < 10  # not after the service's startup_timeout
    assert not any(s["done"] for s in steps(run.json(), "node1"))
    assert not port_taken.unit_file_left
    assert port_taken.pid_after == port_taken.pid_before and port_taken.answers_after  # never killed


def test_tcp_probed_service_on_a_taken_port_is_not_reported_healthy(port_taken: PortTaken) -> None:
    """A custom service is probed with a bare TCP connect, which the foreign process would answer."""
    run = port_taken.custom
    assert run.code == ExitCode.DEPLOY_FAILED, run.output
    assert failure(run) == taken("rel-taken2")


def test_same_port_on_another_address_is_not_refused(testbed3: Testbed, tmp_path: Path) -> None:
    node2 = testbed3.node("node2")
    argv = ["python3", "-m", "http.server", "--bind", "127.0.0.1", "--directory", "/nonexistent", "50110"]
    service = f"rel-beside: {{engine: rpc-server, node: node2, port: 50110, bind: {node2.ip}, threads: 1}}\n"
    try:
        with foreign(node2, argv, port=50110) as owner:
            pid = main_pid(node2, owner)
            run = deploy(inventory(testbed3, tmp_path, service, nodes=["node2"]))
            assert main_pid(node2, owner) == pid
        assert run.code == 0, run.output
    finally:
        remove_services(node2, ["rel-beside"])


# -- crash at start ---------------------------------------------------------------------------


@dataclass
class Crashed:
    run: Run
    restarts: str  # NRestarts when deploy returned
    restarts_later: str  # and 6 s later
    state: str
    unit_file_left: bool


@pytest.fixture(scope="module")
def crashed(testbed3: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crashed]:
    node1 = testbed3.node("node1")
    path = inventory(testbed3, tmp_path_factory.mktemp("crash"),
                     llama("rel-crash", "node1", 8155, "extra_args: [--no-such-flag]", startup="120s"),
                     nodes=["node1"])
    try:
        run = deploy(path)
        restarts = unit_prop(node1, "rel-crash", "NRestarts")
        time.sleep(6)  # longer than the unit's RestartSec
        yield Crashed(run, restarts, unit_prop(node1, "rel-crash", "NRestarts"), state(node1, "rel-crash"),
                      on_node(node1, f"/etc/systemd/system/{unit('rel-crash')}").exists())
    finally:
        remove_services(node1, ["rel-crash"])


def test_crash_at_start_is_rolled_back_and_does_not_loop(crashed: Crashed) -> None:
    """The existing-service variant (rollback to the old version, which keeps answering) is
    tests/e2e/test_deploy.py::test_seed004_shape_two_servers_on_one_node_and_rollback."""
    run = crashed.run
    assert run.code == ExitCode.DEPLOY_FAILED, run.output
    assert failure(run) == "rel-crash exited during start-up; it was new, so it was stopped and its files removed"
    log = node_result(run.json(), "node1")["log_tail"]
    assert isinstance(log, str) and "error: invalid argument: --no-such-flag" in log
    assert int(crashed.restarts) <= 5  # StartLimitBurst of the unit
    assert crashed.restarts_later == crashed.restarts  # no restart loop after deploy returned
    assert crashed.state in ("inactive", "failed")
    assert not crashed.unit_file_left


def test_crash_at_start_is_noticed_at_the_first_exit(crashed: Crashed) -> None:
    """(It used to wait for StartLimitBurst: systemd's 'activating' also means 'crashed, waiting
    RestartSec to restart it'.)"""
    assert crashed.restarts == "0"
    assert crashed.run.seconds < 15


# -- slow start ---------------------------------------------------------------------------------


def test_slow_start_inside_the_deadline_is_not_killed(testbed3: Testbed, tmp_path: Path) -> None:
    node1 = testbed3.node("node1")
    try:
        path = inventory(testbed3, tmp_path, web("rel-slow", "node1", 8156, delay=8, extra="startup_timeout: 30s"),
                         nodes=["node1"])
        run = deploy(path)
        assert run.code == 0, run.output
        assert run.seconds >= 8
        assert starts(node1, "rel-slow") == 1 and unit_prop(node1, "rel-slow", "NRestarts") == "0"
        assert state(node1, "rel-slow") == "active"

        path = inventory(testbed3, tmp_path, web("rel-slow2", "node1", 8157, delay=8, extra="startup_timeout: 3s"),
                         nodes=["node1"], name="late.yaml")
        run = deploy(path)
        assert run.code == ExitCode.DEPLOY_FAILED, run.output
        assert failure(run) == "rel-slow2 not healthy after 3 s; it was new, so it was stopped and its files removed"
    finally:
        remove_services(node1, ["rel-slow", "rel-slow2"])


# -- alive but not answering --------------------------------------------------------------------


def test_stopped_process_fails_verify_without_hanging(testbed3: Testbed, tmp_path: Path) -> None:
    node1 = testbed3.node("node1")
    path = inventory(testbed3, tmp_path, llama("rel-chat", "node1", 8153), nodes=["node1"])
    try:
        assert deploy(path).code == 0
        pid = main_pid(node1, unit("rel-chat"))
        node1.run(["kill", "-STOP", str(pid)], check=True)
        try:
            run = cli("verify", "--inventory", str(path), "node1", "--json", "--wait", "5", timeout=90)
        finally:
            node1.run(["kill", "-CONT", str(pid)], check=True)
        assert run.code == ExitCode.VERIFY_FAILED, run.output
        assert run.seconds < 45
        checks = {(c["subject"], c["name"]): (c["status"], c["detail"]) for c in run.json()["checks"]}
        assert checks[("rel-chat", "listening")] == ("ok", "bound to 127.0.0.1")  # the kernel still accepts
        assert checks[("rel-chat", "health")] == ("fail", "/health: HTTP unreachable")
        run = cli("verify", "--inventory", str(path), "node1", "--json", "--wait", "5", timeout=90)
        status = {(c["subject"], c["name"]): c["status"] for c in run.json()["checks"]}
        assert status[("rel-chat", "health")] == "ok"  # resumed, it answers again
    finally:
        remove_services(node1, ["rel-chat"])


# -- rpc worker down ----------------------------------------------------------------------------


def head(context: int) -> str:
    return llama("rel-head", "node1", 8154, "rpc_workers: [rel-rpc]").replace("context: 1024", f"context: {context}")


def rpc_services(node2: Node, context: int) -> str:
    return head(context) + f"rel-rpc: {{engine: rpc-server, node: node2, port: 50100, bind: {node2.ip}, threads: 1}}\n"


def change_head(path: Path, context: int) -> None:
    text = path.read_text()
    current = next(head(c) for c in (1024, 2048, 3072, 4096) if head(c) in text)
    assert current != head(context)
    path.write_text(text.replace(current, head(context)))


@pytest.fixture(scope="module")
def rpc_pair(testbed3: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    node1, node2 = testbed3.node("node1"), testbed3.node("node2")
    path = inventory(testbed3, tmp_path_factory.mktemp("rpc"), rpc_services(node2, 1024), nodes=["node1", "node2"])
    try:
        run = deploy(path)
        assert run.code == 0, run.output
        yield path
    finally:
        remove_services(node1, ["rel-head"])
        remove_services(node2, ["rel-rpc"])


def test_stopped_rpc_worker_is_started_before_its_head(testbed3: Testbed, rpc_pair: Path) -> None:
    node1, node2 = testbed3.node("node1"), testbed3.node("node2")
    node2.run(["systemctl", "stop", unit("rel-rpc")], check=True)
    change_head(rpc_pair, 2048)
    run = deploy(rpc_pair)
    assert run.code == 0, run.output
    assert [(s["kind"], s["target"]) for s in steps(run.json(), "node2")] == [("start", "rel-rpc")]
    assert ("restart", "rel-head") in [(s["kind"], s["target"]) for s in steps(run.json(), "node1")]
    assert state(node2, "rel-rpc") == "active" and state(node1, "rel-head") == "active"


def test_rpc_worker_down_when_its_head_starts_is_named(testbed3: Testbed, rpc_pair: Path) -> None:
    node2 = testbed3.node("node2")
    node2.run(["systemctl", "stop", unit("rel-rpc")], check=True)
    change_head(rpc_pair, 3072)
    run = finish(start_deploy(rpc_pair, "node1"), 20)
    assert run.code == ExitCode.DEPLOY_FAILED, run.output
    assert failure(run) == (f"node1: rel-head was not restarted: its rpc worker rel-rpc ({node2.ip}:50100 on node2) "
                            "is not reachable (start rel-rpc first (deploy node2) and check the firewall between the "
                            "nodes)")
    assert state(testbed3.node("node1"), "rel-head") == "active"  # the running head was left alone


def cmdline(node: Node, service: str) -> str:
    pid = main_pid(node, unit(service))
    return node.run(["cat", f"/proc/{pid}/cmdline"], check=True).stdout.replace("\0", " ")


def test_head_refused_for_a_down_worker_is_restarted_once_it_is_back(testbed3: Testbed, rpc_pair: Path) -> None:
    node1, node2 = testbed3.node("node1"), testbed3.node("node2")
    context = 2048 if head(4096) in rpc_pair.read_text() else 4096
    node2.run(["systemctl", "stop", unit("rel-rpc")], check=True)
    change_head(rpc_pair, context)
    refused = deploy(rpc_pair, "node1")
    assert refused.code == ExitCode.DEPLOY_FAILED, refused.output
    node2.run(["systemctl", "start", unit("rel-rpc")], check=True)
    again = deploy(rpc_pair, "node1")
    assert again.code == 0, again.output
    assert f"--ctx-size {context} " in cmdline(node1, "rel-head")  # the head runs what its files say


# -- rollback that fails -----------------------------------------------------------------------


def test_failed_rollback_is_reported_with_manual_steps(testbed3: Testbed, tmp_path: Path) -> None:
    """v1 runs only while a file exists; it is removed, then v2 (which fails the same way) is
    deployed: the rollback to v1 cannot come back either."""
    node1 = testbed3.node("node1")
    guard = "/opt/clusterctl/state/rel-fragile-ok"
    node1.run(["sh", "-c", f"mkdir -p /opt/clusterctl/state && touch {guard}"], check=True)
    v1 = web("rel-fragile", "node1", 8158, guard=guard, extra="startup_timeout: 6s, env: {VERSION: '1'}")
    path = inventory(testbed3, tmp_path, v1, nodes=["node1"])
    try:
        assert deploy(path).code == 0
        script = on_node(node1, "/opt/clusterctl/bin/rel-fragile.sh").read_bytes()
        node1.run(["rm", guard], check=True)
        path.write_text(path.read_text().replace("VERSION: '1'", "VERSION: '2'"))
        run = deploy(path)
        assert run.code == ExitCode.DEPLOY_FAILED, run.output
        assert failure(run) == (
            "rel-fragile exited during start-up; the previous version did not come back either (rel-fragile "
            "exited during start-up): restore it by hand (systemctl status clusterctl-rel-fragile.service)")
        assert node_result(run.json(), "node1")["rolled_back"] == ["/opt/clusterctl/bin/rel-fragile.sh"]
        assert on_node(node1, "/opt/clusterctl/bin/rel-fragile.sh").read_bytes() == script  # v1's files are back
        log = node_result(run.json(), "node1")["log_tail"]
        assert isinstance(log, str) and f"missing {guard}" in log  # the last log lines say why
    finally:
        remove_services(node1, ["rel-fragile"])
