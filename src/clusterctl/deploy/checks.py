"""What deploy checks before and after it changes a node: preflight (pure, on the facts),
and the read-only probes of a service (health, liveness, last log lines, rpc workers)."""

from __future__ import annotations

import time

from clusterctl.deploy import ops
from clusterctl.deploy.changes import orphans
from clusterctl.deploy.desired import DeployError
from clusterctl.deploy.facts import gpu_drift, port_conflict
from clusterctl.deploy.managers import ServiceManager
from clusterctl.deploy.model import FETCH_KINDS, Desired, NodeFacts, Step
from clusterctl.engines import LaunchSpec
from clusterctl.inventory import Inventory, Node
from clusterctl.layout import host_port, http_url, local_host, rpc_endpoint, unit_name
from clusterctl.transport import Transport

HEALTH_POLL_FIRST = 0.1  # seconds before the second health probe of a restarted service, doubling
HEALTH_POLL_MAX = 1.0

COMMAND_PURPOSE = {"build-engine": "build llama.cpp", "pull-source": "download the llama.cpp source",
                   "install-engine": "create the engines' venvs"}


def preflight(inv: Inventory, d: Desired, facts: NodeFacts, steps: list[Step], specs: dict[str, LaunchSpec]) -> None:
    """Refuse a node before anything changes: less GPU than planned, a port taken by a process
    clusterctl did not start, a missing engine or tool, too little disk."""
    problem = gpu_drift(inv.nodes[d.node], facts.gpus)
    if problem:
        raise DeployError(f"{d.node}: {problem}",
                          hint="fix the node's accelerators in the inventory and run clusterctl plan")
    # a service renamed with its port kept: the orphan (`--prune`) holds the port until its removal,
    # which runs before any start; a port still taken then fails that start and is rolled back
    removing = any(step.kind == "remove" for step in steps)
    for step in steps:
        if step.kind not in ("restart", "start") or step.service not in specs:
            continue
        spec = specs[step.service]
        running = facts.units.get(d.units.get(step.service, "")) == "active"
        taken = port_conflict(facts.listeners, spec.bind, spec.port) if spec.port else None
        if taken is not None and not running and not removing:
            address, owner = taken
            unit = facts.port_units.get((address, spec.port))
            left = orphans(d, facts)
            holder = next((s for s in left if f"{unit_name(s)}.service" == unit), None)  # systemd's name
            if holder:
                raise DeployError(f"{d.node}: port {spec.port} is taken on {address} by {holder} ({unit}), "
                                  f"which the inventory no longer gives this node; {step.service} would not start",
                                  hint="deploy --prune removes it first")
            if left and not facts.has_systemd:  # no cgroup to tell who holds the port
                hint = (f"if it is {' or '.join(left)}, which the inventory no longer gives this node, "
                        "deploy --prune removes it first; else stop that process or give the service another port")
            else:
                hint = ("stop that process or give the service another port; "
                        "clusterctl does not kill processes it did not start")
            raise DeployError(f"{d.node}: port {spec.port} is taken on {address} by another process "
                              f"({owner or 'owner not visible'}); {step.service} would not start", hint=hint)
    pushed = {e.path for e in d.engines}
    pushed |= {b.binary(t) for b, _ in d.builds for t in b.targets}
    pushed |= {p for v in d.venvs for p in v.provides}
    missing = [b for b in sorted(d.binaries) if b not in facts.executables and b not in pushed]
    if missing:
        what = "; ".join(f"{b} ({d.binaries[b]})" for b in missing)
        raise DeployError(f"{d.node}: engine(s) missing: {what}",
                          hint="install them on the node, set the service's `binary`, or set "
                          "cluster.engines.llama_cpp to push a llama.cpp build")
    kinds = {s.kind for s in steps}
    for kind, alternatives in d.commands.items():
        absent = [alt.split("|")[0] for alt in dict.fromkeys(alternatives)
                  if not set(alt.split("|")) & facts.commands]
        if kind in kinds and absent:
            raise DeployError(f"{d.node}: {', '.join(absent)} not found on the node; needed to "
                              f"{COMMAND_PURPOSE[kind]}",
                              hint="install it (Debian/Ubuntu: apt install cmake g++ make curl python3-venv; "
                              "CUDA: the CUDA toolkit; ROCm: hipcc), or push a controller-side build with "
                              "cluster.engines.llama_cpp")
    if "install-engine" in kinds:
        for python, oldest in d.pythons.items():
            have = facts.python_versions.get(python)
            if python in facts.commands and have is not None and have < oldest:
                found = f"Python {have[0]}.{have[1]}" if have != (0, 0) else "a program that does not run"
                raise DeployError(f"{d.node}: {python} is {found}; the router needs Python "
                                  f"{oldest[0]}.{oldest[1]} or newer",
                                  hint=f"install it (Debian/Ubuntu: apt install python{oldest[0]}.{oldest[1]} "
                                  f"python{oldest[0]}.{oldest[1]}-venv) and set cluster.engines.router.python "
                                  "to it; nothing was written")
    need: dict[str, int] = {}
    for s in steps:
        if s.kind in FETCH_KINDS:
            folder = s.target.rsplit("/", 1)[0]
            need[folder] = need.get(folder, 0) + s.bytes
    for folder, size in need.items():
        free = facts.disk_free.get(folder, 0)
        if free < size:
            raise DeployError(f"{d.node}: {folder} has {free / 1e9:.1f} GB free, {size / 1e9:.1f} GB are needed",
                              hint="free disk space or move models_dir; nothing was downloaded")


def health_probe(spec: LaunchSpec) -> ops.Run | None:
    """The one probe that says a service serves: its adapter's HTTP path, or a TCP connect
    (None: it has no port; running is serving)."""
    if not spec.port:
        return None
    host = local_host(spec.bind)
    if spec.health_path is None:
        return ops.tcp_probe(host, spec.port)
    return ops.http_probe(http_url(host, spec.port, spec.health_path))


def probe_passed(probe: ops.Run, rc: int, out: str) -> bool:
    return rc == 0 if probe.script == "tcp-probe" else out.strip() == "200"


def alive(t: Transport, mgr: ServiceManager, node: Node, service: str) -> bool:
    c = mgr.inspect(node, service)
    r = t.run(list(c.argv), timeout=c.timeout)
    return mgr.parse_inspect(r.rc, r.out).alive


def wait_healthy(t: Transport, mgr: ServiceManager, node: Node, spec: LaunchSpec) -> str | None:
    """None once the service passes its health probe; why not, when it exits or times out.
    A service with no port of its own (a headless worker) is healthy while it runs."""
    if not spec.port:
        return None if alive(t, mgr, node, spec.service) else f"{spec.service} exited during start-up"
    probe = health_probe(spec)
    assert probe is not None
    deadline = time.monotonic() + spec.startup_timeout
    pause = HEALTH_POLL_FIRST
    while time.monotonic() < deadline:
        r = t.run(list(probe.argv), timeout=probe.timeout)
        if probe_passed(probe, r.rc, r.out):
            return None
        if not alive(t, mgr, node, spec.service):
            return f"{spec.service} exited during start-up"
        time.sleep(pause)
        pause = min(pause * 2, HEALTH_POLL_MAX)  # a small model answers within a second
    return f"{spec.service} not healthy after {spec.startup_timeout:.0f} s"


def logs(t: Transport, mgr: ServiceManager, node: Node, service: str) -> str:
    c = mgr.logs(node, service)
    return t.run(list(c.argv), timeout=c.timeout).out


def check_workers(inv: Inventory, t: Transport, d: Desired, spec: LaunchSpec) -> None:
    """A head whose rpc workers are down is refused before any of its files change."""
    for worker in spec.remote_after:
        wsvc = inv.services[worker]
        host, port = rpc_endpoint(inv, worker)
        probe = ops.tcp_probe(host, port, timeout=15)
        if not t.run(list(probe.argv), timeout=probe.timeout).ok:
            raise DeployError(f"{d.node}: {spec.service} was not restarted: its rpc worker {worker} "
                              f"({host_port(host, port)} on {wsvc.node_names[0]}) is not reachable",
                              hint=f"start {worker} first (deploy {wsvc.node_names[0]}) and check the "
                              "firewall between the nodes")
