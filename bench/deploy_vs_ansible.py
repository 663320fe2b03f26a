"""`clusterctl deploy` against an equivalent Ansible playbook, on the same real nodes.

    python bench/deploy_vs_ansible.py [--nodes 4] [--rounds 3] [--cold-rounds 3]

One testbed (tests/e2e/testbed.py: systemd + sshd per node, each in its own namespaces, on a
private bridge) of --nodes nodes. Each node gets one llama-server serving the real Gemma 3
270M model (tests/assets.py), with `threads: 1` and a 1024-token context; the llama.cpp
binaries and the model are copied from the controller.

Measured, in this order per cold round (tools alternate, so drift hits both alike):
  clusterctl cold deploy of all nodes; wipe; Ansible cold deploy of all nodes; wipe;
  clusterctl cold deploy of node1 only; wipe; Ansible cold deploy of node1 only; wipe.
In the first round each tool's cold deploy is followed by --rounds no-change re-deploys
(each must change nothing) before the wipe. Figures are medians.

"Wipe" returns the nodes to a fresh state: the services are stopped, and /opt/clusterctl,
/opt/models, the clusterctl-* units (and their enable links) and root's ~/.ansible are
deleted, then systemd reloads. A node's root is an overlay on the host's /, so the nodes are
wiped once before the first measurement too (whatever the host has there would show through),
and every wipe checks that those paths are gone and that each node's overlay (its written
files) is the same as before the first deploy. A cold deploy by clusterctl must send the
model and both binaries to every node, byte for byte; anything else stops the benchmark.

clusterctl runs as `clusterctl deploy --json` with the phases acquire, router and services:
the work the playbook does too. Its verify phase (a test prompt to every service) is timed
apart, on no-change re-deploys.

Ansible: ansible-core (a fixed version) in its own virtual environment under the clusterctl
cache (created when missing), bench/ansible/deploy.yml, pipelining on, forks = nodes, no
fact gathering, the interpreter given (no discovery), ssh_args without -C (compression only
costs CPU on a fast link), the testbed key and known_hosts with StrictHostKeyChecking=yes.
Its files are those of `clusterctl render --out DIR` for the same inventory. OpenSSH's
connection sharing (ControlPersist) stays on, as Ansible ships it: masters are closed before
every cold deploy (a fresh node has none) and left open between re-deploys.

SSH use per node for a no-change re-deploy is counted on the nodes: each node's sshd logs at
LogLevel VERBOSE (a drop-in written at boot), and its journal says how many connections were
accepted and how many sessions (commands, SFTP) were started. For clusterctl one more
re-deploy runs in this process with the transport wrapped, to list every operation it makes
and its time; at the end one cold deploy of each size is traced the same way, to show where
its time goes. Also timed: one command on an open clusterctl connection, as the transport
leaves the socket and with TCP_NODELAY set on it.

The machine's load average is printed with every cold deploy: other work on the machine
shows up in the figures, and the 1-node / all-nodes ratio is taken per round from two
deploys run one right after the other.

Everything runs against the testbed's own addresses; the testbed, the Ansible connection
masters and the work directory are removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import posixpath
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402  (tests/assets.py reports missing assets with pytest.fail)
from tests import assets  # noqa: E402
from tests.e2e.testbed import Node, Testbed, TestbedError, cleanup_stale, preflight  # noqa: E402

from clusterctl.errors import ExitCode  # noqa: E402

ANSIBLE_CORE = "2.19.14"  # the last ansible-core that runs on Python 3.11
PLAYBOOK = ROOT / "bench" / "ansible" / "deploy.yml"
ANSIBLE_STOCK_SSH_ARGS = "-C -o ControlMaster=auto -o ControlPersist=60s"
#: Ansible's default without -C: compression makes every copy CPU-bound on a fast link (a cold
#: deploy of 4 nodes here took 45 s with it and 18 s without), so its best setting leaves it out.
DEFAULT_SSH_ARGS = "-o ControlMaster=auto -o ControlPersist=60s"
CONTEXT = 1024
PORT = 8080
VOLATILE = ("var/log", "var/lib/systemd", "var/cache", "var/tmp", "root/.cache", "var/lib/private")
#: Back to a fresh node. A node's root is an overlay on the host's /, so what the host itself
#: has under these paths shows through too: it is deleted (in the node only) before the first
#: measurement as well, and its absence checked after every wipe.
WIPE = ('systemctl stop "clusterctl-*" 2>/dev/null; '
        "rm -rf /opt/clusterctl /opt/models /root/.ansible /etc/systemd/system/clusterctl-* "
        "/etc/systemd/system/*.wants/clusterctl-*; "
        "systemctl daemon-reload && systemctl reset-failed && "
        "! ls -d /opt/clusterctl /opt/models /root/.ansible /etc/systemd/system/clusterctl-* "
        "/etc/systemd/system/*.wants/clusterctl-* 2>/dev/null")
#: What the playbook does too: no `verify` phase (a test prompt per service). Measured apart.
DEPLOY_PHASES = ("acquire", "router", "services")
SSHD_VERBOSE = "# deploy benchmark: log every session (command, sftp) started\nLogLevel VERBOSE\n"


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says why."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(argv: Sequence[str], *, timeout: float, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{shlex.join(argv)} did not finish in {timeout:g} s") from exc
    if check and proc.returncode != 0:
        raise BenchError(f"{shlex.join(argv)} failed (exit {proc.returncode}):\n"
                         f"{(proc.stdout + proc.stderr)[-3000:]}")
    return proc


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- Ansible in its own virtual environment ------------------------------------------------


def ensure_ansible() -> Path:
    """ansible-playbook of ansible-core ANSIBLE_CORE, installed into its own venv when missing."""
    venv = assets.cache_dir() / "ansible-venv"
    playbook = venv / "bin" / "ansible-playbook"
    if playbook.exists():
        version = run([str(playbook), "--version"], timeout=60, check=False).stdout
        if f"core {ANSIBLE_CORE}]" in version:
            return playbook
    if not (venv / "bin" / "python").exists():
        log(f"creating {venv} for ansible-core {ANSIBLE_CORE}")
        run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    log(f"installing ansible-core=={ANSIBLE_CORE} into {venv}")
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", f"ansible-core=={ANSIBLE_CORE}"],
        timeout=900)
    version = run([str(playbook), "--version"], timeout=60).stdout
    if f"core {ANSIBLE_CORE}]" not in version:
        raise BenchError(f"{playbook} is not ansible-core {ANSIBLE_CORE}: {version.splitlines()[:1]}")
    return playbook


# -- the nodes -----------------------------------------------------------------------------


def overlay_files(node: Node) -> set[str]:
    """What the node has written to its root (files and links), volatile directories aside."""
    upper = node.upper
    found = set()
    for path in upper.rglob("*"):
        rel = path.relative_to(upper).as_posix()
        if (path.is_file() or path.is_symlink()) and not rel.startswith(VOLATILE):
            found.add(rel)
    return found


def enable_verbose_sshd(nodes: Sequence[Node]) -> None:
    for node in nodes:
        node.run(["sh", "-c", f"printf %s {shlex.quote(SSHD_VERBOSE)} > /etc/ssh/sshd_config.d/00-bench-verbose.conf"
                  " && systemctl reload ssh"], check=True, timeout=30)


def wipe(nodes: Sequence[Node], baseline: dict[str, set[str]] | None) -> None:
    """Back to the fresh state (see the module doc); verified against `baseline` when given."""
    for node in nodes:
        r = node.run(["sh", "-c", WIPE], timeout=120)
        if r.returncode != 0:
            raise BenchError(f"{node.name}: the wipe failed or left files behind: {(r.stdout + r.stderr).strip()}")
    for node in nodes:
        deadline = time.monotonic() + 30
        while node.run(["pgrep", "-x", "llama-server"], timeout=10).returncode == 0:
            if time.monotonic() > deadline:
                raise BenchError(f"{node.name}: llama-server still runs 30 s after the wipe")
            time.sleep(0.1)
        extra = overlay_files(node) ^ baseline[node.name] if baseline is not None else set()
        if extra:
            raise BenchError(f"{node.name}: after the wipe the node still differs from its fresh state: "
                             f"{sorted(extra)[:20]}")


def expected_push(nodes: int) -> int:
    """Bytes a cold deploy copies: the model and both llama.cpp binaries, to every node."""
    bins = assets.llama_bin_dir()
    rpc = next((bins / n for n in ("rpc-server", "ggml-rpc-server") if (bins / n).exists()), None)
    if rpc is None:
        raise BenchError(f"{bins} has no rpc-server (clusterctl copies it with llama-server)")
    engines = (bins / "llama-server").stat().st_size + rpc.stat().st_size
    return nodes * (assets.test_model_path().stat().st_size + engines)


def cold_clusterctl(inventory: Path, nodes: Sequence[Node]) -> Deploy:
    d = clusterctl_deploy(inventory)
    if d.bytes_sent != expected_push(len(nodes)):
        raise BenchError(f"a cold deploy sent {d.bytes_sent} bytes, not {expected_push(len(nodes))}: "
                         "the nodes were not fresh")
    check_healthy(nodes)
    return d


def check_healthy(nodes: Sequence[Node]) -> None:
    for node in nodes:
        r = node.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
                      f"http://127.0.0.1:{PORT}/health"], timeout=15)
        if r.stdout.strip() != "200":
            raise BenchError(f"{node.name}: llama-server is not healthy after the deploy ({r.stdout}{r.stderr})")


_CURSOR_RE = re.compile(r"^-- cursor: (\S+)", re.M)


def journal_cursor(node: Node) -> str:
    r = node.run(["journalctl", "-t", "sshd", "-n", "1", "--show-cursor", "--no-pager", "-o", "cat"],
                 check=True, timeout=30)
    m = _CURSOR_RE.search(r.stdout)
    if not m:
        raise BenchError(f"{node.name}: no journal cursor in {r.stdout!r}")
    return m.group(1)


@dataclass
class SshUse:
    connections: int = 0  # "Accepted publickey"
    commands: int = 0  # "Starting session: command"
    sftp: int = 0  # "Starting session: subsystem 'sftp'"

    @property
    def sessions(self) -> int:
        return self.commands + self.sftp


def ssh_use_since(node: Node, cursor: str) -> SshUse:
    """sshd's log lines on `node` after `cursor`, counted (re-read until they stop changing)."""
    previous: SshUse | None = None
    deadline = time.monotonic() + 5
    while True:
        text = node.run(["journalctl", "-t", "sshd", f"--after-cursor={cursor}", "--no-pager", "-o", "cat"],
                        check=True, timeout=30).stdout
        use = SshUse(connections=len(re.findall(r"^Accepted publickey", text, re.M)),
                     commands=len(re.findall(r"^Starting session: command", text, re.M)),
                     sftp=len(re.findall(r"^Starting session: subsystem 'sftp'", text, re.M)))
        if use == previous or time.monotonic() > deadline:
            return use
        previous = use
        time.sleep(0.3)


@contextlib.contextmanager
def counting_ssh(nodes: Sequence[Node]) -> Iterator[dict[str, SshUse]]:
    cursors = {node.name: journal_cursor(node) for node in nodes}
    counts: dict[str, SshUse] = {}
    yield counts
    for node in nodes:
        counts[node.name] = ssh_use_since(node, cursors[node.name])


# -- clusterctl ----------------------------------------------------------------------------


def clusterctl_argv() -> list[str]:
    script = Path(sys.executable).parent / "clusterctl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "clusterctl.cli"]


def write_inventory(tb: Testbed, directory: Path, nodes: Sequence[Node]) -> Path:
    directory.mkdir(parents=True)
    node_lines = "".join(f"  {n.name}: {{address: {n.ip}, ram: 4GiB}}\n" for n in nodes)
    service_lines = "".join(
        f"  llm{n.index}: {{engine: llama-server, node: {n.name}, model: gemma, port: {PORT}, "
        f"context: {CONTEXT}, threads: 1, startup_timeout: 120s}}\n" for n in nodes)
    text = textwrap.dedent(f"""\
        cluster:
          name: bench
          ssh: {{user: root, key: '{tb.key_path}', known_hosts: '{tb.known_hosts}', connect_timeout: 5s}}
          defaults: {{models_dir: /opt/models, link_speed: 1Gbit}}
          engines: {{llama_cpp: '{assets.llama_bin_dir()}'}}
        models:
          gemma: {{source: 'file://{assets.test_model_path()}'}}
        """) + "nodes:\n" + node_lines + "services:\n" + service_lines
    path = directory / "cluster.yaml"
    path.write_text(text)
    run([*clusterctl_argv(), "resolve", str(path)], timeout=120)
    return path


@dataclass
class Deploy:
    seconds: float  # wall clock of the whole command
    changes: int
    inner: float = 0.0  # clusterctl's own figure (after start-up, loading and rendering)
    bytes_sent: int = 0
    failed_checks: list[str] = field(default_factory=list)  # clusterctl's verify phase
    load: float = 0.0  # the machine's 1-minute load average when it started


def clusterctl_deploy(inventory: Path, phases: Sequence[str] = DEPLOY_PHASES) -> Deploy:
    """`clusterctl deploy --json` of `phases` (all of them: none given), timed from the outside."""
    argv = [*clusterctl_argv(), "deploy", "--inventory", str(inventory), "--json"]
    argv += [f"--phase={p}" for p in phases]
    load = os.getloadavg()[0]
    started = time.monotonic()
    proc = run(argv, timeout=600, check=False)
    seconds = time.monotonic() - started
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise BenchError(f"clusterctl deploy printed no JSON (exit {proc.returncode}):\n"
                         f"{(proc.stdout + proc.stderr)[-3000:]}") from None
    verify = data.get("verify") or {}
    failed_checks = [f"{c['node']} {c['subject']} {c['name']}: {c['detail'][:80]}"
                     for c in verify.get("checks", []) if c.get("status") == "fail"]
    # a failed verification is reported, not fatal: the deploy itself is what is measured
    if not data.get("ok") or proc.returncode not in (0, int(ExitCode.VERIFY_FAILED) if failed_checks else 0):
        raise BenchError(f"clusterctl deploy failed (exit {proc.returncode}):\n{json.dumps(data, indent=1)[-3000:]}")
    sent = sum(int(n.get("bytes_sent", 0)) for n in data["nodes"].values())
    return Deploy(seconds, int(data["changes"]), float(data["seconds"]), sent, failed_checks, load)


@dataclass
class Op:
    what: str
    seconds: float


@dataclass
class Trace:
    ops: dict[str, list[Op]] = field(default_factory=dict)
    seconds: float = 0.0  # the whole deploy, in this process


class CountingTransport:
    """Wraps a clusterctl transport and records every operation deploy asks of it."""

    def __init__(self, inner: Any, ops: list[Op]) -> None:
        self._inner = inner
        self._ops = ops
        self.host = inner.host

    def _timed(self, what: str, call: Callable[[], Any]) -> Any:
        started = time.monotonic()
        try:
            return call()
        finally:
            self._ops.append(Op(what, time.monotonic() - started))

    def run(self, argv: Sequence[str], **kwargs: Any) -> Any:
        words = list(argv)
        label = (f"sh -c '{words[2][:40]}' {shlex.join(words[3:])}" if words[:2] == ["sh", "-c"] and len(words) > 2
                 else shlex.join(words)[:80])
        return self._timed(f"run {label}", lambda: self._inner.run(argv, **kwargs))

    def put(self, path: str, data: bytes, **kwargs: Any) -> None:
        self._timed(f"sftp put {path}", lambda: self._inner.put(path, data, **kwargs))

    def push(self, local: str, remote: str, **kwargs: Any) -> int:
        return int(self._timed(f"sftp push {remote}", lambda: self._inner.push(local, remote, **kwargs)))

    def get(self, path: str) -> bytes | None:
        result: bytes | None = self._timed(f"sftp get {path}", lambda: self._inner.get(path))
        return result

    def close(self) -> None:
        self._inner.close()


def clusterctl_trace(inventory: Path, *, cold: bool = False) -> Trace:
    """One deploy in this process through the CLI, the transport wrapped: a no-change one, or
    (`cold`) one that copies everything."""
    from typer.testing import CliRunner

    import clusterctl.transport.connect as connect_mod
    from clusterctl.cli import app

    trace = Trace()
    real = connect_mod.connect

    def connect(name: str, *args: Any, **kwargs: Any) -> Any:
        trace.ops[name] = []
        return CountingTransport(real(name, *args, **kwargs), trace.ops[name])

    connect_mod.connect = connect  # type: ignore[assignment]
    started = time.monotonic()
    try:
        argv = ["deploy", "--inventory", str(inventory), "--json", *(f"--phase={p}" for p in DEPLOY_PHASES)]
        result = CliRunner().invoke(app, argv)
    finally:
        connect_mod.connect = real  # type: ignore[assignment]
    trace.seconds = time.monotonic() - started
    data = json.loads(result.stdout)
    if result.exit_code != 0 or (data.get("changes") == 0) == cold:
        raise BenchError(f"the traced deploy was not a {'cold' if cold else 'no-change'} deploy: "
                         f"{result.stdout[-2000:]}")
    return trace


#: Where a traced cold deploy's time goes, by what the transport was asked to do.
CATEGORIES = (
    ("connect + facts (one command)", lambda w: w.startswith("run sh -c") and "@@clusterctl-" in w),
    ("copy the model (SFTP)", lambda w: w.startswith("sftp push") and "/models/" in w),
    ("copy the binaries (SFTP)", lambda w: w.startswith("sftp push")),
    ("sha256 of the copies on the node", lambda w: w.startswith("run sh -c") and "command -v openssl" in w
     and ".part" in w),
    ("systemctl (daemon-reload, enable, restart ...)", lambda w: w.startswith("run systemctl")),
    ("health polls (curl on the node)", lambda w: w.startswith("run curl")),
    ("other commands and SFTP requests", lambda w: True),
)


def categorise(ops: Sequence[Op]) -> dict[str, float]:
    out = dict.fromkeys((name for name, _ in CATEGORIES), 0.0)
    for op in ops:
        name = next(name for name, test in CATEGORIES if test(op.what))
        out[name] += op.seconds
    return out


def command_round_trip(tb: Testbed, node: Node, count: int = 20) -> tuple[float, float]:
    """Seconds per `true` on an open clusterctl SSH connection: as it is, and with TCP_NODELAY
    set on its socket (the transport leaves Nagle's algorithm on)."""
    from clusterctl.transport.ssh import SSHTransport

    out = []
    for nodelay in (False, True):
        t = SSHTransport(node.name, node.ip, key_filename=str(tb.key_path), known_hosts=str(tb.known_hosts))
        try:
            t.run(["true"], timeout=30)
            if nodelay:
                t._conn.transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started = time.monotonic()
            for _ in range(count):
                t.run(["true"], timeout=30)
            out.append((time.monotonic() - started) / count)
        finally:
            t.close()
    return out[0], out[1]


# -- Ansible -------------------------------------------------------------------------------


@dataclass
class AnsibleSetup:
    playbook_bin: Path
    work: Path  # this benchmark's Ansible directory (config, home, control sockets)
    hosts: Path
    cfg: Path

    @property
    def control_dir(self) -> Path:
        return self.work / "cp"

    def env(self) -> dict[str, str]:
        return dict(os.environ, ANSIBLE_CONFIG=str(self.cfg), ANSIBLE_HOME=str(self.work / "home"),
                    ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", PYTHONUNBUFFERED="1")


def ansible_vars(inventory: Path, render_dir: Path) -> dict[str, dict[str, Any]]:
    """Per node: the files, binaries, model and units clusterctl deploys for `inventory`."""
    from clusterctl.deploy.desired import build_desired
    from clusterctl.engines import launch_specs
    from clusterctl.inventory import load_inventory
    from clusterctl.lockfile import lock_path, metas_for, read_lock
    from clusterctl.planner import make_plan
    from clusterctl.render import render

    inv = load_inventory(inventory)
    lock = read_lock(lock_path(inventory))
    metas = metas_for(inv, lock)
    plan = make_plan(inv, metas) if metas else None
    desired = build_desired(inv, lock, render(inv, plan), plan)
    specs = launch_specs(inv, plan)
    out: dict[str, dict[str, Any]] = {}
    for name, d in desired.items():
        node_dir = render_dir / name
        files = sorted("/" + p.relative_to(node_dir).as_posix() for p in node_dir.rglob("*") if p.is_file())
        urls = []
        for spec in specs:
            if spec.node == name and spec.health_path is not None:
                host = "127.0.0.1" if spec.bind in ("0.0.0.0", "::") else spec.bind
                urls.append(f"http://{host}:{spec.port}{spec.health_path}")
        dests = files + [e.path for e in d.engines] + [w.path for w in d.weights]
        out[name] = {
            "ansible_host": inv.nodes[name].address,
            "directories": sorted({posixpath.dirname(p) for p in dests}),
            "rendered_files": files,
            "engines": [{"src": e.local, "dest": e.path} for e in d.engines],
            "weights": [{"src": w.local, "dest": w.path} for w in d.weights],
            "units": [d.units[s] for s in d.services],
            "health_urls": urls,
        }
        if d.secrets or any(w.local is None for w in d.weights):
            raise BenchError(f"{name}: the playbook copies local files only (no secrets, no downloads)")
    return out


def write_ansible(tb: Testbed, playbook_bin: Path, work: Path, inventory: Path, forks: int,
                  ssh_args: str) -> AnsibleSetup:
    render_dir = work / "rendered"
    run([*clusterctl_argv(), "render", str(inventory), "--out", str(render_dir)], timeout=120)
    hosts = {
        "all": {"children": {"nodes": {
            "hosts": ansible_vars(inventory, render_dir),
            "vars": {
                "ansible_user": "root",
                "ansible_ssh_private_key_file": str(tb.key_path),
                "ansible_ssh_common_args": (f"-o IdentitiesOnly=yes -o StrictHostKeyChecking=yes "
                                            f"-o UserKnownHostsFile={tb.known_hosts} "
                                            "-o GlobalKnownHostsFile=/dev/null"),
                "render_dir": str(render_dir),
            },
        }}},
    }
    setup = AnsibleSetup(playbook_bin, work, work / "hosts.yml", work / "ansible.cfg")
    setup.hosts.write_text(json.dumps(hosts, indent=1) + "\n")  # JSON is YAML
    setup.control_dir.mkdir(parents=True, exist_ok=True)
    setup.cfg.write_text(textwrap.dedent(f"""\
        [defaults]
        forks = {forks}
        gathering = explicit
        host_key_checking = True
        interpreter_python = /usr/bin/python3
        retry_files_enabled = False
        local_tmp = {work}/local-tmp

        [ssh_connection]
        pipelining = True
        ssh_args = {ssh_args}
        control_path_dir = {setup.control_dir}
        """))
    return setup


_RECAP_RE = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def ansible_deploy(setup: AnsibleSetup) -> Deploy:
    argv = [str(setup.playbook_bin), "-i", str(setup.hosts), str(PLAYBOOK)]
    load = os.getloadavg()[0]
    started = time.monotonic()
    proc = run(argv, timeout=900, env=setup.env(), check=False)
    seconds = time.monotonic() - started
    recap = {m.group(1): [int(g) for g in m.groups()[1:]] for m in _RECAP_RE.finditer(proc.stdout)}
    if proc.returncode != 0 or not recap or any(r[2] or r[3] for r in recap.values()):
        raise BenchError(f"ansible-playbook failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return Deploy(seconds, sum(r[1] for r in recap.values()), load=load)


def close_masters(setup: AnsibleSetup) -> None:
    """End OpenSSH's shared connections (ControlPersist) that Ansible left running."""
    if not setup.control_dir.is_dir():
        return
    for sock in setup.control_dir.iterdir():
        if sock.is_socket():
            run(["ssh", "-F", "/dev/null", "-o", f"ControlPath={sock}", "-O", "exit", "bench-master"],
                timeout=15, check=False)
    deadline = time.monotonic() + 10
    while any(p.is_socket() for p in setup.control_dir.iterdir()):
        if time.monotonic() > deadline:
            raise BenchError(f"SSH control masters still listen in {setup.control_dir}")
        time.sleep(0.1)


# -- the run -------------------------------------------------------------------------------


@dataclass
class Results:
    cold4: dict[str, list[Deploy]] = field(default_factory=lambda: {"clusterctl": [], "ansible": []})
    cold1: dict[str, list[Deploy]] = field(default_factory=lambda: {"clusterctl": [], "ansible": []})
    redeploy: dict[str, list[Deploy]] = field(default_factory=lambda: {"clusterctl": [], "ansible": []})
    ssh: dict[str, list[dict[str, SshUse]]] = field(default_factory=lambda: {"clusterctl": [], "ansible": []})
    verify_redeploy: list[Deploy] = field(default_factory=list)  # clusterctl, all phases
    verify_ssh: list[dict[str, SshUse]] = field(default_factory=list)
    ansible_fresh_redeploy: list[Deploy] = field(default_factory=list)
    ansible_fresh_ssh: dict[str, SshUse] = field(default_factory=dict)
    trace: Trace | None = None
    cold_traces: dict[int, Trace] = field(default_factory=dict)  # nodes -> a traced cold deploy
    round_trip: tuple[float, float] = (0.0, 0.0)  # one command: as is, with TCP_NODELAY


def redeploys(tool: str, nodes: Sequence[Node], rounds: int, deploy: Callable[[], Deploy], res: Results) -> None:
    for i in range(rounds):
        with counting_ssh(nodes) as use:
            d = deploy()
        if d.changes != 0:
            raise BenchError(f"{tool}: re-deploy {i + 1} of an unchanged inventory made {d.changes} change(s)")
        res.redeploy[tool].append(d)
        res.ssh[tool].append(use)
        log(f"  {tool} no-change re-deploy {i + 1}: {d.seconds:.2f} s; per node: "
            + ", ".join(f"{n} {u.connections} conn/{u.commands} cmd/{u.sftp} sftp" for n, u in use.items()))


def bench(args: argparse.Namespace, playbook_bin: Path, work: Path) -> Results:
    res = Results()
    with Testbed(args.nodes) as tb:
        log(tb.report())
        nodes = list(tb.nodes)
        node1 = [tb.node("node1")]
        enable_verbose_sshd(nodes)
        wipe(nodes, None)
        baseline = {n.name: overlay_files(n) for n in nodes}
        res.round_trip = command_round_trip(tb, node1[0])
        inv_all = write_inventory(tb, work / "all", nodes)
        inv_one = write_inventory(tb, work / "one", node1)
        an_all = write_ansible(tb, playbook_bin, work / "all" / "ansible", inv_all, len(nodes), args.ansible_ssh_args)
        an_one = write_ansible(tb, playbook_bin, work / "one" / "ansible", inv_one, 1, args.ansible_ssh_args)
        try:
            for r in range(args.cold_rounds):
                log(f"cold round {r + 1} of {args.cold_rounds}")
                # each tool: 1 node, then all nodes right after it (a pair, for the ratio)
                d = cold_clusterctl(inv_one, node1)
                res.cold1["clusterctl"].append(d)
                log(f"  clusterctl cold deploy, 1 node: {d.seconds:.2f} s ({d.inner:.2f} s inside; load {d.load:.1f})")
                wipe(node1, baseline)
                d = cold_clusterctl(inv_all, nodes)
                res.cold4["clusterctl"].append(d)
                log(f"  clusterctl cold deploy, {len(nodes)} nodes: {d.seconds:.2f} s ({d.inner:.2f} s inside, "
                    f"{d.changes} changes, {d.bytes_sent / 1e6:.0f} MB sent; load {d.load:.1f})")
                if r == 0:
                    redeploys("clusterctl", nodes, args.rounds, lambda: clusterctl_deploy(inv_all), res)
                    res.trace = clusterctl_trace(inv_all)
                    for i in range(args.rounds):
                        with counting_ssh(nodes) as use:
                            d = clusterctl_deploy(inv_all, phases=())
                        res.verify_redeploy.append(d)
                        res.verify_ssh.append(use)
                        log(f"  clusterctl no-change re-deploy {i + 1} with all phases (verify too): {d.seconds:.2f} s"
                            + (f"; {len(d.failed_checks)} checks failed" if d.failed_checks else ""))
                wipe(nodes, baseline)

                close_masters(an_one)
                d = ansible_deploy(an_one)
                check_healthy(node1)
                res.cold1["ansible"].append(d)
                log(f"  ansible cold deploy, 1 node: {d.seconds:.2f} s (load {d.load:.1f})")
                wipe(node1, baseline)
                close_masters(an_all)
                d = ansible_deploy(an_all)
                check_healthy(nodes)
                res.cold4["ansible"].append(d)
                log(f"  ansible cold deploy, {len(nodes)} nodes: {d.seconds:.2f} s ({d.changes} changed; "
                    f"load {d.load:.1f})")
                if r == 0:
                    redeploys("ansible", nodes, args.rounds, lambda: ansible_deploy(an_all), res)
                    close_masters(an_all)
                    with counting_ssh(nodes) as use:
                        d = ansible_deploy(an_all)
                    res.ansible_fresh_redeploy.append(d)
                    res.ansible_fresh_ssh = use
                    log(f"  ansible no-change re-deploy without shared connections: {d.seconds:.2f} s")
                wipe(nodes, baseline)
            log("traced cold deploys (clusterctl, in this process)")
            for inv, which in ((inv_all, nodes), (inv_one, node1)):
                res.cold_traces[len(which)] = clusterctl_trace(inv, cold=True)
                log(f"  {len(which)} node(s): {res.cold_traces[len(which)].seconds:.2f} s")
                wipe(which, baseline)
        finally:
            for setup in (an_all, an_one):
                with contextlib.suppress(BenchError):
                    close_masters(setup)
    return res


# -- report --------------------------------------------------------------------------------


def per_node(uses: list[dict[str, SshUse]], attr: str) -> str:
    values = sorted({getattr(u, attr) for use in uses for u in use.values()})
    return "/".join(str(v) for v in values) if values else "-"


def paired_ratios(res: Results, tool: str) -> list[float]:
    return [many.seconds / one.seconds for one, many in zip(res.cold1[tool], res.cold4[tool], strict=True)]


def report(args: argparse.Namespace, res: Results) -> str:
    n = args.nodes
    lines = [
        f"| tool | cold deploy, 1 node | cold deploy, {n} nodes | {n} nodes / 1 node (paired) | "
        f"no-change re-deploy, {n} nodes | SSH connections per node | SSH sessions per node |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    figures: dict[str, tuple[float, float, float, float]] = {}
    for tool in ("clusterctl", "ansible"):
        one = median([d.seconds for d in res.cold1[tool]])
        many = median([d.seconds for d in res.cold4[tool]])
        again = median([d.seconds for d in res.redeploy[tool]])
        paired = median(paired_ratios(res, tool))
        figures[tool] = (one, many, again, paired)
        uses = res.ssh[tool]
        sessions = per_node(uses, "sessions")
        detail = f"{sessions} ({per_node(uses, 'commands')} commands + {per_node(uses, 'sftp')} SFTP)"
        name = "clusterctl" if tool == "clusterctl" else f"Ansible {ANSIBLE_CORE}"
        conns = per_node(uses, "connections")
        if tool == "ansible" and res.ansible_fresh_ssh:
            conns += f" (shared; {per_node([res.ansible_fresh_ssh], 'connections')} when none is open)"
        lines.append(f"| {name} | {one:.2f} s | {many:.2f} s | {paired:.2f}x | {again:.2f} s | "
                     f"{conns} | {detail} |")
    cc, an = figures["clusterctl"], figures["ansible"]
    share = cc[2] / an[2]
    ratio = cc[3]
    rounds = " ".join(f"{r:.2f}" for r in paired_ratios(res, "clusterctl"))
    lines += [
        "",
        "Medians; a cold deploy's ratio is the median of each round's pair (1 node, then "
        f"{n} nodes right after it).",
        "",
        f"- Target: a no-change re-deploy of {n} nodes takes at most a third of Ansible's time: "
        f"{cc[2]:.2f} s vs {an[2]:.2f} s = {share:.2f} of it, {'met' if share <= 1 / 3 else 'NOT met'}.",
        f"- Target: {n} nodes take at most 1.5x the time of 1 node: {ratio:.2f}x (rounds: {rounds}; "
        f"medians {cc[1]:.2f} s / {cc[0]:.2f} s = {cc[1] / cc[0]:.2f}x), {'met' if ratio <= 1.5 else 'NOT met'}.",
    ]
    return "\n".join(lines)


def details(args: argparse.Namespace, res: Results) -> str:
    out = ["Every run (seconds, wall clock of the whole command; [the machine's 1-minute load average at its "
           "start])"]
    for tool in ("clusterctl", "ansible"):
        out.append(f"  {tool}: cold 1 node " + " ".join(f"{d.seconds:.2f} [{d.load:.1f}]" for d in res.cold1[tool])
                   + f"; cold {args.nodes} nodes "
                   + " ".join(f"{d.seconds:.2f} [{d.load:.1f}]" for d in res.cold4[tool])
                   + "; re-deploy " + " ".join(f"{d.seconds:.2f}" for d in res.redeploy[tool]))
    cc_inner = [f"{d.inner:.2f}" for d in res.cold4["clusterctl"]]
    cc_again = [f"{d.inner:.2f}" for d in res.redeploy["clusterctl"]]
    out.append(f"  clusterctl's own figure (after start-up, loading and rendering): cold {' '.join(cc_inner)}; "
               f"re-deploy {' '.join(cc_again)}")
    if res.verify_redeploy:
        checks = sorted({c.split(":")[0] for d in res.verify_redeploy for c in d.failed_checks})
        out.append("  clusterctl no-change re-deploy with all phases (the verify phase too): "
                   + " ".join(f"{d.seconds:.2f}" for d in res.verify_redeploy)
                   + f" (median {median([d.seconds for d in res.verify_redeploy]):.2f}); per node "
                   f"{per_node(res.verify_ssh, 'connections')} connections, {per_node(res.verify_ssh, 'sessions')} "
                   "sessions" + (f"; checks that failed: {', '.join(checks)}" if checks else ""))
    if res.ansible_fresh_redeploy:
        use = res.ansible_fresh_ssh
        out.append(f"  ansible re-deploy without shared connections (ControlPersist masters closed first): "
                   f"{res.ansible_fresh_redeploy[0].seconds:.2f} s, per node "
                   f"{per_node([use], 'connections')} connections, {per_node([use], 'sessions')} sessions")
    as_is, nodelay = res.round_trip
    out.append(f"  one command (`true`) on an open clusterctl SSH connection to node1: {as_is * 1000:.1f} ms; "
               f"with TCP_NODELAY set on its socket: {nodelay * 1000:.1f} ms")
    if res.trace is not None:
        out.append("clusterctl no-change re-deploy, operations per node (traced in-process):")
        for node, ops in sorted(res.trace.ops.items()):
            kinds = Counter("command" if op.what.startswith("run") else "sftp" for op in ops)
            total = sum(op.seconds for op in ops)
            out.append(f"  {node}: {len(ops)} operations ({kinds['command']} commands, {kinds['sftp']} SFTP "
                       f"requests), {total * 1000:.0f} ms in them")
        first = sorted(res.trace.ops)[0]
        for op in res.trace.ops[first]:
            out.append(f"    {first}: {op.seconds * 1000:6.1f} ms  {op.what}")
    if res.cold_traces:
        sizes = sorted(res.cold_traces)
        out.append("clusterctl cold deploy, traced in-process: seconds per node in each kind of operation "
                   "(the slowest node)")
        out.append("| operation | " + " | ".join(f"{k} node{'s' if k > 1 else ''}" for k in sizes) + " |")
        out.append("|---|" + "---:|" * len(sizes))
        cats = {k: [categorise(ops) for ops in res.cold_traces[k].ops.values()] for k in sizes}
        for name, _ in CATEGORIES:
            out.append(f"| {name} | " + " | ".join(f"{max(c[name] for c in cats[k]):.2f}" for k in sizes) + " |")
        out.append("| whole deploy (in-process: no start-up, local hashes cached) | "
                   + " | ".join(f"{res.cold_traces[k].seconds:.2f}" for k in sizes) + " |")
        # how far the nodes' work overlapped: the time all nodes spent in remote operations,
        # divided by the wall time of the deploy (4.0 = four nodes busy for the whole deploy)
        busy = {k: sum(op.seconds for ops in res.cold_traces[k].ops.values() for op in ops) for k in sizes}
        out.append("| nodes busy at once (sum of the nodes' operation time / wall time) | "
                   + " | ".join(f"{busy[k] / res.cold_traces[k].seconds:.2f}" for k in sizes) + " |")
    return "\n".join(out)


def machine() -> str:
    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), "0")
    ssh = run(["ssh", "-V"], timeout=10, check=False).stderr.strip()
    return (f"{os.cpu_count()} cores, {int(mem) / 2**20:.0f} GiB memory, Linux {platform.release()}, "
            f"Python {platform.python_version()}, {ssh}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4, help="nodes of the big deploy (2 to 16)")
    parser.add_argument("--rounds", type=int, default=3, help="no-change re-deploys per tool")
    parser.add_argument("--cold-rounds", type=int, default=3, help="cold deploys per tool and size")
    parser.add_argument("--ansible-ssh-args", default=DEFAULT_SSH_ARGS,
                        help=f"Ansible's ssh_args (default {DEFAULT_SSH_ARGS!r}; Ansible ships "
                        f"{ANSIBLE_STOCK_SSH_ARGS!r})")
    args = parser.parse_args()
    if not 2 <= args.nodes <= 16 or args.rounds < 1 or args.cold_rounds < 1:
        parser.error("--nodes 2..16, --rounds and --cold-rounds at least 1")
    problems = preflight("systemd")
    if problems:
        print("cannot build the testbed here:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 1
    try:
        assets.test_model_path()
        assets.llama_bin_dir()
    except pytest.fail.Exception as exc:
        print(f"missing test assets: {exc}", file=sys.stderr)
        return 1
    try:
        playbook_bin = ensure_ansible()
        for line in cleanup_stale():
            log(f"removed a crashed testbed run: {line}")
        work = Path(tempfile.mkdtemp(prefix="clusterctl-deploy-bench-"))
        try:
            load_before = os.getloadavg()[1]
            res = bench(args, playbook_bin, work)
            load = f"load average (5 min) {load_before:.1f} before, {os.getloadavg()[1]:.1f} after"
        finally:
            shutil.rmtree(work, ignore_errors=True)
    except (BenchError, TestbedError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    print()
    print(f"machine: {machine()}; nodes on a local bridge (veth), one Linux host; {load}")
    print(f"Ansible: ansible-core {ANSIBLE_CORE}, pipelining on, forks = nodes, ssh_args {args.ansible_ssh_args!r}")
    print()
    print(report(args, res))
    print()
    print(details(args, res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
