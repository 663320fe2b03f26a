"""Orphans, purely: the probe's listing of installed services (its parser, and the real probe
script over a folder of files), and which of them the desired state of a node does not hold."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from clusterctl.deploy import facts
from clusterctl.deploy.changes import diff, orphans
from clusterctl.deploy.managers import MANAGERS
from clusterctl.deploy.model import Desired, NodeFacts
from clusterctl.inventory import Node
from clusterctl.render import RenderedFile


def test_the_installed_listing_keeps_clusterctl_names_only() -> None:
    text = ("clusterctl-chat.service\nclusterctl-router.service\nclusterctl-.service\nclusterctl-*.service\n"
            "other.service\nclusterctl-a..b.service\nclusterctl-x.service.d\n")
    assert facts.parse_installed(text, "/etc/systemd/system", "clusterctl-", ".service") == {
        "chat": "/etc/systemd/system/clusterctl-chat.service",
        "router": "/etc/systemd/system/clusterctl-router.service"}
    plists = "io.clusterctl.chat.plist\ncom.apple.x.plist\n"
    assert facts.parse_installed(plists, "/Library/LaunchDaemons", "io.clusterctl.", ".plist") == {
        "chat": "/Library/LaunchDaemons/io.clusterctl.chat.plist"}
    assert facts.parse_installed("", "/x", "p", "s") == {}


def test_each_manager_lists_the_folder_and_names_layout_gives_its_files() -> None:
    linux, mac = Node(address="10.0.0.1", ram="8GiB"), Node(address="10.0.0.2", os="macos", unified_memory="8GiB")
    assert MANAGERS["systemd"].installed(linux) == ("/etc/systemd/system", "clusterctl-", ".service")
    assert MANAGERS["launchd"].installed(mac) == ("/Library/LaunchDaemons", "io.clusterctl.", ".plist")
    assert MANAGERS["direct"].installed(linux) == ("/opt/clusterctl/bin", "", "-ctl.sh")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_probe_script_lists_the_installed_files(tmp_path: Path) -> None:
    units = tmp_path / "units"
    units.mkdir()
    for name in ("clusterctl-b.service", "clusterctl-a.service", "other.service", "clusterctl-c.socket"):
        (units / name).write_text("[Unit]\n")
    (units / "clusterctl-d.service").mkdir()  # not a file
    marker = "@@clusterctl-test@@"

    def listed(folder: str) -> dict[str, str]:
        argv = facts.probe_argv(marker=marker, base=str(tmp_path), manager="direct", files=[], weights=[], dirs=[],
                                handles=[], binaries=[], commands=[], installed=(folder, "clusterctl-", ".service"))
        out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout
        return facts.parse_probe("n1", out, marker, dirs=[], handles=[],
                                 installed=(folder, "clusterctl-", ".service")).installed

    assert listed(str(units)) == {"a": f"{units}/clusterctl-a.service", "b": f"{units}/clusterctl-b.service"}
    assert listed(str(tmp_path / "absent")) == {}
    for path in units.iterdir():
        if path.is_file():
            path.unlink()
    assert listed(str(units)) == {}  # no match: the glob's pattern is not taken for a file


def test_an_orphan_is_a_service_found_that_the_node_should_not_hold() -> None:
    d = Desired(node="n1", base="/opt/clusterctl", manager="direct", services=["web-ctl", "router"],
                files=[RenderedFile("n1", "/opt/clusterctl/bin/web-ctl.sh", "x", 0o755, ("web-ctl",))],
                unit_files={"/opt/clusterctl/bin/web-ctl-ctl.sh", "/opt/clusterctl/bin/router-ctl.sh"})
    f = NodeFacts(node="n1", installed={
        "web": "/opt/clusterctl/bin/web-ctl.sh",  # the launch script of web-ctl, not a control script
        "web-ctl": "/opt/clusterctl/bin/web-ctl-ctl.sh", "router": "/opt/clusterctl/bin/router-ctl.sh",
        "old": "/opt/clusterctl/bin/old-ctl.sh", "gone": "/opt/clusterctl/bin/gone-ctl.sh"})
    f.units = {"/opt/clusterctl/bin/web-ctl-ctl.sh": "active", "/opt/clusterctl/bin/router-ctl.sh": "active"}
    assert orphans(d, f) == ["gone", "old"]
    assert [(s.phase, s.kind, s.target) for s in diff(d, f) if s.kind == "remove"] == []
    assert [(s.phase, s.kind, s.target, s.service) for s in diff(d, f, prune=True) if s.kind == "remove"] == [
        ("services", "remove", "gone", "gone"), ("services", "remove", "old", "old")]
    d.services.remove("router")  # the router lives on another node now
    d.unit_files.discard("/opt/clusterctl/bin/router-ctl.sh")
    assert orphans(d, f) == ["gone", "old", "router"]
