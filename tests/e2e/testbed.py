"""A real multi-node cluster on one machine, for end-to-end tests of deploy over SSH.

Each node is a real Linux "machine" in miniature: its own PID, mount, network, UTS, IPC and
cgroup namespaces, an overlay root (the host's / read-only underneath, a tmpfs on top, so
nothing a node writes reaches the host), systemd as its PID 1, a real sshd with its own host
key, and its own address on a private bridge. The controller side gets a fresh SSH key pair
and a known_hosts file built from the nodes' host keys, so tests connect exactly as deploy does
against real machines: `StrictHostKeyChecking=yes`, key login as root.

    with Testbed(3) as tb:
        for node in tb.nodes:
            subprocess.run(node.ssh_argv("hostname"), check=True)

Everything a run creates is named after its run id (6 hex digits): the bridge `cct<id>`,
the host ends of the veth pairs `cct<id>h<k>`, the cgroup `clusterctl-testbed/<id>-node<k>`
and the run directory `<TESTBED_ROOT>/<id>`. Teardown removes exactly those, also on failure
and on Ctrl-C; `cleanup_stale()` removes what crashed runs left behind.

If systemd cannot boot here, `Testbed` raises `SystemdBootError` saying so; `manager="direct"`
boots the same nodes with a small shell init that runs sshd directly (deploy's `direct`
service manager). Nothing falls back silently.

Needs root, util-linux (unshare, nsenter, setpriv), iproute2, systemd and openssh-server
(`ensure_openssh_server()` installs the latter). The node boot script is
tools/testbed-node-boot.sh.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import pytest

Manager = Literal["systemd", "direct"]

TESTBED_ROOT = Path("/var/tmp/clusterctl-testbed")
BOOT_SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "testbed-node-boot.sh"
CGROUP_GROUP = "clusterctl-testbed"
LINK_PREFIX = "cct"
SUBNET_PREFIX = "10.213"
HOST_OCTET = 1
FIRST_NODE_OCTET = 11

#: Units masked (linked to /dev/null) in every node: ones that fail or hang in a node, or
#: would act on the host's kernel (modules are global, not per namespace).
DEFAULT_MASK: tuple[str, ...] = (
    "postgresql.service",
    "getty@tty1.service",
    "console-getty.service",
    "openipmi.service",
    "systemd-modules-load.service",
    "modprobe@.service",
)
#: Admin-enabled units a node keeps; everything else the host image enables is switched off,
#: so each node boots to systemd's basics plus sshd, like a fresh server.
DEFAULT_KEEP: tuple[str, ...] = ("ssh.service",)

SSHD_DROPIN = """\
# clusterctl testbed node: key login as root only, with this node's own host key.
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
MaxStartups 64:30:128
MaxSessions 64
"""

_RUN_ID_RE = re.compile(r"^[0-9a-f]{6}$")
_LINK_RE = re.compile(rf"^{LINK_PREFIX}([0-9a-f]{{6}})(h\d+)?$")
_REQUIRED_TOOLS = ("unshare", "nsenter", "setpriv", "ip", "chroot", "ssh", "ssh-keygen")


# What deploy writes on a node; hidden from fresh nodes (see Testbed._prepare_nodes).
MANAGED_PATHS = ("opt/clusterctl", "opt/models", "etc/clusterctl", "tmp/clusterctl-demo")


class TestbedError(RuntimeError):
    """The testbed could not be built, reached or torn down; the message says what and why."""

    __test__ = False


class SystemdBootError(TestbedError):
    """systemd cannot run as a node's PID 1 on this machine (use manager="direct" if that is fine)."""


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 60,
         input: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              input=input, check=False)
    except subprocess.TimeoutExpired as exc:
        raise TestbedError(f"{shlex.join(argv)} did not finish in {timeout:g} s") from exc
    if check and proc.returncode != 0:
        raise TestbedError(f"{shlex.join(argv)} failed (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()}")
    return proc


# ---------------------------------------------------------------------------------------------
# host facts


def unified_cgroup_root() -> Path | None:
    """Where the host mounts the cgroup v2 hierarchy (pure or hybrid layout), if anywhere."""
    candidates: list[Path] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            candidates.append(Path(_unescape(left.split()[4])))
    for preferred in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if preferred in candidates:
            return preferred
    return candidates[0] if candidates else None


def preflight(manager: Manager = "systemd") -> list[str]:
    """What this machine lacks to boot testbed nodes with `manager` (empty: nothing)."""
    problems: list[str] = []
    if os.geteuid() != 0:
        problems.append("the testbed needs root (namespaces, mounts, bridges)")
    problems += [f"`{tool}` is not installed" for tool in _REQUIRED_TOOLS if shutil.which(tool) is None]
    if not Path("/usr/sbin/sshd").exists():
        problems.append("/usr/sbin/sshd is missing: install openssh-server (ensure_openssh_server())")
    if manager == "systemd" and not Path("/lib/systemd/systemd").exists():
        problems.append("/lib/systemd/systemd is missing: systemd is not installed")
    if "overlay" not in Path("/proc/filesystems").read_text():
        problems.append("the kernel has no overlay file system (a node's root is an overlay)")
    if unified_cgroup_root() is None:
        problems.append("no cgroup v2 hierarchy is mounted (each node gets its own cgroup subtree)")
    if not BOOT_SCRIPT.is_file():
        problems.append(f"the node boot script {BOOT_SCRIPT} is missing")
    return problems


def ensure_openssh_server() -> None:
    """Install openssh-server with apt-get when sshd is missing; raises TestbedError if that fails."""
    if Path("/usr/sbin/sshd").exists() and shutil.which("ssh-keygen"):
        return
    if os.geteuid() != 0:
        raise TestbedError("sshd is missing and installing openssh-server needs root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "openssh-server"]):
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TestbedError(f"installing openssh-server for the testbed: {shlex.join(argv)}: {exc}") from exc
        if proc.returncode != 0:
            raise TestbedError(f"installing openssh-server for the testbed: {shlex.join(argv)} failed: "
                               f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    if not Path("/usr/sbin/sshd").exists():
        raise TestbedError("apt-get installed openssh-server but /usr/sbin/sshd is still missing")


def _unescape(path: str) -> str:
    """Undo the octal escapes of /proc/*/mountinfo (space, tab, newline, backslash)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def _mounts_under(directory: Path) -> list[Path]:
    """Mount points at or below `directory`, in mount order (unmount in reverse)."""
    prefix = str(directory).rstrip("/") + "/"
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = _unescape(line.split()[4])
        if point == str(directory) or point.startswith(prefix):
            found.append(Path(point))
    return found


def _processes_rooted_under(directory: Path) -> list[int]:
    """PIDs whose root directory (chroot) lies in `directory`."""
    prefix = str(directory).rstrip("/") + "/"
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            root = os.readlink(entry / "root")
        except OSError:
            continue
        if root == str(directory) or root.startswith(prefix):
            pids.append(int(entry.name))
    return pids


def _link_names() -> list[str]:
    out = _run(["ip", "-o", "link", "show"]).stdout
    return [line.split(":", 2)[1].strip().split("@", 1)[0] for line in out.splitlines() if ":" in line]


def _links_of(run_id: str) -> list[str]:
    return [name for name in _link_names() if (m := _LINK_RE.match(name)) and m.group(1) == run_id]


def _used_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    for line in _run(["ip", "-4", "-o", "addr", "show"]).stdout.splitlines():
        if m := re.search(r"\binet (\S+)", line):
            nets.append(ipaddress.IPv4Interface(m.group(1)).network)
    for line in _run(["ip", "-4", "route", "show", "table", "all"]).stdout.splitlines():
        dest = line.split()[0] if line.split() else ""
        if dest and dest[0].isdigit():
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.IPv4Network(dest, strict=False))
    return nets


def _process_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_alive(run_dir: Path) -> bool:
    """True while the process that created the run is alive (pid and start time match)."""
    try:
        owner = json.loads((run_dir / "owner").read_text())
    except (OSError, ValueError):
        # created a moment ago and not yet claimed, or garbage from a crash
        try:
            return time.time() - run_dir.stat().st_mtime < 60
        except OSError:
            return False
    return bool(_process_start_time(int(owner["pid"])) == owner["start"])


@contextlib.contextmanager
def _root_lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _node_cgroups(run_id: str) -> list[Path]:
    base = unified_cgroup_root()
    if base is None or not (base / CGROUP_GROUP).is_dir():
        return []
    return sorted((base / CGROUP_GROUP).glob(f"{run_id}-node*"))


def _cgroup_pids(cgroup: Path) -> list[int]:
    pids: list[int] = []
    for procs in cgroup.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            pids += [int(p) for p in procs.read_text().split()]
    return pids


def _kill_cgroup(cgroup: Path) -> None:
    kill = cgroup / "cgroup.kill"
    if kill.exists():
        with contextlib.suppress(OSError):
            kill.write_text("1")
    for pid in _cgroup_pids(cgroup):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _remove_cgroup(cgroup: Path, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        dirs = sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for directory in [*dirs, cgroup]:
            with contextlib.suppress(FileNotFoundError, OSError):
                directory.rmdir()
        if not cgroup.exists():
            return True
        if time.monotonic() > deadline:
            return False
        _kill_cgroup(cgroup)
        time.sleep(0.05)


def _force_remove_run(run_id: str, run_dir: Path) -> list[str]:
    """Kill, unmount and delete everything of one run; returns what could not be removed."""
    problems: list[str] = []
    for cgroup in _node_cgroups(run_id):
        _kill_cgroup(cgroup)
    for pid in _processes_rooted_under(run_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _processes_rooted_under(run_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    for point in reversed(_mounts_under(run_dir)):
        if _run(["umount", str(point)], check=False).returncode != 0:
            _run(["umount", "-l", str(point)], check=False)
    for name in sorted(_links_of(run_id), key=lambda n: n == f"{LINK_PREFIX}{run_id}"):  # bridge last
        _run(["ip", "link", "del", name], check=False)
    for cgroup in _node_cgroups(run_id):
        if not _remove_cgroup(cgroup):
            problems.append(f"cgroup {cgroup} still has processes")
    if run_dir.exists():
        if _mounts_under(run_dir):
            problems.append(f"{run_dir} still has mounts; not deleting it")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    return problems + leftovers(run_id, run_dir)


def leftovers(run_id: str, run_dir: Path) -> list[str]:
    """Everything of run `run_id` that still exists on the host (empty after a clean teardown)."""
    found = [f"link {name}" for name in _links_of(run_id)]
    found += [f"mount {point}" for point in _mounts_under(run_dir)]
    found += [f"process {pid} rooted in {run_dir}" for pid in _processes_rooted_under(run_dir)]
    found += [f"cgroup {cg}" for cg in _node_cgroups(run_id)]
    if run_dir.exists():
        found.append(f"directory {run_dir}")
    return found


def cleanup_stale(root: Path = TESTBED_ROOT) -> list[str]:
    """Remove what crashed testbed runs left behind; returns a line per run id cleaned.

    Touches only things this module names (run directories under `root`, links `cct<id>`,
    `cct<id>h<k>`, cgroups `clusterctl-testbed/<id>-node<k>`) and only for runs whose owning
    process is gone, so testbeds of other live test processes are left alone."""
    if os.geteuid() != 0:
        return []
    cleaned = []
    with _root_lock(root):
        live = {d.name for d in root.iterdir() if d.is_dir() and _RUN_ID_RE.match(d.name) and _owner_alive(d)}
        stale = {d.name for d in root.iterdir() if d.is_dir() and _RUN_ID_RE.match(d.name)} - live
        stale |= {m.group(1) for name in _link_names() if (m := _LINK_RE.match(name))} - live
        base = unified_cgroup_root()
        if base is not None and (base / CGROUP_GROUP).is_dir():
            stale |= {p.name.split("-", 1)[0] for p in (base / CGROUP_GROUP).iterdir()
                      if p.is_dir() and _RUN_ID_RE.match(p.name.split("-", 1)[0])} - live
        for run_id in sorted(stale):
            problems = _force_remove_run(run_id, root / run_id)
            cleaned.append(f"{run_id}: " + ("; ".join(problems) if problems else "removed"))
    return cleaned


# ---------------------------------------------------------------------------------------------
# for tests

_host_prepared = False


def requested_manager() -> Manager:
    """The manager the e2e tests use: systemd, unless CLUSTERCTL_TESTBED_MANAGER=direct asks otherwise."""
    value = os.environ.get("CLUSTERCTL_TESTBED_MANAGER", "systemd")
    if value == "systemd":
        return "systemd"
    if value == "direct":
        return "direct"
    raise TestbedError(f"CLUSTERCTL_TESTBED_MANAGER must be 'systemd' or 'direct', not {value!r}")


def open_testbed(n: int, *, manager: Manager | None = None, **kwargs: Any) -> Testbed:
    """A started testbed of `n` nodes for a test (close it, or use it in a `with` block).

    The first call installs openssh-server when sshd is missing and removes what crashed runs
    left behind. Any failure, systemd included, fails the test with the reason; nothing skips."""
    global _host_prepared
    try:
        chosen = manager or requested_manager()
        if not _host_prepared:
            if not Path("/usr/sbin/sshd").exists():
                print("testbed: sshd is missing; installing openssh-server with apt-get", file=sys.stderr)
                ensure_openssh_server()
            cleanup_stale()
            _host_prepared = True
        return Testbed(n, manager=chosen, **kwargs).start()
    except SystemdBootError as exc:
        pytest.fail(f"the testbed needs systemd as each node's PID 1 and cannot get it here:\n{exc}\n"
                    "Set CLUSTERCTL_TESTBED_MANAGER=direct to run the end-to-end tests on nodes that run "
                    "sshd without systemd.", pytrace=False)
    except TestbedError as exc:
        pytest.fail(f"cannot build the testbed: {exc}", pytrace=False)


def require_systemd(testbed: Testbed) -> None:
    """Skip, with the reason, a systemd-only check when the run explicitly asked for manager=direct."""
    if testbed.manager != "systemd":
        pytest.skip("needs systemd in the nodes; this run asked for manager=direct (CLUSTERCTL_TESTBED_MANAGER)")


# ---------------------------------------------------------------------------------------------
# nodes


@dataclass
class Node:
    """One booted node. `run` is for test assertions only; deploy code must go through SSH."""

    name: str
    index: int
    ip: str
    dir: Path
    host_key: str
    testbed: Testbed = field(repr=False)
    pid: int = 0
    state: str = "down"
    failed_units: list[str] = field(default_factory=list)
    boot_seconds: float = 0.0
    cgroup: Path | None = field(default=None, repr=False)
    launcher: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def root(self) -> Path:
        """The node's root file system (the overlay) as its processes see it at `/`; readable
        from the host too (it is mounted in the host's mount namespace as well)."""
        return self.dir / "merged"

    @property
    def upper(self) -> Path:
        """The overlay's upper layer: exactly the files the node created or changed."""
        return self.dir / "rw" / "upper"

    @property
    def log_path(self) -> Path:
        return self.dir / "boot.log"

    def run(self, argv: Sequence[str], *, check: bool = False, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the node (all its namespaces, its root and working directory)."""
        if not self.pid:
            raise TestbedError(f"{self.name} is not running")
        return _run(["nsenter", "-t", str(self.pid), "-a", "-r", "-w", "--", *argv],
                    check=check, timeout=timeout, input=input)

    def ssh_argv(self, *command: str, user: str = "root", known_hosts: Path | None = None,
                 options: Sequence[str] = ()) -> list[str]:
        """An `ssh` command line to this node: the testbed key, strict host key checking."""
        return ["ssh", *self.testbed.ssh_options(known_hosts), *options, f"{user}@{self.ip}", *command]

    def ssh(self, *command: str, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return _run(self.ssh_argv(*command), check=False, timeout=timeout, input=input)

    def processes(self) -> list[int]:
        return _cgroup_pids(self.cgroup) if self.cgroup else []

    def memory_bytes(self) -> int:
        """Memory the node costs: proportional set size of its processes plus its tmpfs contents."""
        total = 0
        for pid in self.processes():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
        df = self.run(["df", "-B1", "--output=used", "/", "/run", "/tmp", "/dev", "/dev/shm"], check=True)
        total += sum(int(v) for v in df.stdout.split()[1:])
        return total

    def wait_for_port(self, port: int, timeout: float = 30) -> None:
        """Wait until something accepts TCP connections on this node's address and `port`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((self.ip, port), timeout=1):
                    return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise TestbedError(f"{self.name}: nothing accepts {self.ip}:{port} after {timeout:g} s") from exc
                time.sleep(0.05)


class Testbed:
    """N real nodes on a private bridge; a context manager (`start()` / `close()` by hand also work).

    Create and close it from the same thread: nodes are tied to the creating thread's life so
    that they die with the test process even if it is killed."""

    __test__ = False

    def __init__(self, n: int, *, run_id: str | None = None, manager: Manager = "systemd",
                 mask: Iterable[str] = DEFAULT_MASK, keep_enabled: Iterable[str] = DEFAULT_KEEP,
                 root: Path = TESTBED_ROOT, boot_timeout: float = 60.0, stop_timeout: float = 15.0) -> None:
        if n < 1 or n > 200:
            raise ValueError(f"a testbed has 1 to 200 nodes, not {n}")
        if manager not in ("systemd", "direct"):
            raise ValueError(f"manager must be 'systemd' or 'direct', not {manager!r}")
        self.run_id = run_id or secrets.token_hex(3)
        if not _RUN_ID_RE.match(self.run_id):
            raise ValueError(f"run id must be 6 lowercase hex digits, not {self.run_id!r}")
        self.n = n
        self.manager: Manager = manager
        self.mask = tuple(mask)
        self.keep_enabled = tuple(keep_enabled)
        self.root = root
        self.run_dir = root / self.run_id
        self.bridge = f"{LINK_PREFIX}{self.run_id}"
        self.boot_timeout = boot_timeout
        self.stop_timeout = stop_timeout
        self.subnet: ipaddress.IPv4Network | None = None
        self.nodes: list[Node] = []
        self.boot_seconds = 0.0
        self.teardown_seconds = 0.0
        self._started = False
        self._created = False  # the run directory is ours: teardown may remove the run's names
        self._closed = False

    # -- paths and SSH ------------------------------------------------------------------------

    @property
    def host_ip(self) -> str:
        """The controller's address on the bridge (the nodes reach the host there)."""
        assert self.subnet is not None, "testbed not started"
        return str(self.subnet.network_address + HOST_OCTET)

    @property
    def key_path(self) -> Path:
        """The controller's private key (root's authorized key on every node)."""
        return self.run_dir / "controller" / "id_ed25519"

    @property
    def public_key(self) -> str:
        return (self.run_dir / "controller" / "id_ed25519.pub").read_text().strip()

    @property
    def known_hosts(self) -> Path:
        """known_hosts with every node's host key under its IP."""
        return self.run_dir / "controller" / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        """An ssh_config with a `Host nodeK` entry per node (for `ssh -F`, fabric, paramiko)."""
        return self.run_dir / "controller" / "ssh_config"

    def ssh_options(self, known_hosts: Path | None = None) -> list[str]:
        kh = known_hosts if known_hosts is not None else self.known_hosts
        return ["-F", "/dev/null", "-i", str(self.key_path),
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={kh}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10",
                "-o", "LogLevel=ERROR"]

    def cluster_yaml(self, name: str, engines: str) -> str:
        """An inventory's `cluster:` block for this testbed: its SSH key and known_hosts, models
        in /opt/models, and `engines` (YAML lines, indented under `engines:`)."""
        return (f"cluster:\n  name: {name}\n"
                f"  ssh: {{user: root, key: '{self.key_path}', known_hosts: '{self.known_hosts}', "
                "connect_timeout: 5s}\n"
                "  defaults: {models_dir: /opt/models}\n"
                "  engines:\n" + "".join(f"    {line}\n" for line in engines.splitlines()))

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    # -- life cycle ---------------------------------------------------------------------------

    def __enter__(self) -> Testbed:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.close()
        except TestbedError:
            if exc_type is None:
                raise
            # the original failure matters more; leftovers are reported by cleanup_stale()

    def start(self) -> Testbed:
        if self._started:
            raise TestbedError("a Testbed starts once")
        self._started = True
        problems = preflight(self.manager)
        if problems:
            error = SystemdBootError if any("systemd" in p for p in problems) else TestbedError
            raise error("cannot build a testbed on this machine:\n  - " + "\n  - ".join(problems))
        atexit.register(self._atexit_close)
        started = time.monotonic()
        try:
            self._create_run_dir()
            self._create_controller_keys()
            self._create_bridge()
            self._prepare_nodes()
            self._write_ssh_files()
            self._launch_nodes()
            with ThreadPoolExecutor(max_workers=self.n) as pool:
                failures = [exc for exc in pool.map(self._bring_up, self.nodes) if exc is not None]
            if failures:
                message = "\n".join(str(exc) for exc in failures)
                if any(isinstance(exc, SystemdBootError) for exc in failures):
                    raise SystemdBootError(message + "\nsystemd did not boot the node(s) as PID 1 here; where "
                                           "a machine cannot run it, Testbed(..., manager='direct') boots the "
                                           "nodes with sshd only, for deploy's `direct` service manager")
                raise TestbedError(message)
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise
        self.boot_seconds = time.monotonic() - started
        return self

    def close(self) -> None:
        """Stop every node and remove everything of this run. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._atexit_close)
        started = time.monotonic()
        self._stop_nodes()
        if not self._created:
            return  # never remove what another run with the same id owns
        with _root_lock(self.root):
            problems = _force_remove_run(self.run_id, self.run_dir)
        for node in self.nodes:
            if node.launcher is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.launcher.wait(timeout=5)
            node.pid = 0
            node.state = "down"
        self.teardown_seconds = time.monotonic() - started
        if problems:
            raise TestbedError(f"testbed {self.run_id} teardown left: " + "; ".join(problems))

    def leftovers(self) -> list[str]:
        return leftovers(self.run_id, self.run_dir)

    def memory_bytes(self) -> int:
        return sum(node.memory_bytes() for node in self.nodes)

    def report(self) -> str:
        states = ", ".join(f"{n.name}={n.state}" + (f" (failed: {' '.join(n.failed_units)})" if n.failed_units else "")
                           for n in self.nodes)
        return (f"testbed {self.run_id}: {self.n} node(s), manager={self.manager}, subnet {self.subnet}, "
                f"booted in {self.boot_seconds:.2f} s; {states}")

    def _atexit_close(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -- start steps --------------------------------------------------------------------------

    def _create_run_dir(self) -> None:
        with _root_lock(self.root):
            try:
                self.run_dir.mkdir(parents=True)
            except FileExistsError as exc:
                raise TestbedError(f"run directory {self.run_dir} already exists (run id reused?)") from exc
            self._created = True
            (self.run_dir / "owner").write_text(json.dumps(
                {"pid": os.getpid(), "start": _process_start_time(os.getpid())}))
            # a private bind mount: the node mounts below it never propagate to other namespaces
            _run(["mount", "--bind", str(self.run_dir), str(self.run_dir)])
            _run(["mount", "--make-private", str(self.run_dir)])
            self.subnet = self._pick_subnet()
            (self.run_dir / "subnet").write_text(f"{self.subnet}\n")

    def _pick_subnet(self) -> ipaddress.IPv4Network:
        used = _used_networks()
        for run in self.root.iterdir():
            if run != self.run_dir and (run / "subnet").is_file() and _owner_alive(run):
                with contextlib.suppress(ValueError):
                    used.append(ipaddress.IPv4Network((run / "subnet").read_text().strip()))
        first = int(self.run_id, 16) % 200
        for step in range(200):
            candidate = ipaddress.IPv4Network(f"{SUBNET_PREFIX}.{20 + (first + step) % 200}.0/24")
            if not any(candidate.overlaps(net) for net in used):
                return candidate
        raise TestbedError(f"no free /24 in {SUBNET_PREFIX}.20.0 - {SUBNET_PREFIX}.219.0 for the testbed")

    def _create_controller_keys(self) -> None:
        (self.run_dir / "controller").mkdir(mode=0o700)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"clusterctl-testbed-{self.run_id}",
              "-f", str(self.key_path)])

    def _create_bridge(self) -> None:
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self.host_ip}/{self.subnet.prefixlen if self.subnet else 24}",
              "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])

    def _prepare_nodes(self) -> None:
        assert self.subnet is not None
        cgroup_base = unified_cgroup_root()
        assert cgroup_base is not None
        for k in range(1, self.n + 1):
            name = f"node{k}"
            node_dir = self.run_dir / name
            seed = node_dir / "seed"
            for sub in ("rw", "merged", "seed", "state"):
                (node_dir / sub).mkdir(parents=True)
            # The node's root: the host's / under a tmpfs upper layer. Mounted here (inside the
            # run's private bind mount) so the host can read what a node wrote (Node.upper).
            _run(["mount", "-t", "tmpfs", "-o", "mode=0755", "clusterctl-testbed-rw", str(node_dir / "rw")])
            (node_dir / "rw" / "upper").mkdir()
            (node_dir / "rw" / "work").mkdir()
            _run(["mount", "-t", "overlay", "clusterctl-testbed-root", "-o",
                  f"lowerdir=/,upperdir={node_dir}/rw/upper,workdir={node_dir}/rw/work", str(node_dir / "merged")])
            # Nodes start without anything clusterctl installs, even when this machine has
            # them (a local demo deploy): removing them in the overlay hides them (whiteouts),
            # the host's copies are untouched.
            for managed in MANAGED_PATHS:
                target = node_dir / "merged" / managed
                if target.is_symlink() or target.is_file():
                    target.unlink()
                elif target.exists():
                    shutil.rmtree(target)
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{name}",
                  "-f", str(seed / "ssh_host_ed25519_key")])
            (seed / "authorized_keys").write_text(self.public_key + "\n")
            (seed / "machine-id").write_text(secrets.token_hex(16) + "\n")
            (seed / "sshd.conf").write_text(SSHD_DROPIN)
            (seed / "mask").write_text("".join(f"{u}\n" for u in self.mask))
            (seed / "keep").write_text("".join(f"{u}\n" for u in self.keep_enabled))
            host_key = " ".join((seed / "ssh_host_ed25519_key.pub").read_text().split()[:2])
            cgroup = cgroup_base / CGROUP_GROUP / f"{self.run_id}-{name}"
            cgroup.mkdir(parents=True)
            self.nodes.append(Node(name=name, index=k, ip=str(self.subnet.network_address + FIRST_NODE_OCTET + k - 1),
                                   dir=node_dir, host_key=host_key, testbed=self, cgroup=cgroup))

    def _write_ssh_files(self) -> None:
        self.known_hosts.write_text("".join(f"{node.ip} {node.host_key}\n" for node in self.nodes))
        lines = []
        for node in self.nodes:
            lines += [f"Host {node.name}", f"  HostName {node.ip}", ""]
        lines += ["Host *", "  User root", f"  IdentityFile {self.key_path}", "  IdentitiesOnly yes",
                  "  BatchMode yes", "  StrictHostKeyChecking yes", f"  UserKnownHostsFile {self.known_hosts}",
                  "  GlobalKnownHostsFile /dev/null", "  ConnectTimeout 10", "  LogLevel ERROR", ""]
        self.ssh_config.write_text("\n".join(lines))

    def _launch_nodes(self) -> None:
        for node in self.nodes:
            assert node.cgroup is not None
            # The launcher joins the node's cgroup, then becomes `unshare`, whose child runs the
            # boot script as PID 1 of the new namespaces. --pdeathsig/--kill-child: if the test
            # process dies, so does the node.
            script = (f"echo $$ > {shlex.quote(str(node.cgroup / 'cgroup.procs'))} && exec unshare --pid --fork "
                      f"--kill-child --mount --net --uts --ipc --cgroup bash {shlex.quote(str(BOOT_SCRIPT))} "
                      f"{shlex.quote(str(node.dir))} {node.name} {self.manager}")
            with open(node.log_path, "wb") as log:
                node.launcher = subprocess.Popen(
                    ["setpriv", "--pdeathsig", "KILL", "--", "sh", "-c", script],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _bring_up(self, node: Node) -> TestbedError | None:
        """Boot one node to a reachable sshd; returns what went wrong, if anything."""
        started = time.monotonic()
        deadline = started + self.boot_timeout
        try:
            self._wait_prepared(node, deadline)
            node.pid = self._find_init_pid(node)
            self._configure_network(node)
            (node.dir / "state" / "go").touch()
            self._wait_exec(node, deadline)
            if self.manager == "systemd":
                self._wait_systemd(node, deadline)
            else:
                node.state = "running"
            node.wait_for_port(22, timeout=max(1.0, deadline - time.monotonic()))
        except TestbedError as exc:
            return type(exc)(f"{node.name}: {exc}{self._log_tail(node)}")
        node.boot_seconds = time.monotonic() - started
        return None

    def _log_tail(self, node: Node) -> str:
        try:
            text = node.log_path.read_text(errors="replace").strip()
        except OSError:
            return ""
        return "\n    boot log: " + "\n    ".join(text.splitlines()[-15:]) if text else ""

    def _check_alive(self, node: Node, step: str) -> None:
        failed = node.dir / "state" / "failed"
        if failed.exists():
            raise TestbedError(f"boot script failed while {step}: {failed.read_text().strip()}")
        if node.launcher is not None and node.launcher.poll() is not None:
            raise TestbedError(f"node exited (status {node.launcher.returncode}) while {step}")

    def _wait_prepared(self, node: Node, deadline: float) -> None:
        while not (node.dir / "state" / "prepared").exists():
            self._check_alive(node, "preparing its root")
            if time.monotonic() > deadline:
                raise TestbedError("root file system not prepared in time")
            time.sleep(0.02)

    def _find_init_pid(self, node: Node) -> int:
        """The host PID of the node's PID 1 (NSpid ends in 1), found in the node's cgroup."""
        for pid in node.processes():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("NSpid:") and len(line.split()) == 3 and line.split()[2] == "1":
                        return pid
        raise TestbedError("cannot find the node's PID 1 in its cgroup")

    def _configure_network(self, node: Node) -> None:
        assert self.subnet is not None
        host_end = f"{self.bridge}h{node.index}"
        _run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", str(node.pid)])
        _run(["ip", "link", "set", host_end, "master", self.bridge, "up"])
        _run(["nsenter", "-t", str(node.pid), "-n", "ip", "-batch", "-"],
             input=f"addr add {node.ip}/{self.subnet.prefixlen} dev eth0\nlink set eth0 up\nlink set lo up\n")

    def _wait_exec(self, node: Node, deadline: float) -> None:
        """Wait until PID 1 has chrooted into the overlay (readlink /proc/PID/root == NODE/merged)."""
        while True:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{node.pid}/root") == str(node.root):
                    return
            self._check_alive(node, "starting its init")
            if time.monotonic() > deadline:
                error = SystemdBootError if self.manager == "systemd" else TestbedError
                raise error("init did not start in the overlay root in time")
            time.sleep(0.02)

    def _wait_systemd(self, node: Node, deadline: float) -> None:
        state = ""
        while True:
            try:
                self._check_alive(node, "systemd was booting")
            except TestbedError as exc:
                raise SystemdBootError(str(exc)) from None
            proc = node.run(["systemctl", "is-system-running"], timeout=10)
            state = proc.stdout.strip()
            if state in ("running", "degraded"):
                break
            # "offline" also means "systemd has not opened its control socket yet": keep waiting
            if state in ("maintenance", "stopping"):
                raise SystemdBootError(f"systemd state is {state!r}")
            if time.monotonic() > deadline:
                jobs = node.run(["systemctl", "list-jobs", "--no-legend", "--no-pager"], timeout=10).stdout
                raise SystemdBootError(f"systemd still {state or proc.stderr.strip()!r} after {self.boot_timeout:g} s; "
                                   f"jobs: {jobs.strip()}")
            time.sleep(0.05)
        node.state = state
        if state == "degraded":
            out = node.run(["systemctl", "list-units", "--failed", "--plain", "--no-legend", "--no-pager"]).stdout
            node.failed_units = [line.split()[0] for line in out.splitlines() if line.strip()]

    # -- stop ---------------------------------------------------------------------------------

    def _stop_nodes(self) -> None:
        running = [node for node in self.nodes if node.launcher is not None and node.launcher.poll() is None]
        for node in running:
            init_pid = node.pid or self._maybe_init_pid(node)
            if not init_pid:
                continue
            # systemd powers off on SIGRTMIN+4; the direct init is simply killed (killing a PID
            # namespace's first process kills the whole namespace).
            sig = signal.SIGRTMIN + 4 if self.manager == "systemd" and node.state != "down" else signal.SIGKILL
            with contextlib.suppress(ProcessLookupError):
                os.kill(init_pid, sig)
        deadline = time.monotonic() + self.stop_timeout
        for node in running:
            assert node.launcher is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.launcher.wait(timeout=max(0.1, deadline - time.monotonic()))
        for node in running:
            assert node.launcher is not None
            if node.launcher.poll() is None and node.cgroup is not None:
                _kill_cgroup(node.cgroup)

    def _maybe_init_pid(self, node: Node) -> int:
        try:
            return self._find_init_pid(node)
        except TestbedError:
            return 0


#: What the `testbed_factory` fixture yields: factory(n, manager=None, **Testbed kwargs) -> started Testbed.
TestbedFactory = Callable[..., Testbed]
