"""IPv6 literals in every URL and host:port clusterctl builds: in brackets ('http://[::1]:8080'),
in the route table, the monitoring targets, the checks verify, status, bench and deploy run on
the nodes, and the router itself listens on '::1'."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from clusterctl import bench, status, verify
from clusterctl.deploy import checks
from clusterctl.engines import launch_specs
from clusterctl.errors import InventoryError, InventoryErrors
from clusterctl.inventory import Inventory, load_inventory
from clusterctl.layout import host_port, http_url, local_host
from clusterctl.render import _monitoring_files, route_table
from clusterctl.router.validate import problems
from clusterctl.transport import CommandResult
from tests.router_upstream import ROOT

INVENTORY = """\
cluster: {{name: six}}
nodes:
  n1: {{address: '{address}', ram: 8GiB}}
models:
  m: {{source: 'file:///models/m.gguf'}}
services:
  chat: {{engine: llama-server, node: n1, model: m, bind: '{bind}', port: 8080{extra}}}
router: {{node: n1, bind: '{router_bind}', port: 8000, default: [chat]{router_extra}}}
"""


def inventory(tmp_path: Path, *, address: str = "::1", bind: str = "::1", router_bind: str = "::1",
              extra: str = "", router_extra: str = "") -> Inventory:
    path = tmp_path / "six.yaml"
    path.write_text(INVENTORY.format(address=address, bind=bind, router_bind=router_bind, extra=extra,
                                     router_extra=router_extra))
    return load_inventory(path)


class Recorder:
    """A transport that runs nothing: it records each command and answers it with a failure."""

    host = "n1"

    def __init__(self) -> None:
        self.argvs: list[tuple[str, ...]] = []

    def run(self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 120.0,
            sudo: bool = False, env: Mapping[str, str] | None = None) -> CommandResult:
        self.argvs.append(tuple(argv))
        if argv[:2] == ["sh", "-c"] and argv[2].startswith("ss -ltnH"):  # what ss shows for a socket on ::1
            return CommandResult(tuple(argv), 0, b"LISTEN 0 512 [::1]:8080 [::]:*\n", b"", 0.0)
        if argv[0] == "mktemp":
            return CommandResult(tuple(argv), 0, b"/tmp/clusterctl-bench.x\n", b"", 0.0)
        return CommandResult(tuple(argv), 7, b"", b"refused", 0.0)

    def put(self, path: str, data: bytes, *, mode: int = 0o644, **_: object) -> None:
        pass

    def close(self) -> None:
        pass

    def urls(self) -> list[str]:
        return [a for argv in self.argvs for a in argv if a.startswith("http")]


@pytest.mark.parametrize(("host", "port", "path", "expected_hp", "expected_url"), [
    ("::1", 8080, "/health", "[::1]:8080", "http://[::1]:8080/health"),
    ("fd00::5", 50052, "", "[fd00::5]:50052", "http://[fd00::5]:50052"),
    ("10.0.0.5", 8080, "/v1/models", "10.0.0.5:8080", "http://10.0.0.5:8080/v1/models"),
    ("node1.lan", 80, "", "node1.lan:80", "http://node1.lan:80"),
    ("[::1]", 8080, "", "[::1]:8080", "http://[::1]:8080"),
])
def test_host_port_and_url_bracket_ipv6_literals(host: str, port: int, path: str, expected_hp: str,
                                                 expected_url: str) -> None:
    assert host_port(host, port) == expected_hp
    assert http_url(host, port, path) == expected_url


def test_a_service_on_the_ipv6_wildcard_is_reached_over_ipv6_loopback() -> None:
    # a socket on '::' may be IPv6-only (net.ipv6.bindv6only): '::1' always reaches it
    assert (local_host("::"), local_host("0.0.0.0"), local_host("::1"), local_host("fd00::5")) == (
        "::1", "127.0.0.1", "::1", "fd00::5")


def test_route_table_brackets_ipv6_backends_and_router_check_accepts_it(tmp_path: Path) -> None:
    inv = inventory(tmp_path)
    table = route_table(inv)
    assert table is not None
    assert (table.backends["chat"].url, table.listen_host) == ("http://[::1]:8080", "::1")
    assert problems(table, check_files=False) == []


def test_an_ipv6_bind_is_kept_in_canonical_form(tmp_path: Path) -> None:
    # loopback checks, the router's URL and verify's comparison with what `ss` shows all see '::1'
    inv = inventory(tmp_path, bind="0:0:0:0:0:0:0:1", router_bind="0000::1")
    assert inv.router is not None
    assert (inv.services["chat"].bind, inv.router.bind) == ("::1", "::1")
    table = route_table(inv)
    assert table is not None and table.backends["chat"].url == "http://[::1]:8080"
    [spec] = launch_specs(inv, None)
    checked, _ = verify.check_service(inv, Recorder(), spec, {}, wait=0)
    assert [(c.name, c.status) for c in checked] == [("listening", "ok"), ("health", "fail")]


def test_route_table_brackets_the_node_address_of_a_wildcard_bind(tmp_path: Path) -> None:
    inv = inventory(tmp_path, address="fd00::1", bind="::", router_bind="::1",
                    extra=", api_key: {env: CHAT_KEY}")
    table = route_table(inv)
    assert table is not None
    assert table.backends["chat"].url == "http://[fd00::1]:8080"


def test_prometheus_targets_bracket_ipv6(tmp_path: Path) -> None:
    inv = inventory(tmp_path)
    [prom, *_] = [f for f in _monitoring_files(inv, launch_specs(inv, None)) if f.path.endswith("prometheus.yml")]
    assert "'[::1]:8080'" in prom.content or '"[::1]:8080"' in prom.content or "- [::1]:8080" in prom.content, \
        prom.content
    assert "[::1]:8000" in prom.content
    assert "::1:80" not in prom.content.replace("[::1]:80", "")


def test_verify_status_bench_and_deploy_probe_ipv6_urls(tmp_path: Path) -> None:
    inv = inventory(tmp_path)
    [spec] = launch_specs(inv, None)

    t = Recorder()
    verify.check_routes(inv, t)
    assert t.urls()[0] == "http://[::1]:8000/health"

    t = Recorder()
    checked, _ = verify.check_service(inv, t, spec, {}, wait=0)
    assert [(c.name, c.status) for c in checked] == [("listening", "ok"), ("health", "fail")]
    assert t.urls() == ["http://[::1]:8080/health"]

    t = Recorder()
    status.snapshot(inv, lambda node: t)
    assert t.urls() == ["http://[::1]:8080/health", "http://[::1]:8000/metrics"]

    probe = checks.health_probe(spec)
    assert probe is not None and probe.argv[-1] == "http://[::1]:8080/health"

    t = Recorder()
    bench._router_overhead(inv, t, spec, http_url("::1", 8080, "/v1/chat/completions"), None)
    assert "http://[::1]:8000/v1/chat/completions" in t.urls(), t.urls()
    assert set(t.urls()) <= {"http://[::1]:8080/v1/chat/completions", "http://[::1]:8000/v1/chat/completions"}


def test_ollama_is_told_its_ipv6_address_in_brackets(tmp_path: Path) -> None:
    # OLLAMA_HOST is split with Go's net.SplitHostPort, which needs an IPv6 host in brackets
    path = tmp_path / "ollama.yaml"
    path.write_text(INVENTORY.format(address="::1", bind="::1", router_bind="::1", extra="", router_extra="")
                    .replace("engine: llama-server", "engine: ollama").replace("port: 8080", "port: 11434"))
    [spec] = launch_specs(load_inventory(path), None)
    assert dict(spec.env)["OLLAMA_HOST"] == "[::1]:11434"


def test_rpc_server_is_refused_an_ipv6_bind(tmp_path: Path) -> None:
    # llama.cpp's RPC transport opens AF_INET sockets only (ggml-rpc transport.cpp)
    path = tmp_path / "rpc.yaml"
    path.write_text(textwrap.dedent("""\
        cluster: {name: six}
        nodes:
          n1: {address: 'fd00::1', ram: 8GiB}
        services:
          w: {engine: rpc-server, node: n1, bind: 'fd00::1', firewall: true}
        """))
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    errs = info.value.errors if isinstance(info.value, InventoryErrors) else [info.value]
    assert [(e.message, e.line) for e in errs] == [
        ("services.w.bind: bind fd00::1: llama.cpp's rpc-server listens and connects over IPv4 only; bind the "
         "node's IPv4 address", 5)]


# ---------------------------------------------------------------------------------------------
# the real router process, listening on ::1 (its table's listen_host), in front of a backend on ::1


class _Backend(BaseHTTPRequestHandler):
    def _send(self, code: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(200 if self.path == "/health" else 404, {"status": "ok", "host": self.headers.get("Host")})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self._send(200, {"id": "x", "object": "chat.completion", "model": "chat", "host": self.headers.get("Host"),
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": "over six"}}]})

    def log_message(self, format: str, *args: object) -> None:
        pass


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _v6_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def backend() -> Iterator[int]:
    try:
        server = _V6Server(("::1", 0), _Backend)
    except OSError as exc:  # no IPv6 loopback at all on this machine
        pytest.skip(f"no ::1: {exc}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_router_serve_listens_on_ipv6_loopback_and_proxies_to_an_ipv6_backend(tmp_path: Path, backend: int) -> None:
    text = INVENTORY.format(address="::1", bind="::1", router_bind="::1", extra="", router_extra="")
    path = tmp_path / "six.yaml"
    path.write_text(text.replace("port: 8080", f"port: {backend}").replace("port: 8000", f"port: {_v6_port()}"))
    inv = load_inventory(path)
    table = route_table(inv)
    assert table is not None
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps(table.model_dump(mode="json")))
    stderr = tmp_path / "stderr"
    with stderr.open("wb") as err:
        # no --host: the table's listen_host (::1) is what the router binds
        proc = subprocess.Popen([sys.executable, "-m", "clusterctl.cli", "router", "serve", "--routes", str(routes)],
                                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    base = f"http://[::1]:{table.listen_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, stderr.read_text()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "router did not start: " + stderr.read_text()
            time.sleep(0.05)
        r = httpx.post(f"{base}/v1/chat/completions", timeout=10,
                       json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["choices"][0]["message"]["content"], body["host"]) == ("over six", f"[::1]:{backend}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    events = [json.loads(line).get("event") for line in stderr.read_text().splitlines() if line.startswith("{")]
    assert "listening" in events
