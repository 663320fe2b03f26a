"""Fault injection for the reliability tests (tests/*/test_reliability_*.py, docs/reliability.md).

Everything here undoes what it does: each fault is a context manager that restores the node,
the link or the process table when the block exits, also when the test fails. Faults act only
on testbed addresses, testbed links (`cct<run id>h<k>`) and loopback.

    inventory(tb, tmp, services, ...)     an inventory for any testbed; web(...) a cheap service
    cli("deploy", ...) / deploy(path)     clusterctl in a subprocess (signals, real exit codes)
    link_down(tb, node)                   the node's cable pulled (its veth down on the host side)
    shaped(tb, node, "8mbit") / packet_loss(node, 2) / netem(tb, node, "delay 50ms loss 2%")
    tmpfs(node, "/opt/models", "100m")    a small file system mounted over a node's directory
    foreign(node, argv)                   a process the deploy does not own, in a transient unit
    ArgvSampler(nodes)                    every command line seen on the nodes while it runs
    CreationModes(directory)              the mode of each file the moment it was created
    bridge_nginx(root, work, host, ...)   nginx on the testbed bridge, laid out like the hub
    ScriptedServer(host, script)          an HTTP server that answers from a script (errors, stalls)
    ConnectionCounter()                   a TCP listener on 127.0.0.2 that counts connections
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import http.server
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e.testbed import Node, Testbed
from tests.nginx_server import LogEntry, config, free_port, nginx_binary

ROOT = Path(__file__).resolve().parents[1]
BASE = "/opt/clusterctl"
STATE = f"{BASE}/state"
MANIFEST = f"{STATE}/manifest.json"
SECRETS = "/etc/clusterctl/secrets"
UNITS = "/etc/systemd/system"
#: where deploy writes files on a node: checked for half-written and temp files
MANAGED_DIRS = (f"{BASE}/bin", UNITS, SECRETS, STATE, f"{BASE}/router", f"{BASE}/monitoring")


# ---------------------------------------------------------------------------------------------
# inventories and the command line


def inventory(tb: Testbed, tmp: Path, services: str, *, models: str = "", cluster: str = "", router: str = "",
              nodes: Sequence[str] | None = None, name: str = "testbed.yaml", connect_timeout: str = "5s",
              known_hosts: Path | None = None, node_keys: dict[str, str] | None = None) -> Path:
    """Write an inventory for `tb` (every node, or `nodes`): 4 GiB of RAM each, the testbed's key
    and known_hosts, the cached llama.cpp build and the real model as `gemma`. `services`,
    `models` (more entries) and `cluster` (more keys) are YAML, indented as top-level text;
    `node_keys` adds flow-mapping keys to a node (e.g. accelerators)."""
    from tests import assets

    names = list(nodes) if nodes is not None else [n.name for n in tb.nodes]
    more = node_keys or {}
    node_lines = "".join(f"  {n}: {{address: {tb.node(n).ip}, ram: 4GiB{', ' + more[n] if n in more else ''}}}\n"
                         for n in names)
    extra = textwrap.indent(textwrap.dedent(cluster), "  ") if cluster else ""
    text = (
        "cluster:\n"
        "  name: reliability\n"
        f"  ssh: {{user: root, key: '{tb.key_path}', known_hosts: '{known_hosts or tb.known_hosts}', "
        f"connect_timeout: {connect_timeout}}}\n"
        "  defaults: {models_dir: /opt/models, link_speed: 1Gbit}\n"
        f"  engines: {{llama_cpp: '{assets.llama_bin_dir()}'}}\n"
        f"{extra}"
        "nodes:\n"
        f"{node_lines}"
        "models:\n"
        f"  gemma: {{source: 'file://{assets.test_model_path()}'}}\n"
        + textwrap.indent(textwrap.dedent(models), "  ")
        + "services:\n"
        + textwrap.indent(textwrap.dedent(services), "  ")
        + textwrap.dedent(router)
    )
    path = tmp / name
    path.write_text(text)
    if "engine: llama-server" in services:  # deploy plans from pinned metadata: resolve first, as a user does
        resolved = cli("resolve", str(path))
        assert resolved.code == 0, resolved.stderr
    return path


def web(name: str, node: str, port: int, *, delay: float = 0, extra: str = "", model: str | None = None,
        guard: str | None = None) -> str:
    """A cheap service (engine custom): a Python HTTP server on 127.0.0.1:`port`, probed over TCP.
    `delay`: seconds it takes to start listening. `guard`: a file that must exist or it exits 1."""
    script = ""
    if guard:
        script += f"test -e {guard} || {{ echo 'missing {guard}' >&2; exit 1; }}; "
    if delay:
        script += f"sleep {delay:g}; "
    script += f"exec python3 -m http.server --bind 127.0.0.1 --directory /nonexistent {port}"  # serves nothing
    fields = ["engine: custom", f"node: {node}", f"port: {port}", f"command: [bash, -c, {json.dumps(script)}]"]
    if model:
        fields.append(f"model: {model}")
    if extra:
        fields.append(extra)
    return f"{name}: {{{', '.join(fields)}}}\n"


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def json(self) -> dict[str, Any]:
        try:
            value = json.loads(self.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"no JSON on stdout (exit {self.code}):\n{self.output}") from exc
        assert isinstance(value, dict)
        return value


NO_VERIFY = ("--phase", "acquire", "--phase", "router", "--phase", "services")


def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "clusterctl.cli", *args]


def cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> Run:
    """clusterctl as a user runs it: its own process, real stdout/stderr and exit code."""
    started = time.monotonic()
    proc = subprocess.run(cli_argv(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)
    return Run(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


def deploy(path: Path, *args: str, timeout: float = 300, env: dict[str, str] | None = None) -> Run:
    """`clusterctl deploy --json` without the verify phase (the real Gemma 270M fails verify's
    smoke check by design: tests/e2e/test_verify.py)."""
    return cli("deploy", "--inventory", str(path), "--json", *NO_VERIFY, *args, timeout=timeout, env=env)


def start_deploy(path: Path, *args: str, json_output: bool = True, env: dict[str, str] | None = None
                 ) -> subprocess.Popen[str]:
    argv = cli_argv("deploy", "--inventory", str(path), *(["--json"] if json_output else []), *NO_VERIFY, *args)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, cwd=ROOT)


def finish(proc: subprocess.Popen[str], timeout: float) -> Run:
    """Wait for a started command; kill it (and fail) when it outlives `timeout`."""
    started = time.monotonic()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"still running after {timeout:g} s (killed):\n{out}{err}") from None
    return Run(proc.returncode, out, err, time.monotonic() - started)


def steps(data: dict[str, object], node: str) -> list[dict[str, object]]:
    nodes = data["nodes"]
    assert isinstance(nodes, dict)
    result = nodes[node]["steps"]
    assert isinstance(result, list)
    return result


def node_result(data: dict[str, object], node: str) -> dict[str, object]:
    nodes = data["nodes"]
    assert isinstance(nodes, dict)
    value = nodes[node]
    assert isinstance(value, dict)
    return value


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# files


def blob(path: Path, size: int, seed: bytes = b"") -> Path:
    """`size` pseudo-random bytes (deterministic per `seed`), written fast."""
    path.parent.mkdir(parents=True, exist_ok=True)
    block = hashlib.sha512(seed or path.name.encode()).digest() * (1 << 14)  # 1 MiB
    with open(path, "wb") as f:
        left = size
        counter = 0
        while left > 0:
            head = counter.to_bytes(8, "little")
            chunk = (head + block)[: min(left, len(block))]
            f.write(chunk)
            left -= len(chunk)
            counter += 1
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def on_node(node: Node, path: str) -> Path:
    """The host-side path of a file inside `node` (its overlay root)."""
    return node.root / path.lstrip("/")


def temp_files(node: Node, dirs: Sequence[str] = MANAGED_DIRS) -> list[str]:
    """Temp files deploy's atomic writes leave when interrupted (`.NAME.clusterctl-XXXX`)."""
    found = []
    for d in dirs:
        host = node.upper / d.lstrip("/")  # what the node wrote, not the host's files below it
        if host.is_dir():
            found += [f"{d}/{p.name}" for p in host.iterdir() if ".clusterctl-" in p.name]
    return found


def manifest(node: Node) -> dict[str, object]:
    path = on_node(node, MANIFEST)
    return dict(json.loads(path.read_text())) if path.exists() else {}


def forget_in_manifest(node: Node, path: str) -> None:
    data = manifest(node)
    data.pop(path, None)
    on_node(node, MANIFEST).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# services on a node


def unit(service: str) -> str:
    return f"clusterctl-{service}.service"


def unit_prop(node: Node, service: str, prop: str) -> str:
    return node.run(["systemctl", "show", "-p", prop, "--value", unit(service)], timeout=30).stdout.strip()


def starts(node: Node, service: str) -> int:
    """How many times systemd started the service's unit (its journal's start lines)."""
    out = node.run(["journalctl", "--no-pager", "-o", "cat", "-u", unit(service)], timeout=30).stdout
    return sum(1 for line in out.splitlines() if line.startswith(f"Started {unit(service)}"))


def remove_services(node: Node, services: Sequence[str], models: Sequence[str] = (),
                    paths: Sequence[str] = ()) -> None:
    """Undo a test's deploy on a shared node: stop and delete its units, scripts, keys, weights
    (and `paths`)."""
    for service in services:
        node.run(["systemctl", "disable", "--now", unit(service)], timeout=90)
        node.run(["systemctl", "reset-failed", unit(service)], timeout=30)
        node.run(["rm", "-f", f"{UNITS}/{unit(service)}", f"{BASE}/bin/{service}.sh", f"{SECRETS}/{service}.key"])
    if paths:
        node.run(["rm", "-rf", "--", *paths])
    node.run(["systemctl", "daemon-reload"], timeout=60)
    for model in models:
        node.run(["rm", "-rf", f"/opt/models/{model}"])
        data = manifest(node)
        kept = {k: v for k, v in data.items() if not k.startswith(f"/opt/models/{model}/")}
        if kept != data:
            on_node(node, MANIFEST).write_text(json.dumps(kept, indent=1, sort_keys=True) + "\n")


@contextlib.contextmanager
def foreign(node: Node, argv: Sequence[str], *, port: int | None = None) -> Iterator[str]:
    """Run `argv` in `node` as a transient unit clusterctl knows nothing about; yields the unit.
    Stopped (only it) when the block exits."""
    name = f"cct-foreign-{secrets.token_hex(3)}"
    node.run(["systemd-run", "--unit", name, "--collect", "--", *argv], check=True)
    try:
        if port is not None:
            wait_for(f"{argv[0]} on port {port}",
                     lambda: node.run(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"]).returncode == 0, 20)
        yield f"{name}.service"
    finally:
        node.run(["systemctl", "stop", f"{name}.service"], timeout=60)


def main_pid(node: Node, unit_name: str) -> int:
    return int(node.run(["systemctl", "show", "-p", "MainPID", "--value", unit_name]).stdout.strip() or 0)


# ---------------------------------------------------------------------------------------------
# network faults (on the host side of a node's veth pair)


def veth(tb: Testbed, node: Node) -> str:
    return f"{tb.bridge}h{node.index}"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _tc(*args: str, check: bool = True) -> None:
    subprocess.run(["tc", *args], check=check, capture_output=True, timeout=30)


@contextlib.contextmanager
def link_down(tb: Testbed, node: Node) -> Iterator[None]:
    """The node's cable pulled: its veth down on the host side; plugged back in on exit."""
    name = veth(tb, node)
    _ip("link", "set", name, "down")
    try:
        yield
    finally:
        _ip("link", "set", name, "up")
        wait_for(f"{node.name} reachable again", lambda: _reachable(node.ip), 30, 0.1)


def _reachable(ip: str) -> bool:
    try:
        with socket.create_connection((ip, 22), timeout=1):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def qdisc(tb: Testbed, node: Node, *spec: str) -> Iterator[None]:
    """A root qdisc on the host end of the node's veth (traffic towards the node)."""
    name = veth(tb, node)
    _tc("qdisc", "add", "dev", name, "root", *spec)
    try:
        yield
    finally:
        _tc("qdisc", "del", "dev", name, "root", check=False)


def netem(tb: Testbed, node: Node, spec: str) -> contextlib.AbstractContextManager[None]:
    """e.g. netem(tb, node, "delay 50ms loss 2%") (needs sch_netem in the kernel: `has_qdisc`)."""
    return qdisc(tb, node, "netem", *spec.split())


def has_qdisc(tb: Testbed, node: Node, kind: str) -> bool:
    """Whether the kernel knows the qdisc `kind` (netem is not built into every kernel)."""
    name = veth(tb, node)
    proc = subprocess.run(["tc", "qdisc", "add", "dev", name, "root", kind], capture_output=True, timeout=30)
    if proc.returncode == 0:
        _tc("qdisc", "del", "dev", name, "root", check=False)
    return proc.returncode == 0


@contextlib.contextmanager
def packet_loss(node: Node, percent: float) -> Iterator[None]:
    """Drop `percent` % of the packets the node sends and receives at random (iptables'
    statistic match in the node's own network namespace: the host's firewall is not touched)."""
    from tests.sshd import ensure_package

    ensure_package("iptables", "iptables")
    rules = [[chain, "-m", "statistic", "--mode", "random", "--probability", f"{percent / 100:g}", "-j", "DROP"]
             for chain in ("INPUT", "OUTPUT")]
    nsenter = ["nsenter", "-t", str(node.pid), "-n", "iptables", "-w", "5"]
    added = []
    try:
        for rule in rules:
            subprocess.run([*nsenter, "-A", *rule], check=True, capture_output=True, timeout=30)
            added.append(rule)
        yield
    finally:
        for rule in added:
            subprocess.run([*nsenter, "-D", *rule], check=False, capture_output=True, timeout=30)


def shaped(tb: Testbed, node: Node, rate: str) -> contextlib.AbstractContextManager[None]:
    """Traffic towards the node limited to `rate` (e.g. "40mbit"): long pushes for timing faults."""
    return qdisc(tb, node, "tbf", "rate", rate, "burst", "64kb", "latency", "400ms")


# ---------------------------------------------------------------------------------------------
# file system faults


@contextlib.contextmanager
def tmpfs(node: Node, path: str, size: str) -> Iterator[None]:
    """A `size` tmpfs mounted over `path` inside the node (hides what is there until exit)."""
    node.run(["mkdir", "-p", path], check=True)
    node.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "clusterctl-fault", path], check=True)
    try:
        yield
    finally:
        node.run(["umount", path], check=True)


# ---------------------------------------------------------------------------------------------
# observers


class ArgvSampler:
    """Samples, from the host, the command line of every process of the given nodes until the
    block exits: `seen` holds each distinct command line, `environ_hits` each process whose
    environment held one of `needles`."""

    def __init__(self, nodes: Sequence[Node], *, needles: Sequence[str] = (), interval: float = 0.01) -> None:
        self.nodes = list(nodes)
        self.interval = interval
        self.needles = tuple(n.encode() for n in needles)  # also looked for in each process's environment
        self.seen: set[str] = set()
        self.environ_hits: set[str] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="argv-sampler")

    def __enter__(self) -> ArgvSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for node in self.nodes:
                for pid in node.processes():
                    with contextlib.suppress(OSError):
                        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                        if raw:
                            self.seen.add(raw.replace(b"\0", b" ").decode(errors="replace").strip())
                    if self.needles:
                        with contextlib.suppress(OSError):
                            env = Path(f"/proc/{pid}/environ").read_bytes()
                            for needle in self.needles:
                                if needle in env:
                                    self.environ_hits.add(f"pid {pid}: {needle.decode()}")
            self.samples += 1
            self._stop.wait(self.interval)

    def matching(self, text: str) -> list[str]:
        return sorted(line for line in self.seen if text in line)


_IN_CREATE = 0x100
_IN_MOVED_TO = 0x80
_EVENT = struct.Struct("iIII")


class CreationModes:
    """inotify on a directory (a node's directory seen from the host): the permission bits of each
    file as soon as it appears, before the writer can chmod it. `modes`: [(name, mode)]."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.modes: list[tuple[str, int]] = []
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if libc.inotify_add_watch(self._fd, str(directory).encode(), _IN_CREATE | _IN_MOVED_TO) < 0:
            os.close(self._fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="creation-modes")

    def __enter__(self) -> CreationModes:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        os.close(self._fd)

    def _loop(self) -> None:
        import select

        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                continue
            offset = 0
            while offset < len(data):
                _wd, _mask, _cookie, size = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size: offset + _EVENT.size + size].rstrip(b"\0").decode()
                offset += _EVENT.size + size
                with contextlib.suppress(FileNotFoundError):
                    self.modes.append((name, os.lstat(self.directory / name).st_mode & 0o7777))


# ---------------------------------------------------------------------------------------------
# servers on the testbed bridge / loopback


@dataclass(frozen=True)
class BridgeNginx:
    """nginx serving `root` on the testbed bridge (the nodes reach it at `url`)."""

    root: Path
    workdir: Path
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def access_log(self) -> list[LogEntry]:
        path = self.workdir / "access.log"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            status, method, uri, rng, sent, auth = line.split("|", 5)
            out.append(LogEntry(int(status), method, uri, "" if rng == "-" else rng, int(sent),
                                "" if auth == "-" else auth))
        return out


@contextlib.contextmanager
def bridge_nginx(root: Path, workdir: Path, host: str, *, locations: str = "") -> Iterator[BridgeNginx]:
    """nginx in the foreground (one process) listening on `host` only; `locations` go in the server
    block. The access log records status, range, bytes sent and the Authorization header."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port(host)
    conf = workdir / "nginx.conf"
    conf.write_text(config(root, workdir, port, locations, host=host))
    proc = subprocess.Popen([nginx_binary(), "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(conf)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def listening() -> bool:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise AssertionError(f"nginx exited with {proc.returncode}: {err}")
            try:
                with socket.create_connection((host, port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_for("nginx to listen", listening, 10)
        yield BridgeNginx(root, workdir, host, port)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stderr:
            proc.stderr.close()


@dataclass
class Reply:
    """One scripted answer: a status with headers, then `body` (or the file's bytes from
    `offset` honouring Range), optionally stalling after `stall_after` bytes."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    file: Path | None = None
    stall_after: int | None = None


class ScriptedServer:
    """A threaded HTTP server on `host` that answers GETs from `script` in order (the last
    reply repeats). `requests`: (path, headers) of each request seen."""

    def __init__(self, host: str, script: Sequence[Reply]) -> None:
        self.script = list(script)
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.release = threading.Event()  # set to end stalls
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                with lock:
                    index = len(outer.requests)
                    outer.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                reply = outer.script[min(index, len(outer.script) - 1)]
                data = reply.body if reply.body is not None else (reply.file.read_bytes() if reply.file else b"")
                start = 0
                status = reply.status
                rng = self.headers.get("Range", "")
                if status == 200 and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[len("bytes="):-1])
                    status = 206
                self.send_response(status)
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                payload = data[start:]
                if reply.stall_after is not None:
                    self.wfile.write(payload[: reply.stall_after])
                    self.wfile.flush()
                    outer.release.wait(600)
                    self.close_connection = True  # released: hang up mid-body
                    return
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(payload)

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that hangs up (curl giving up) is part of the script

        lock = threading.Lock()
        self.httpd = Server((host, free_port(host)), Handler)
        self.httpd.daemon_threads = True
        self.host = host
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True, name="scripted-http")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(10)


class ConnectionCounter:
    """A TCP listener on 127.0.0.2 (loopback, but not an address clusterctl treats as the local
    machine, so a node pointed here is reached over SSH) that counts connections and sends
    nothing: any attempt to reach a node shows up in `count`. `hold`: keep each connection open
    (silent) until the block exits, instead of hanging up at once."""

    def __init__(self, host: str = "127.0.0.2", *, hold: bool = False) -> None:
        self.hold = hold
        self.held: list[socket.socket] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="connection-counter")

    def __enter__(self) -> ConnectionCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        for conn in self.held:
            conn.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.count += 1
            if self.hold:
                self.held.append(conn)
            else:
                conn.close()


def grep_node(node: Node, needle: str, roots: Sequence[str] = ("/",), skip: Sequence[str] = ()) -> list[str]:
    """Files the node wrote (its overlay's upper layer) under `roots` that contain `needle`."""
    hits = []
    for root in roots:
        base = node.upper / root.lstrip("/")
        if not base.exists():
            continue
        for path in base.rglob("*"):
            rel = "/" + path.relative_to(node.upper).as_posix()
            if any(rel.startswith(s) for s in skip) or not path.is_file() or path.is_symlink():
                continue
            with contextlib.suppress(OSError):
                if needle.encode() in path.read_bytes():
                    hits.append(rel)
    return hits

