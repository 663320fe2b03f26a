"""No service manager: each service has a control script (start / stop / restart / status)
that keeps a pid file; logs go to a file next to it."""

from __future__ import annotations

import re

from clusterctl.deploy.managers.base import Control, Inspect, Pattern, pattern
from clusterctl.inventory import Node
from clusterctl.layout import control_script, log_path


class Direct:
    name = "direct"

    def handle(self, node: Node, service: str) -> str:
        return control_script(node, service)

    def unit_file(self, node: Node, service: str) -> str:
        return control_script(node, service)

    def reload(self) -> list[Control]:
        return []

    def restart(self, node: Node, service: str) -> list[Control]:
        return [Control((control_script(node, service), "restart"))]

    def stop(self, node: Node, service: str) -> list[Control]:
        return [Control((control_script(node, service), "stop"))]

    def remove(self, node: Node, service: str) -> list[Control]:
        return self.stop(node, service)  # nothing starts it but deploy: stopped is disabled

    def installed(self, node: Node) -> Pattern:
        return pattern(self.unit_file(node, "*"))

    def inspect(self, node: Node, service: str) -> Control:
        return Control((control_script(node, service), "status"), check=False, timeout=30)

    def parse_inspect(self, rc: int, out: str) -> Inspect:
        """The control script's `status`: exit 0 and `NAME: running (pid N)` when it runs."""
        pid = re.search(r"running \(pid (\d+)\)", out)
        return Inspect(rc == 0, "active" if rc == 0 else "inactive", int(pid.group(1)) if pid else 0)

    def logs(self, node: Node, service: str, lines: int = 25) -> Control:
        return Control(("tail", "-n", str(lines), log_path(node, service)), check=False, timeout=30)

    def look(self, node: Node, service: str) -> str:
        return f"{control_script(node, service)} status"

    def errors(self, node: Node, service: str) -> Control | None:
        return None


MANAGER = Direct()
