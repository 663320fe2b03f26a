"""launchd (macOS): daemons in /Library/LaunchDaemons, driven with launchctl bootstrap /
kickstart / bootout, inspected with launchctl print; logs in the file the plist names."""

from __future__ import annotations

import re

from clusterctl.deploy.managers.base import Control, Inspect, Pattern, pattern
from clusterctl.inventory import Node
from clusterctl.layout import launchd_label, launchd_plist, log_path

DOMAIN = "system"


class Launchd:
    name = "launchd"

    def handle(self, node: Node, service: str) -> str:
        return launchd_label(service)

    def unit_file(self, node: Node, service: str) -> str:
        return launchd_plist(service)

    def reload(self) -> list[Control]:
        return []  # bootstrap reads the plist anew

    def restart(self, node: Node, service: str) -> list[Control]:
        target = f"{DOMAIN}/{self.handle(node, service)}"
        # bootout fails when the job is not loaded (first start): that is fine
        return [Control(("launchctl", "bootout", target), check=False),
                Control(("launchctl", "bootstrap", DOMAIN, launchd_plist(service))),
                Control(("launchctl", "kickstart", target))]

    def stop(self, node: Node, service: str) -> list[Control]:
        return [Control(("launchctl", "bootout", f"{DOMAIN}/{self.handle(node, service)}"), check=False)]

    def remove(self, node: Node, service: str) -> list[Control]:
        # bootout fails when the job is not loaded: fine. No `launchctl disable`: it would outlive
        # the plist and refuse a service of the same name added later; without its plist the job
        # is not loaded at boot
        return self.stop(node, service)

    def installed(self, node: Node) -> Pattern:
        return pattern(self.unit_file(node, "*"))

    def inspect(self, node: Node, service: str) -> Control:
        return Control(("launchctl", "print", f"{DOMAIN}/{self.handle(node, service)}"), check=False, timeout=30)

    def parse_inspect(self, rc: int, out: str) -> Inspect:
        """`launchctl print` of a job: `state = running`, `pid = N` at the first indentation
        level; a job that is not loaded makes it exit non-zero."""
        if rc != 0:
            return Inspect(False, "unloaded")
        state = re.search(r"^\t?\s*state = (\S+)", out, re.M)
        pid = re.search(r"^\t?\s*pid = (\d+)", out, re.M)
        word = state.group(1) if state else "unknown"
        # a job that crashed is restarted by KeepAlive after ThrottleInterval: "spawn scheduled"
        return Inspect(word == "running", word, int(pid.group(1)) if pid else 0)

    def logs(self, node: Node, service: str, lines: int = 25) -> Control:
        return Control(("tail", "-n", str(lines), log_path(node, service)), check=False, timeout=30)

    def look(self, node: Node, service: str) -> str:
        return f"launchctl print {DOMAIN}/{self.handle(node, service)}"

    def errors(self, node: Node, service: str) -> Control | None:
        return None


MANAGER = Launchd()
