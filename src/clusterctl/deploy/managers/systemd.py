"""systemd: units under /etc/systemd/system, driven with systemctl, logs from the journal."""

from __future__ import annotations

from clusterctl.deploy.managers.base import Control, Inspect, Pattern, pattern
from clusterctl.inventory import Node
from clusterctl.layout import systemd_unit_file, unit_name


class Systemd:
    name = "systemd"

    def handle(self, node: Node, service: str) -> str:
        return f"{unit_name(service)}.service"

    def unit_file(self, node: Node, service: str) -> str:
        return systemd_unit_file(service)

    def reload(self) -> list[Control]:
        return [Control(("systemctl", "daemon-reload"))]

    def restart(self, node: Node, service: str) -> list[Control]:
        unit = self.handle(node, service)
        return [Control(("systemctl", "enable", "--", unit), check=False, timeout=60),
                Control(("systemctl", "reset-failed", "--", unit), check=False, timeout=60),
                Control(("systemctl", "restart", "--", unit))]

    def stop(self, node: Node, service: str) -> list[Control]:
        return [Control(("systemctl", "stop", "--", self.handle(node, service)))]

    def remove(self, node: Node, service: str) -> list[Control]:
        unit = self.handle(node, service)
        return [Control(("systemctl", "stop", "--", unit)),
                Control(("systemctl", "disable", "--", unit), check=False, timeout=60)]

    def installed(self, node: Node) -> Pattern:
        return pattern(self.unit_file(node, "*"))

    def inspect(self, node: Node, service: str) -> Control:
        return Control(("systemctl", "show", "-p", "ActiveState", "-p", "SubState", "-p", "MainPID",
                        "-p", "MemoryCurrent", "--", self.handle(node, service)), check=False, timeout=30)

    def parse_inspect(self, rc: int, out: str) -> Inspect:
        props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        state = props.get("ActiveState", "unknown")
        # a crashed unit waiting to be restarted is 'activating' too: its sub-state says so
        alive = state in ("active", "activating", "reloading") and \
            props.get("SubState") not in ("auto-restart", "failed", "dead")
        pid = props.get("MainPID", "0")
        memory = props.get("MemoryCurrent", "")
        return Inspect(alive, state, int(pid) if pid.isdigit() else 0, int(memory) if memory.isdigit() else 0)

    def logs(self, node: Node, service: str, lines: int = 25) -> Control:
        return Control(("journalctl", "-u", self.handle(node, service), "-n", str(lines), "--no-pager", "-o", "cat"),
                       check=False, timeout=60)

    def look(self, node: Node, service: str) -> str:
        return f"systemctl status {self.handle(node, service)}"

    def errors(self, node: Node, service: str) -> Control | None:
        return Control(("journalctl", "-u", self.handle(node, service), "-p", "err", "-n", "3", "--no-pager",
                        "-o", "cat", "--since", "-15min"), check=False, timeout=30)


MANAGER = Systemd()
