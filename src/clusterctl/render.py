"""(Inventory, Plan) -> the exact files each node needs. Pure: no I/O but reading templates.

One strict Jinja environment (undefined variables are errors; a template error names the
template and line). Output is deterministic: no timestamps, sorted keys, stable order, so a
hash compare decides "changed". Secrets are never rendered: files name the 0600 secret files
that deploy writes; `render` shows them as references.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape as xml_escape

import jinja2

from clusterctl import firewall
from clusterctl.engines import LaunchSpec, SecretFile, adapter, health_path, launch_specs
from clusterctl.errors import ClusterctlError, ExitCode
from clusterctl.inventory import Inventory, Node
from clusterctl.layout import (
    ROUTER_HEALTH,
    ROUTER_SERVICE,
    address,
    base_dir,
    companion_script,
    control_script,
    host_port,
    http_url,
    launchd_label,
    launchd_plist,
    local_host,
    log_path,
    pid_file,
    script_path,
    secret_path,
    systemd_unit_file,
    unit_name,
)
from clusterctl.planner import Plan
from clusterctl.router.config import Backend, Health, Queue, RouteTable


class RenderError(ClusterctlError):
    exit_code = ExitCode.INVALID_INVENTORY


@dataclass(frozen=True)
class RenderedFile:
    node: str
    path: str  # absolute path on the node
    content: str
    mode: int = 0o644
    restarts: tuple[str, ...] = ()  # services to restart when this file changes
    secrets: tuple[str, ...] = ()  # secret references this file points at (never their values)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content.encode()).hexdigest()


@dataclass
class Rendered:
    files: list[RenderedFile] = field(default_factory=list)
    secrets: list[tuple[str, SecretFile]] = field(default_factory=list)  # (node, secret) to install

    def for_node(self, node: str) -> list[RenderedFile]:
        return [f for f in self.files if f.node == node]


def templates_dir() -> Path:
    here = Path(__file__).resolve().parent
    packaged = here / "templates"
    return packaged if packaged.is_dir() else here.parent.parent / "templates"


def _sh(value: object) -> str:
    return shlex.quote(str(value))


def _shjoin(values: Iterable[object]) -> str:
    return " ".join(shlex.quote(str(v)) for v in values)


def _shlines(values: Iterable[object]) -> str:
    """Quoted words, an option and its value per line, joined with backslash-newlines."""
    words = [shlex.quote(str(v)) for v in values]
    lines: list[str] = []
    for word in words:
        if lines and not (word.startswith("-") and len(lines) > 0) and lines[-1].startswith("-") \
                and " " not in lines[-1]:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return " \\\n    ".join(lines)


def _yaml(value: object) -> str:
    return json.dumps(str(value))  # a JSON string is a valid YAML scalar


def _xml(value: object) -> str:
    return xml_escape(str(value), {'"': "&quot;"})


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(sh=_sh, shjoin=_shjoin, shlines=_shlines, yaml=_yaml, xml=_xml)
    return env


def render_template(name: str, **context: Any) -> str:
    try:
        return environment().get_template(name).render(**context)
    except jinja2.TemplateSyntaxError as exc:
        raise RenderError(f"template {exc.name or name}:{exc.lineno}: {exc.message}") from None
    except jinja2.TemplateError as exc:
        line = _template_line(exc, name)
        raise RenderError(f"template {name}{line}: {exc}",
                          hint="a variable the template uses is missing; this is a bug in clusterctl") from None


def _template_line(exc: BaseException, name: str) -> str:
    tb = exc.__traceback__
    line = ""
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(name):
            line = f":{tb.tb_lineno}"
        tb = tb.tb_next
    return line


# ---------------------------------------------------------------------------------------

def _device_allow(node: Node, spec: LaunchSpec) -> list[str]:
    if spec.container or node.os != "linux":
        return []
    allow: list[str] = []
    if "cuda" in spec.gpu_kinds:
        count = sum(a.count for a in node.accelerators if a.kind == "cuda")
        allow += ["/dev/nvidiactl rw", "/dev/nvidia-uvm rw", "/dev/nvidia-uvm-tools rw"]
        allow += [f"/dev/nvidia{i} rw" for i in range(count)]
    if "rocm" in spec.gpu_kinds:
        allow.append("/dev/kfd rw")
    if {"rocm", "vulkan"} & set(spec.gpu_kinds):
        allow.append("char-drm rw")
    return allow


def _firewall_script(spec: LaunchSpec) -> str:
    sources = spec.firewall or ()
    v4 = [s for s in sources if ipaddress.ip_network(s, strict=False).version == 4]
    v6 = [s for s in sources if ipaddress.ip_network(s, strict=False).version == 6]
    tables = [("iptables" if fam == 4 else "ip6tables", v4 if fam == 4 else v6) for fam in firewall.family(spec.bind)]
    return render_template("scripts/firewall.sh.j2", spec=spec, table=firewall.table(spec.service),
                           chain=firewall.chain(spec.service), v4=v4, v6=v6, tables=tables)


def _service_files(inv: Inventory, spec: LaunchSpec, same_node: dict[str, list[str]]) -> list[RenderedFile]:
    node = inv.nodes[spec.node]
    base = base_dir(node)
    script = script_path(node, spec.service)
    restarts = (spec.service,)
    secrets = tuple(s.ref for s in spec.secrets)
    files = [RenderedFile(spec.node, script, render_template("scripts/launch.sh.j2", spec=spec), 0o755,
                          restarts, secrets)]
    for path, content in spec.extra_files:
        files.append(RenderedFile(spec.node, path, content, 0o644, restarts))
    stop_script = None
    if spec.container:
        stop_script = companion_script(node, spec.service, "stop")
        files.append(RenderedFile(spec.node, stop_script, render_template("scripts/container-stop.sh.j2", spec=spec),
                                  0o755, restarts))
    fw_script = None
    if spec.firewall is not None:
        fw_script = companion_script(node, spec.service, "firewall")
        files.append(RenderedFile(spec.node, fw_script, _firewall_script(spec), 0o755, restarts))
    post_script = None
    if spec.post_start:
        post_script = companion_script(node, spec.service, "post")
        files.append(RenderedFile(spec.node, post_script, render_template("scripts/post-start.sh.j2", spec=spec),
                                  0o755, restarts))
    manager = node.manager
    if manager == "systemd":
        unit = unit_name(spec.service)
        after = [f"{unit_name(s)}.service" for s in same_node.get(spec.service, [])]
        text = render_template("systemd/service.j2", spec=spec, script=script, unit=unit, after_units=after,
                               device_allow=_device_allow(node, spec), state_dir=f"{base}/state",
                               stop_script=stop_script, post_script=post_script, fw_script=fw_script)
        files.append(RenderedFile(spec.node, systemd_unit_file(spec.service), text, 0o644, restarts))
    elif manager == "launchd":
        label = launchd_label(spec.service)
        text = render_template("launchd/service.plist.j2", spec=spec, script=script, label=label,
                               log=log_path(node, spec.service))
        files.append(RenderedFile(spec.node, launchd_plist(spec.service), text, 0o644, restarts))
    else:
        control = control_script(node, spec.service)
        text = render_template("scripts/direct.sh.j2", spec=spec, script=script, control=control,
                               pidfile=pid_file(node, spec.service), log=log_path(node, spec.service))
        files.append(RenderedFile(spec.node, control, text, 0o755, restarts))
    return files


def upstream_key_path(service: str) -> str:
    """Where the router node keeps a copy of a service's API key (router and Prometheus use it)."""
    return secret_path(f"{ROUTER_SERVICE}-upstream-{service}")


def route_table(inv: Inventory) -> RouteTable | None:
    r = inv.router
    if r is None:
        return None
    backends: dict[str, Backend] = {}
    names = {s for chain in [r.default, *r.routes.values()] for s in chain}
    for name in sorted(names):
        svc = inv.services[name]
        node = inv.nodes[svc.node_names[0]]
        host = svc.bind
        if host in ("0.0.0.0", "::"):
            host = address(node)
        if svc.node_names[0] != r.node and host in ("127.0.0.1", "::1"):
            host = address(node)
        key = upstream_key_path(name) if svc.api_key else None
        served = adapter(svc.engine).served_model(inv, name, svc, node)
        backends[name] = Backend(url=http_url(host, svc.default_port), model=served, api_key_file=key,
                                 max_concurrency=max(1, svc.parallel * 2),
                                 health_path=health_path(svc),
                                 timeout=max(600.0, svc.startup_timeout), startup=svc.startup_timeout)
    return RouteTable(
        cluster=inv.cluster.name, listen_host=r.bind, listen_port=r.port,
        api_keys_file=secret_path(ROUTER_SERVICE) if r.api_key else None,
        backends=backends, routes={k: list(v) for k, v in sorted(r.routes.items())}, default=list(r.default),
        health=Health(interval=r.health.interval, timeout=r.health.timeout, failures=r.health.failures,
                      cooldown=r.health.cooldown, recoveries=r.health.recoveries),
        queue=Queue(size=r.queue, timeout=r.queue_timeout),
    )


def router_spec(inv: Inventory, plan_specs: list[LaunchSpec]) -> LaunchSpec:
    """The router's own service: how it starts, where it listens and how its health is probed."""
    r = inv.router
    assert r is not None
    base = base_dir(inv.nodes[r.node])
    table = route_table(inv)
    assert table is not None
    secrets: list[SecretFile] = []
    if r.api_key:
        secrets.append(SecretFile(secret_path(ROUTER_SERVICE), None, r.api_key.describe()))
    # copies of the keys of every keyed service the router or Prometheus talks to
    keyed = {s.service for s in plan_specs if s.secrets and (s.service in table.backends or s.metrics_path)}
    for name in sorted(keyed):
        ref = inv.services[name].api_key
        assert ref is not None
        secrets.append(SecretFile(upstream_key_path(name), None, ref.describe()))
    return LaunchSpec(
        service=ROUTER_SERVICE.removeprefix("clusterctl-"), node=r.node, engine="router",
        argv=(*([*r.command, "router"] if r.command else [f"{base}/venv/bin/clusterctl-router"]), "serve",
              "--routes", f"{base}/router/routes.json"),
        port=r.port, bind=r.bind, health_path=ROUTER_HEALTH, metrics_path="/metrics", startup_timeout=60.0,
        secrets=tuple(secrets),
    )


def _router_files(inv: Inventory, plan_specs: list[LaunchSpec]) -> tuple[list[RenderedFile], list[SecretFile]]:
    r = inv.router
    assert r is not None
    table = route_table(inv)
    assert table is not None
    spec = router_spec(inv, plan_specs)
    routes_path = spec.argv[-1]
    routes_text = json.dumps(table.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    files = _service_files(inv, spec, {})
    files.append(RenderedFile(r.node, routes_path, routes_text, 0o644, (spec.service,),
                              tuple(s.ref for s in spec.secrets)))
    return files, list(spec.secrets)


def _monitoring_files(inv: Inventory, specs: list[LaunchSpec]) -> list[RenderedFile]:
    r = inv.router
    assert r is not None
    node = inv.nodes[r.node]
    jobs = []
    for spec in specs:
        if not spec.metrics_path:
            continue
        n = inv.nodes[spec.node]
        host = spec.bind
        if host in ("0.0.0.0", "::") or (spec.node != r.node and host in ("127.0.0.1", "::1")):
            host = address(n)
        token = upstream_key_path(spec.service) if spec.secrets else None
        jobs.append({"name": spec.service, "path": spec.metrics_path, "target": host_port(host, spec.port),
                     "node": spec.node, "service": spec.service, "engine": spec.engine, "token_file": token})
    jobs.append({"name": "router", "path": "/metrics", "target": host_port(local_host(r.bind), r.port), "node": r.node,
                 "service": "router", "engine": "router",
                 "token_file": secret_path(ROUTER_SERVICE) if r.api_key else None})
    base = base_dir(node)
    prom = render_template("monitoring/prometheus.yml.j2", cluster=inv.cluster.name, jobs=jobs)
    dashboard = json.dumps(grafana_dashboard(inv), indent=2, sort_keys=True) + "\n"
    return [RenderedFile(r.node, f"{base}/monitoring/prometheus.yml", prom),
            RenderedFile(r.node, f"{base}/monitoring/grafana-dashboard.json", dashboard)]


def grafana_dashboard(inv: Inventory) -> dict[str, Any]:
    """Seed 001's dashboards: availability, tokens/s per model, routing distribution, latency."""
    panels = [
        ("Backend health (1 = up)", "clusterctl_router_backend_up", "timeseries"),
        ("Requests/s by route", "sum by (route) (rate(clusterctl_router_requests_total[5m]))", "timeseries"),
        ("Requests/s by backend", "sum by (backend) (rate(clusterctl_router_requests_total[5m]))", "timeseries"),
        ("Time to first byte p95 (s)",
         "histogram_quantile(0.95, sum by (le, backend) (rate(clusterctl_router_ttfb_seconds_bucket[5m])))",
         "timeseries"),
        ("Tokens/s generated (llama.cpp)", "llamacpp:predicted_tokens_seconds", "timeseries"),
        ("Tokens out/s by backend", "sum by (backend) (rate(clusterctl_router_tokens_total{direction=\"out\"}[5m]))",
         "timeseries"),
        ("Queue depth", "clusterctl_router_queue_depth", "timeseries"),
        ("vLLM generation throughput", "vllm:avg_generation_throughput_toks_per_s", "timeseries"),
    ]
    out = []
    for i, (title, expr, kind) in enumerate(panels):
        out.append({"id": i + 1, "title": title, "type": kind,
                    "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "targets": [{"expr": expr, "refId": "A"}]})
    return {
        "title": f"clusterctl: {inv.cluster.name}", "uid": f"clusterctl-{inv.cluster.name}"[:40],
        "schemaVersion": 39, "version": 1, "editable": True, "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]},
        "panels": out,
    }


def render(inv: Inventory, plan: Plan | None = None, *, nodes: Iterable[str] | None = None) -> Rendered:
    """Every file of every node (or of `nodes`), deterministic and sorted by (node, path)."""
    specs = launch_specs(inv, plan)
    for spec in specs:
        if (spec.bind not in ("127.0.0.1", "::1") and spec.engine != "rpc-server" and not spec.secrets
                and spec.firewall is None):
            raise RenderError(f"services.{spec.service}: binds {spec.bind} without an api_key",
                              hint="bind 127.0.0.1 or set api_key: {file: ...}")
    # same-node start order: rpc workers a head uses, when they share its node
    same_node: dict[str, list[str]] = {}
    for name, svc in inv.services.items():
        deps = [w for w in svc.rpc_workers if inv.services[w].node_names[0] == svc.node_names[0]]
        if deps:
            same_node[name] = deps
    out = Rendered()
    for spec in specs:
        out.files += _service_files(inv, spec, same_node)
        out.secrets += [(spec.node, s) for s in spec.secrets]
    if inv.router is not None:
        files, secrets = _router_files(inv, specs)
        out.files += files
        out.secrets += [(inv.router.node, s) for s in secrets]
        out.files += _monitoring_files(inv, specs)
    if nodes is not None:
        wanted = set(nodes)
        unknown = wanted - set(inv.nodes)
        if unknown:
            raise RenderError(f"unknown node(s): {', '.join(sorted(unknown))}",
                              hint=f"nodes: {', '.join(inv.nodes)}")
        out.files = [f for f in out.files if f.node in wanted]
        out.secrets = [s for s in out.secrets if s[0] in wanted]
    seen: dict[tuple[str, str], RenderedFile] = {}
    for f in out.files:
        if (f.node, f.path) in seen and seen[(f.node, f.path)].content != f.content:
            raise RenderError(f"two services write {f.path} on {f.node} differently")
        seen[(f.node, f.path)] = f
    out.files = sorted(seen.values(), key=lambda f: (f.node, f.path))
    return out
