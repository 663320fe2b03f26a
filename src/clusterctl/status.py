"""A snapshot of the running cluster: per service its state, health, memory in use against
the plan, and the router's request rate and recent errors. Read-only."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from clusterctl.deploy import checks
from clusterctl.deploy.managers import manager
from clusterctl.engines import launch_specs
from clusterctl.http import http
from clusterctl.inventory import Inventory
from clusterctl.layout import http_url, local_host
from clusterctl.planner import Plan
from clusterctl.secretref import read_secret
from clusterctl.transport import Transport, TransportError


@dataclass
class ServiceStatus:
    node: str
    service: str
    engine: str
    state: str  # active / inactive / failed / unreachable
    health: str  # ok / loading / down / -
    memory: int = 0  # bytes resident (process tree of the unit)
    planned: int = 0  # bytes the plan gave it
    errors: list[str] = field(default_factory=list)  # recent error lines from its journal


@dataclass
class StatusSnapshot:
    services: list[ServiceStatus] = field(default_factory=list)
    requests_total: float | None = None  # router counter
    taken: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"services": [asdict(s) for s in self.services], "router_requests_total": self.requests_total,
                "taken": self.taken}


def parse_requests_total(metrics: str) -> float | None:
    values = [float(m.group(1)) for m in re.finditer(r"^clusterctl_router_requests_total\{[^}]*\} (\S+)$",
                                                     metrics, re.M)]
    if values:
        return sum(values)
    return 0.0 if "# TYPE clusterctl_router_requests_total counter" in metrics or \
        "# TYPE clusterctl_router_requests counter" in metrics else None


def snapshot(inv: Inventory, connect: Callable[[str], Transport], plan: Plan | None = None) -> StatusSnapshot:
    specs = launch_specs(inv, plan)
    planned: dict[str, int] = {}
    if plan is not None:
        for d in plan.devices:
            for u in d.usages:
                planned[u.service] = planned.get(u.service, 0) + u.total
    snap = StatusSnapshot(taken=time.time())

    def one(node: str) -> list[ServiceStatus]:
        mine = [s for s in specs if s.node == node]
        try:
            t = connect(node)
        except TransportError as exc:
            return [ServiceStatus(node, s.service, s.engine, "unreachable", "-", errors=[str(exc)]) for s in mine]
        out = []
        n = inv.nodes[node]
        mgr = manager(n)
        try:
            for s in mine:
                c = mgr.inspect(n, s.service)
                shown = t.run(list(c.argv), timeout=c.timeout)
                seen = mgr.parse_inspect(shown.rc, shown.out)
                memory = seen.memory
                if not memory and seen.pid:
                    pid = str(seen.pid)  # with its children where ps can say (GNU ps; BSD ps: the process)
                    who = ["-p", pid] if n.os == "macos" else ["--pid", pid, "--ppid", pid]
                    rss = t.run(["ps", "-o", "rss=", *who], timeout=30).out
                    memory = sum(int(v) for v in rss.split() if v.isdigit()) * 1024
                errors: list[str] = []
                journal = mgr.errors(n, s.service)
                if journal is not None:
                    text = t.run(list(journal.argv), timeout=journal.timeout).out
                    errors = [line for line in text.splitlines() if line.strip()][-3:]
                if s.health_path is not None:
                    code = http(t, http_url(local_host(s.bind), s.port, s.health_path), timeout=5).status
                    health = {200: "ok", 503: "loading"}.get(code, "down")
                elif (probe := checks.health_probe(s)) is not None:  # the adapter's check is a TCP connect
                    tcp = t.run(list(probe.argv), timeout=probe.timeout)
                    health = "ok" if checks.probe_passed(probe, tcp.rc, tcp.out) else "down"
                else:  # no port of its own (a headless worker): running is serving
                    health = "ok" if seen.alive else "down"
                out.append(ServiceStatus(node, s.service, s.engine, seen.state, health, memory,
                                         planned.get(s.service, 0), errors))
            if inv.router is not None and inv.router.node == node:
                r = inv.router
                host = local_host(r.bind)
                metrics = http(t, http_url(host, r.port, "/metrics"), key=read_secret(r.api_key), timeout=5)
                snap.requests_total = parse_requests_total(metrics.body.decode(errors="replace"))
        finally:
            t.close()
        return out

    with ThreadPoolExecutor(max_workers=max(1, min(len(inv.nodes), inv.cluster.max_parallel))) as pool:
        for items in pool.map(one, list(inv.nodes)):
            snap.services += items
    return snap
