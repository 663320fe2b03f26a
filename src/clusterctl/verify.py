"""Prove the cluster works: per service and per route, checks run on the nodes over the transport.

Each check is ok / warn / fail with a reason. HTTP requests are made by `curl` on the node
itself (services bind loopback or a private address); API keys go to curl on stdin as a header
file, never in argv.
"""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from clusterctl import sanity
from clusterctl.baselines import read_baselines
from clusterctl.deploy import ops
from clusterctl.deploy.facts import parse_lsof
from clusterctl.deploy.managers import manager
from clusterctl.engines import LaunchSpec, launch_specs
from clusterctl.http import Http, http
from clusterctl.inventory import Inventory
from clusterctl.layout import ROUTER_HEALTH, host_port, http_url, local_host, rpc_endpoint
from clusterctl.planner import Plan
from clusterctl.secretref import read_secret
from clusterctl.transport import Transport, TransportError

Status = Literal["ok", "warn", "fail"]
SMOKE_PROMPT = "Write one sentence about the sea."
SPEED_TOLERANCE = 0.30  # tokens/s may fall this far below the stored baseline before it fails


@dataclass
class Check:
    node: str
    subject: str  # service or route
    name: str
    status: Status
    detail: str
    value: float | None = None


@dataclass
class VerifyResult:
    checks: list[Check] = field(default_factory=list)
    measurements: dict[str, dict[str, float]] = field(default_factory=dict)  # service -> tokens/s, ttft

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks], "measurements": self.measurements}

    def junit(self) -> str:
        suites = ET.Element("testsuites", name="clusterctl verify")
        by_node: dict[str, list[Check]] = {}
        for c in self.checks:
            by_node.setdefault(c.node, []).append(c)
        for node, checks in sorted(by_node.items()):
            suite = ET.SubElement(suites, "testsuite", name=node, tests=str(len(checks)),
                                  failures=str(sum(c.status == "fail" for c in checks)))
            for c in checks:
                case = ET.SubElement(suite, "testcase", classname=f"{node}.{c.subject}", name=c.name)
                if c.status == "fail":
                    ET.SubElement(case, "failure", message=c.detail)
                elif c.status == "warn":
                    ET.SubElement(case, "system-out").text = f"warning: {c.detail}"
        return ET.tostring(suites, encoding="unicode") + "\n"


def _key(inv: Inventory, service: str) -> str | None:
    svc = inv.services.get(service)
    return read_secret(svc.api_key) if svc is not None else None


def load_baselines(path: Path, inventory: Path | None = None) -> dict[str, dict[str, float]]:
    """The stored baselines ({} before the first bench); an InventoryError naming a damaged file."""
    return read_baselines(path, inventory)


def check_service(inv: Inventory, t: Transport, spec: LaunchSpec, baselines: dict[str, dict[str, float]],
                  *, wait: float, tolerance: float = SPEED_TOLERANCE) -> tuple[list[Check], dict[str, float]]:
    node, name = spec.node, spec.service
    out: list[Check] = []
    measured: dict[str, float] = {}
    host = local_host(spec.bind)
    base = http_url(host, spec.port)
    if not spec.port:  # a headless worker (vLLM's other ranks): it runs, and its head answers for it
        mgr = manager(inv.nodes[node])
        c = mgr.inspect(inv.nodes[node], name)
        shown = t.run(list(c.argv), timeout=c.timeout)
        seen = mgr.parse_inspect(shown.rc, shown.out)
        out.append(Check(node, name, "running", "ok" if seen.alive else "fail", seen.state))
        return out, measured
    # listeners: only where the inventory says (a service still starting gets up to `wait` seconds)
    deadline = time.monotonic() + wait
    while True:
        if inv.nodes[node].os == "macos":  # BSD: no ss
            lsof = t.run(["lsof", "-nP", f"-iTCP:{int(spec.port)}", "-sTCP:LISTEN"], timeout=30)
            addresses = sorted({a for a, _, _ in parse_lsof(lsof.out)})
        else:
            ss = t.run(["sh", "-c", f"ss -ltnH 'sport = :{int(spec.port)}'"], timeout=30)
            addresses = sorted({line.split()[3].rsplit(":", 1)[0].strip("[]") for line in ss.out.splitlines()
                                if len(line.split()) >= 4})
        if addresses or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if not addresses:
        out.append(Check(node, name, "listening", "fail", f"nothing listens on port {spec.port}"))
        return out, measured
    wrong = [a for a in addresses if a != spec.bind]
    out.append(Check(node, name, "listening", "fail" if wrong else "ok",
                     f"bound to {', '.join(addresses)}" + (f", inventory says {spec.bind}" if wrong else "")))
    if spec.health_path is None or not spec.chat:
        # the adapter's health check is a TCP connect (rpc-server, a custom command without a
        # health path): listening where the inventory says is that check
        return out, measured
    key = _key(inv, name)
    # health: 200, or 503 while the model loads (wait up to `wait` seconds)
    deadline = time.monotonic() + wait
    while True:
        h = http(t, base + spec.health_path, key=key, timeout=10)
        if h.status == 200 or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if h.status != 200:
        state = "still loading (503)" if h.status == 503 else f"HTTP {h.status or 'unreachable'}"
        out.append(Check(node, name, "health", "fail", f"{spec.health_path}: {state}"))
        return out, measured
    out.append(Check(node, name, "health", "ok", f"{spec.health_path} 200"))
    expected = spec.model_id
    if spec.identity:
        models = http(t, base + "/v1/models", key=key, timeout=15)
        failed = _identity(node, name, expected, models, out)
        if failed:
            return out, measured
    # smoke prompt: completes, and the answer is sane
    body = {"model": expected, "messages": [{"role": "user", "content": SMOKE_PROMPT}], "max_tokens": 48,
            "temperature": 0}
    r = http(t, base + "/v1/chat/completions", method="POST", body=body, key=key, timeout=300)
    try:
        data = json.loads(r.body)
        answer = str(data["choices"][0]["message"]["content"] or "")
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        out.append(Check(node, name, "smoke", "fail", f"chat completion: HTTP {r.status}, "
                         f"{r.body[:200].decode(errors='replace')}"))
        return out, measured
    verdict = sanity.check(SMOKE_PROMPT, answer)
    snippet = answer.strip().replace("\n", " ")[:60]
    out.append(Check(node, name, "smoke", "ok" if verdict.ok else "fail",
                     f"answer: {snippet!r}" if verdict.ok else f"{'; '.join(verdict.problems)}: {snippet!r}"))
    # speed: against the stored baseline and the inventory's floor
    timings = data.get("timings") or {}
    usage = data.get("usage") or {}
    tps = float(timings.get("predicted_per_second") or 0.0)
    if not tps and usage.get("completion_tokens"):
        tps = float(usage["completion_tokens"]) / max(r.seconds, 1e-6)
    ttft = float(timings.get("prompt_ms") or 0.0) / 1000.0
    measured = {"tokens_per_second": round(tps, 2), "ttft_seconds": round(ttft, 4)}
    floor = inv.services[name].min_tokens_per_second
    base_tps = baselines.get(name, {}).get("tokens_per_second")
    if floor and tps < floor:
        out.append(Check(node, name, "speed", "fail", f"{tps:.1f} tokens/s, below the floor {floor:g}", tps))
    elif base_tps and tps < base_tps * (1 - tolerance):
        out.append(Check(node, name, "speed", "fail",
                         f"{tps:.1f} tokens/s, {1 - tps / base_tps:.0%} below the baseline {base_tps:.1f}", tps))
    else:
        ref = f" (baseline {base_tps:.1f})" if base_tps else " (no baseline yet: run clusterctl bench)"
        out.append(Check(node, name, "speed", "ok", f"{tps:.1f} tokens/s{ref}", tps))
    return out, measured


def _identity(node: str, name: str, expected: str, models: Http, out: list[Check]) -> bool:
    """The port serves the expected model, not some other process; True when it failed."""
    ids: list[str] = []
    try:
        data = json.loads(models.body or b"{}")
        ids = [str(m.get("id")) for m in data.get("data", [])] + [str(m.get("name")) for m in data.get("models", [])]
    except (json.JSONDecodeError, AttributeError):
        pass
    if models.status == 401:
        out.append(Check(node, name, "model", "fail", "/v1/models: 401, the API key in the inventory is refused"))
        return True
    if models.status == 200 and not models.body.strip():
        out.append(Check(node, name, "model", "fail",
                         f"/v1/models answered 200 with an empty body, expected '{expected}' (mlx-lm does this "
                         "when HF_HUB_CACHE is not an existing folder)"))
        return True
    if not any(i == expected or i.split(":")[0] == expected for i in ids):
        out.append(Check(node, name, "model", "fail",
                         f"/v1/models serves {', '.join(ids) or 'nothing'}, expected '{expected}' "
                         "(another process on this port?)"))
        return True
    out.append(Check(node, name, "model", "ok", f"serves '{expected}'"))
    return False


def check_rpc(inv: Inventory, t: Transport, spec: LaunchSpec) -> list[Check]:
    """From the head's node: every rpc worker accepts connections."""
    out = []
    svc = inv.services[spec.service]
    for w in svc.rpc_workers:
        host, port = rpc_endpoint(inv, w)
        probe = ops.tcp_probe(host, port, timeout=15)
        r = t.run(list(probe.argv), timeout=probe.timeout)
        out.append(Check(spec.node, spec.service, f"rpc {w}", "ok" if r.ok else "fail",
                         f"{host_port(host, port)} " + ("reachable" if r.ok else "not reachable from the head")))
    return out


def check_routes(inv: Inventory, t: Transport) -> list[Check]:
    """Through the router: each task type lands on the first backend of its chain."""
    r = inv.router
    assert r is not None
    out = []
    base = http_url(local_host(r.bind), r.port)
    key = read_secret(r.api_key)
    h = http(t, base + ROUTER_HEALTH, timeout=10)
    out.append(Check(r.node, "router", "health", "ok" if h.status == 200 else "fail", f"{ROUTER_HEALTH} {h.status}"))
    for task, chain in sorted(r.routes.items()):
        body = {"model": task, "messages": [{"role": "user", "content": "Reply with one word."}], "max_tokens": 4}
        resp = http(t, base + "/v1/chat/completions", method="POST", body=body, key=key, timeout=300)
        backend = resp.headers.get("x-clusterctl-backend", "")
        if resp.status != 200:
            out.append(Check(r.node, f"route {task}", "route", "fail", f"HTTP {resp.status}"))
        elif backend != chain[0]:
            out.append(Check(r.node, f"route {task}", "route", "warn" if backend in chain else "fail",
                             f"served by {backend or '?'}, expected {chain[0]}"))
        else:
            out.append(Check(r.node, f"route {task}", "route", "ok", f"-> {backend}"))
    return out


def parse_gpu_used(text: str) -> list[int]:
    """`nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits` (MiB) -> bytes per GPU."""
    out = []
    for line in text.split():
        try:
            out.append(int(float(line.strip().rstrip(","))) * 2**20)
        except ValueError:
            continue
    return out


def check_gpu_memory(inv: Inventory, t: Transport, node: str, plan: Plan | None) -> list[Check]:
    """GPU memory in use on the node against what the plan put there (NVIDIA nodes)."""
    n = inv.nodes[node]
    if plan is None or not any(a.kind == "cuda" for a in n.accelerators):
        return []
    r = t.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], timeout=60)
    if not r.ok:
        return [Check(node, "-", "gpu memory", "warn", "nvidia-smi did not answer")]
    used = parse_gpu_used(r.out)
    out = []
    for i, value in enumerate(used):
        try:
            device = plan.device(node, f"gpu{i}")
        except KeyError:
            continue
        planned = device.used
        status: Status = "ok"
        if planned and value > planned * 1.10:
            status = "warn"
        if value > device.capacity:
            status = "fail"
        out.append(Check(node, f"gpu{i}", "gpu memory", status,
                         f"{value / 2**30:.1f} GiB in use, plan {planned / 2**30:.1f} GiB of "
                         f"{device.capacity / 2**30:.1f} GiB", float(value)))
    return out


def verify(inv: Inventory, connect: Callable[[str], Transport], *, nodes: Sequence[str] | None = None,
           plan: Plan | None = None, baselines: dict[str, dict[str, float]] | None = None,
           wait: float = 30.0, tolerance: float = SPEED_TOLERANCE) -> VerifyResult:
    specs = launch_specs(inv, plan)
    wanted = list(nodes or inv.nodes)
    result = VerifyResult()

    def one(node: str) -> list[Check]:
        checks: list[Check] = []
        try:
            t = connect(node)
        except TransportError as exc:
            return [Check(node, "-", "connect", "fail", str(exc))]
        try:
            for spec in (s for s in specs if s.node == node):
                got, measured = check_service(inv, t, spec, baselines or {}, wait=wait, tolerance=tolerance)
                checks += got
                if measured:
                    result.measurements[spec.service] = measured
                if inv.services[spec.service].rpc_workers:
                    checks += check_rpc(inv, t, spec)
            checks += check_gpu_memory(inv, t, node, plan)
            if inv.router is not None and inv.router.node == node:
                checks += check_routes(inv, t)
        except TransportError as exc:
            checks.append(Check(node, "-", "connect", "fail", str(exc)))
        finally:
            t.close()
        return checks

    with ThreadPoolExecutor(max_workers=max(1, min(len(wanted), inv.cluster.max_parallel))) as pool:
        for checks in pool.map(one, wanted):
            result.checks += checks
    return result
