"""Reliability: disk full, restarts per change, corrupted, truncated and resumed weights
(docs/reliability.md). Pushed weights are synthetic files (file:// sources) so sizes and
damage are exact; the services are cheap `custom` ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusterctl.errors import ExitCode
from tests.e2e.testbed import Testbed
from tests.faults import (
    NO_VERIFY,
    blob,
    cli,
    deploy,
    forget_in_manifest,
    inventory,
    main_pid,
    node_result,
    on_node,
    remove_services,
    sha256,
    starts,
    steps,
    tmpfs,
    unit,
    unit_prop,
    web,
)

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("systemd_nodes")]


@pytest.fixture
def undo(testbed3: Testbed) -> Iterator[list[str]]:
    services: list[str] = []
    yield services
    for node in testbed3.nodes:
        remove_services(node, services, ["rel-w", "rel-big", "rel-t"])


# -- disk -------------------------------------------------------------------------------------


def _disk_full(testbed3: Testbed, tmp_path: Path, *args: str) -> tuple[str, str]:
    """Deploy a 150 MiB weight to node2 whose models_dir is a 100 MiB file system; returns
    (the JSON run's failure, the text run's output)."""
    node2 = testbed3.node("node2")
    big = blob(tmp_path / "big.bin", 150 << 20)
    path = inventory(testbed3, tmp_path, web("rel-full", "node2", 8141, model="rel-big"),
                     models=f"rel-big: {{source: 'file://{big}'}}\n", nodes=["node2"])
    with tmpfs(node2, "/opt/models", "100m"):
        node2.run(["sh", "-c", "mkdir -p /opt/models/keep && printf precious > /opt/models/keep/file"], check=True)
        run = deploy(path)
        text = cli("deploy", "--inventory", str(path), *NO_VERIFY)
        assert run.code == text.code == ExitCode.DEPLOY_FAILED, run.output
        data = run.json()
        assert node_result(data, "node2")["bytes_sent"] == 0
        assert not any(s["done"] for s in steps(data, "node2"))
        listing = node2.run(["find", "/opt/models", "-type", "f"], check=True).stdout.split()
        assert listing == ["/opt/models/keep/file"]  # no .part: nothing was downloaded
        assert node2.run(["cat", "/opt/models/keep/file"]).stdout == "precious"  # the existing file is intact
    assert not on_node(node2, f"/etc/systemd/system/{unit('rel-full')}").exists()
    failed = node_result(data, "node2")["failed"]
    assert isinstance(failed, str)
    return failed, text.output


def test_disk_full_is_refused_before_downloading(testbed3: Testbed, tmp_path: Path, undo: list[str]) -> None:
    undo.append("rel-full")
    failed, text = _disk_full(testbed3, tmp_path)
    assert failed == ("node2: /opt/models/rel-big has 0.1 GB free, 0.2 GB are needed "
                      "(free disk space or move models_dir; nothing was downloaded)")
    assert failed in text


def test_refused_deploy_does_not_claim_steps_ran(testbed3: Testbed, tmp_path: Path, undo: list[str]) -> None:
    """(It used to print '5 step(s) did run' for the node and the total.)"""
    undo.append("rel-full")
    _, text = _disk_full(testbed3, tmp_path)
    assert "node2  failed  refused before any step ran" in text, text
    assert "1 node(s), 0 step(s), 1 failed" in text
    assert "did run" not in text


# -- restarts ---------------------------------------------------------------------------------


def test_two_changed_files_of_one_service_restart_it_once(testbed3: Testbed, tmp_path: Path,
                                                          undo: list[str]) -> None:
    node1 = testbed3.node("node1")
    undo.append("rel-once")
    v1 = web("rel-once", "node1", 8142, extra="env: {VERSION: '1'}, startup_timeout: 30s")
    path = inventory(testbed3, tmp_path, v1, nodes=["node1"])
    assert deploy(path).code == 0
    started, pid = starts(node1, "rel-once"), main_pid(node1, unit("rel-once"))

    # the script (env) and the unit (startup timeout) both change
    path.write_text(path.read_text().replace("VERSION: '1'}, startup_timeout: 30s", "VERSION: '2'}, "
                                             "startup_timeout: 31s"))
    run = deploy(path)
    assert run.code == 0, run.output
    assert [(s["kind"], s["target"]) for s in steps(run.json(), "node1")] == [
        ("upload", "/etc/systemd/system/clusterctl-rel-once.service"),
        ("upload", "/opt/clusterctl/bin/rel-once.sh"),
        ("daemon-reload", "systemd"),
        ("restart", "rel-once"),
    ]
    assert starts(node1, "rel-once") == started + 1  # exactly one restart on the node
    assert main_pid(node1, unit("rel-once")) != pid
    assert unit_prop(node1, "rel-once", "NRestarts") == "0"
    assert deploy(path).json()["changes"] == 0


# -- weights ----------------------------------------------------------------------------------


def test_corrupted_byte_is_refused_naming_the_file(testbed3: Testbed, tmp_path: Path, undo: list[str]) -> None:
    node1 = testbed3.node("node1")
    undo.append("rel-sum")
    weight = blob(tmp_path / "w.bin", 4 << 20)
    path = inventory(testbed3, tmp_path, web("rel-sum", "node1", 8143, model="rel-w"),
                     models=f"rel-w: {{source: 'file://{weight}'}}\n", nodes=["node1"])
    assert deploy(path).code == 0
    target = "/opt/models/rel-w/w.bin"
    copy = on_node(node1, target)
    data = bytearray(copy.read_bytes())
    data[123_457] ^= 0x01  # one bit, same size
    copy.write_bytes(bytes(data))
    forget_in_manifest(node1, target)  # as if the file had been replaced behind deploy's back
    pid = main_pid(node1, unit("rel-sum"))

    run = deploy(path)
    assert run.code == ExitCode.DEPLOY_FAILED, run.output
    got = hashlib.sha256(bytes(data)).hexdigest()
    assert node_result(run.json(), "node1")["failed"] == (f"node1: {target} is corrupt (sha256 {got[:16]}...) "
                                                          "(delete it and deploy again)")
    assert [s["kind"] for s in steps(run.json(), "node1")] == ["verify-weight"]
    assert copy.read_bytes() == bytes(data)  # left for inspection, not silently replaced
    assert main_pid(node1, unit("rel-sum")) == pid  # the running service was not touched


def test_truncated_source_is_refused_and_the_partial_file_removed(testbed3: Testbed, tmp_path: Path,
                                                                  undo: list[str]) -> None:
    node1 = testbed3.node("node1")
    undo.append("rel-trunc")
    full = blob(tmp_path / "full.bin", 4 << 20, seed=b"t")
    expected = sha256(full)
    source = blob(tmp_path / "t.bin", 4 << 20, seed=b"t")
    with open(source, "r+b") as f:
        f.truncate(3 << 20)
    got = sha256(source)
    path = inventory(testbed3, tmp_path, web("rel-trunc", "node1", 8144, model="rel-t"),
                     models=f"rel-t: {{source: 'file://{source}', sha256: {expected}}}\n", nodes=["node1"])
    run = deploy(path)
    assert run.code == ExitCode.DEPLOY_FAILED, run.output
    assert node_result(run.json(), "node1")["failed"] == (
        f"node1: /opt/models/rel-t/t.bin failed verification (sha256 {got[:16]}..., expected {expected[:16]}...); "
        "the partial file was removed (run deploy again to fetch it anew; the previous file is untouched)")
    assert node1.run(["find", "/opt/models/rel-t", "-type", "f"]).stdout == ""  # nothing placed, no .part
    assert not on_node(node1, f"/etc/systemd/system/{unit('rel-trunc')}").exists()


def test_interrupted_push_resumes_with_the_remainder(testbed3: Testbed, tmp_path: Path, undo: list[str]) -> None:
    node1 = testbed3.node("node1")
    undo.append("rel-resume")
    size, have = 4 << 20, 1_000_000
    weight = blob(tmp_path / "w.bin", size)
    node1.run(["mkdir", "-p", "/opt/models/rel-w"], check=True)
    on_node(node1, "/opt/models/rel-w/w.bin.part").write_bytes(weight.read_bytes()[:have])  # a killed push
    path = inventory(testbed3, tmp_path, web("rel-resume", "node1", 8145, model="rel-w"),
                     models=f"rel-w: {{source: 'file://{weight}'}}\n", nodes=["node1"])
    run = deploy(path)
    assert run.code == 0, run.output
    push = steps(run.json(), "node1")[0]
    assert (push["kind"], push["reason"], push["bytes"]) == ("push-weight", "resume at 0.00 GB", size - have)
    assert node_result(run.json(), "node1")["bytes_sent"] == size - have
    assert sha256(on_node(node1, "/opt/models/rel-w/w.bin")) == sha256(weight)
    assert not on_node(node1, "/opt/models/rel-w/w.bin.part").exists()
