"""Reliability: concurrent deploys, a controller killed mid-deploy, Ctrl-C mid-rollout
(docs/reliability.md). The controller runs as a real process (`python -m clusterctl.cli`), so
signals and exit codes are the ones a user gets.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusterctl.errors import ExitCode
from tests.e2e.testbed import Node, Testbed
from tests.faults import (
    MANAGED_DIRS,
    NO_VERIFY,
    blob,
    cli,
    deploy,
    finish,
    inventory,
    on_node,
    remove_services,
    sha256,
    shaped,
    start_deploy,
    temp_files,
    wait_for,
    web,
)

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("systemd_nodes")]


WEIGHT = 24 << 20  # at 40 Mbit/s: about 5 s of pushing, the window the faults aim at


@pytest.fixture
def undo(testbed3: Testbed) -> Iterator[list[str]]:
    services: list[str] = []
    yield services
    for node in testbed3.nodes[:2]:
        remove_services(node, services, ["rel-lock"])


def pushing(node: Node) -> bool:
    part = on_node(node, "/opt/models/rel-lock/w.bin.part")
    return part.exists() and part.stat().st_size > (2 << 20)


def settled_size(path: Path, quiet: float = 1.0, timeout: float = 30) -> int:
    """The file's size once it has not changed for `quiet` seconds."""
    last, since = -1, time.monotonic()
    deadline = since + timeout
    while True:
        size, now = path.stat().st_size, time.monotonic()
        if size != last:
            last, since = size, now
        elif now - since >= quiet:
            return size
        if now > deadline:
            raise AssertionError(f"{path} still growing after {timeout:g} s")
        time.sleep(0.1)


def test_second_deploy_is_refused_quickly_naming_the_holder(testbed3: Testbed, tmp_path: Path,
                                                            undo: list[str]) -> None:
    node1 = testbed3.node("node1")
    undo.append("rel-lock1")
    models = f"rel-lock: {{source: 'file://{blob(tmp_path / 'w.bin', WEIGHT)}'}}\n"
    path = inventory(testbed3, tmp_path, web("rel-lock1", "node1", 8121, model="rel-lock"), models=models,
                     nodes=["node1"])
    with shaped(testbed3, node1, "40mbit"):
        first = start_deploy(path)
        try:
            wait_for("the first deploy to push", lambda: pushing(node1), 60)
            second = deploy(path)
        finally:
            done = finish(first, 120)
    assert second.code == ExitCode.LOCKED, second.output
    assert second.seconds < 5
    assert (f"error: another deploy of {path.name} is running: pid {first.pid} on {socket.gethostname()}, "
            "started ") in second.stderr
    assert "hint: wait for it to finish; the lock is released when it exits" in second.stderr
    # refused before it gathered anything: its --json output is the error document alone
    error = json.loads(second.stdout)["error"]
    assert (error["code"], error["hint"], error["location"]) == (
        ExitCode.LOCKED, "wait for it to finish; the lock is released when it exits", None)
    assert error["message"].startswith(f"another deploy of {path.name} is running: pid {first.pid} on "
                                       f"{socket.gethostname()}, started ")
    assert done.code == 0, done.output  # the holder was not disturbed
    assert deploy(path).json()["changes"] == 0


def test_controller_killed_mid_deploy_next_run_warns_and_reconciles(testbed3: Testbed, tmp_path: Path,
                                                                    undo: list[str]) -> None:
    node1 = testbed3.node("node1")
    undo.append("rel-lock1")
    weight = blob(tmp_path / "w.bin", WEIGHT)
    models = f"rel-lock: {{source: 'file://{weight}'}}\n"
    path = inventory(testbed3, tmp_path, web("rel-lock1", "node1", 8121, model="rel-lock"), models=models,
                     nodes=["node1"])
    with shaped(testbed3, node1, "40mbit"):
        killed = start_deploy(path)
        wait_for("the deploy to push", lambda: pushing(node1), 60)
        killed.send_signal(signal.SIGKILL)
        assert finish(killed, 30).code == -signal.SIGKILL
    part = on_node(node1, "/opt/models/rel-lock/w.bin.part")
    have = settled_size(part)  # what was in flight when it died still lands
    assert 0 < have < WEIGHT
    assert temp_files(node1) == []

    run = cli("deploy", "--inventory", str(path), *NO_VERIFY)
    assert run.code == 0, run.output
    assert (f"warning: the previous deploy (pid {killed.pid}, started ") in run.stderr
    assert "did not finish; this one reconciles from the nodes' actual state" in run.stderr
    assert f"push-weight   /opt/models/rel-lock/w.bin  resume at {have / 1e9:.2f} GB" in run.stderr
    assert f"{(WEIGHT - have) / 1e6:.1f} MB sent" in run.stdout  # only the remainder
    assert sha256(on_node(node1, "/opt/models/rel-lock/w.bin")) == sha256(weight)
    again = deploy(path)
    assert again.code == 0 and again.json()["changes"] == 0, again.output
    assert "warning" not in again.stderr  # the record was cleared by the run that finished


def _services(version: int) -> str:
    """Six services over two nodes; each version changes every script and every unit."""
    return "".join(web(f"rel-int{k}", f"node{1 + k % 2}", 8130 + k, delay=0.5,
                       extra=f"env: {{VERSION: '{version}'}}, startup_timeout: {20 + version}s") for k in range(6))


def _managed(nodes: list[Node]) -> dict[str, bytes]:
    """Every file the nodes wrote under the directories deploy manages."""
    out = {}
    for node in nodes:
        for d in MANAGED_DIRS:
            host = node.upper / d.lstrip("/")
            if host.is_dir():
                out.update({f"{node.name}{d}/{p.name}": p.read_bytes() for p in host.iterdir() if p.is_file()})
    return out


@pytest.mark.parametrize("after", [0.0, 1.5], ids=["during-uploads", "during-restarts"])
def test_ctrl_c_mid_rollout_leaves_each_file_old_or_new(testbed3: Testbed, tmp_path: Path, undo: list[str],
                                                        after: float) -> None:
    nodes = [testbed3.node("node1"), testbed3.node("node2")]
    undo.extend(f"rel-int{k}" for k in range(6))
    path = inventory(testbed3, tmp_path, _services(1), nodes=["node1", "node2"])
    assert deploy(path).code == 0
    old = _managed(nodes)
    v2 = inventory(testbed3, tmp_path, _services(2), nodes=["node1", "node2"], name="v2.yaml")
    rendered = tmp_path / "v2"
    assert cli("render", str(v2), "--out", str(rendered)).code == 0
    path.write_text(v2.read_text())

    probe = on_node(nodes[0], "/opt/clusterctl/bin/rel-int0.sh")
    before = probe.read_bytes()
    proc = start_deploy(path, json_output=False)
    try:
        wait_for("the rollout to start writing", lambda: probe.read_bytes() != before, 60, 0.002)
    except BaseException:
        proc.kill()
        proc.wait(30)
        raise
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    run = finish(proc, 120)
    assert run.code == 130, run.output
    assert "interrupted: steps already running were let finish, nothing is half-written" in run.stderr

    now = _managed(nodes)
    changed = [key for key in now if now[key] != old.get(key)]
    assert changed  # the interrupt landed mid-rollout, not before it
    for key in changed:
        name, _, abs_path = key.partition("/")
        new = rendered / name / abs_path
        assert new.is_file() and now[key] == new.read_bytes(), f"{key} is neither the old nor the new content"
    for node in nodes:
        assert temp_files(node) == [], f"{node.name}: temp files left behind"
