"""Operations: the exact commands each step runs on a node, built purely.

`--dry-run` prints these; the executor runs these; so what is shown is what runs. A command
that carries a secret carries it on stdin (`stdin`), never in its argv or its display.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field

from clusterctl import firewall
from clusterctl.deploy import shell
from clusterctl.deploy.managers import Control, ServiceManager
from clusterctl.deploy.model import MANIFEST, Desired, Step, WeightFile
from clusterctl.engines.install import LlamaBuild, VenvInstall
from clusterctl.inventory import Node
from clusterctl.layout import COMPANIONS, companion_script, script_path, secret_path

BUILD_TIMEOUT = 4 * 3600.0
PULL_TIMEOUT = 24 * 3600.0


@dataclass(frozen=True)
class Run:
    """Run argv on the node."""

    argv: tuple[str, ...]
    timeout: float = 60.0
    check: bool = True  # a non-zero exit fails the step
    stdin: bytes | None = field(default=None, repr=False)
    script: str | None = None  # argv runs this packaged script: shown by name, not by text

    def display(self) -> str:
        if self.script is not None:
            return f"{self.script}.sh " + shlex.join(self.argv[4:])
        return shlex.join(self.argv)


@dataclass(frozen=True)
class Put:
    """Write a file atomically (temp file + rename) with `mode`."""

    path: str
    mode: int
    sensitive: bool = False

    def display(self) -> str:
        return f"write {self.path} (mode {self.mode:o}{', sensitive' if self.sensitive else ''})"


@dataclass(frozen=True)
class Push:
    """Copy a controller file to the node, resuming a partial copy."""

    local: str
    remote: str
    mode: int

    def display(self) -> str:
        return f"copy {self.local} -> {self.remote} (resumable)"


Op = Run | Put | Push


def script(name: str, *args: str, timeout: float = 60.0, check: bool = True) -> Run:
    return Run(tuple(shell.argv(name, *args)), timeout, check, script=name)


def control(c: Control) -> Run:
    return Run(c.argv, c.timeout, c.check)


# -- building blocks ---------------------------------------------------------------------------

def mkdir(path: str) -> Run:
    return Run(("mkdir", "-p", "--", path))


def size_of(path: str) -> Run:
    """Bytes of a file (`wc -c` is the same on GNU and BSD)."""
    return Run(("wc", "-c", path), check=False)


def sha256(path: str) -> Run:
    return script("sha256", path, timeout=3600, check=False)


def remove(path: str) -> Run:
    return Run(("rm", "-f", "--", path))


def move(src: str, dst: str) -> Run:
    return Run(("mv", "-f", "--", src, dst))


def tcp_probe(host: str, port: int, timeout: float = 10.0) -> Run:
    return script("tcp-probe", host, str(int(port)), timeout=timeout, check=False)


def http_probe(url: str) -> Run:
    return Run(("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", url), 15, check=False)


def manifest_put(base: str) -> Put:
    return Put(f"{base}/{MANIFEST}", 0o644)


CURL_SAFE_REDIRECTS = (7, 58, 0)  # the first curl that keeps a custom Authorization from other host names
_CURL_VERSION = re.compile(r"^curl (\d+)\.(\d+)\.(\d+)")


def curl_version() -> Run:
    return Run(("curl", "--version"), 15, check=False)


def parse_curl_version(text: str) -> tuple[int, int, int] | None:
    m = _CURL_VERSION.match(text.strip())
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def curl_pull(w: WeightFile, header: bytes) -> Run:
    assert w.url is not None
    # with a token from an https hub, no redirect may downgrade to http (curl before 7.83 would
    # still send the header to the same host name on another scheme)
    https_only = ("--proto-redir", "=https") if header and w.url.startswith("https://") else ()
    return Run(("curl", "--fail", "--silent", "--show-error", "--location", *https_only, "--retry", "5",
                "--retry-delay", "2", "--speed-limit", "1024", "--speed-time", "60", "--continue-at", "-",
                "--output", w.path + ".part", "--header", "@-", w.url), PULL_TIMEOUT, stdin=header)


def build(b: LlamaBuild) -> Run:
    return script("build-llama", b.archive, b.workdir, b.subdir or "", str(b.jobs) if b.jobs else "", b.bindir,
                  *b.targets, "--", *b.flags, timeout=BUILD_TIMEOUT)


def install(v: VenvInstall) -> Run:
    exe = v.binary.rsplit("/", 1)[-1]
    return script("venv", v.python, v.venv, v.link, v.requirement, v.index_url or "", v.find_links or "", exe,
                  " ".join(v.remove), " ".join(v.alias or ()), v.entry_point or "", timeout=BUILD_TIMEOUT)


def place(part: str, path: str, base: str) -> list[Op]:
    """Verify a fetched .part file and move it into place."""
    return [size_of(part), sha256(part), move(part, path), manifest_put(base)]


# -- a step's operations ---------------------------------------------------------------------

def step_ops(step: Step, d: Desired, node: Node, mgr: ServiceManager, *, health: Sequence[Run] = ()) -> list[Op]:
    """Every operation `step` runs, in order (health probes are repeated until one passes)."""
    k = step.kind
    if k == "push-engine":
        e = next(e for e in d.engines if e.path == step.target)
        return [mkdir(e.path.rsplit("/", 1)[0]), Push(e.local, e.path + ".part", 0o755), *place(e.path + ".part",
                                                                                                 e.path, d.base)]
    if k in ("push-weight", "push-source", "pull-weight", "pull-source"):
        w = fetched(d, step.target)
        first: Op = Push(w.local, w.path + ".part", 0o644) if w.local else curl_pull(w, b"")
        return [mkdir(w.path.rsplit("/", 1)[0]), first, *place(w.path + ".part", w.path, d.base)]
    if k in ("verify-weight", "verify-source"):
        return [sha256(step.target), manifest_put(d.base)]
    if k == "build-engine":
        return [build(next(b for b, _ in d.builds if b.bindir == step.target)), manifest_put(d.base)]
    if k == "install-engine":
        return [install(next(v for v in d.venvs if v.link == step.target)), manifest_put(d.base)]
    if k == "upload":
        f = next(f for f in d.files if f.path == step.target)
        return [Put(f.path, f.mode)]
    if k == "secret":
        return [Put(step.target, 0o600, sensitive=True)]
    if k == "daemon-reload":
        return [control(c) for c in mgr.reload()]
    if k == "remove":
        return removal(d, node, mgr, step.target)
    assert step.service is not None
    return [*(control(c) for c in mgr.restart(node, step.service)), *health]


def removal(d: Desired, node: Node, mgr: ServiceManager, service: str) -> list[Op]:
    """Stop and disable an orphan through the node's manager, drop its port's firewall rule
    (Linux), then delete its unit file (plist, control script), its launch script, the scripts
    its unit ran beside it and its secret; never a file this node should hold. Weights, engines
    and logs stay."""
    keep = set(d.all_paths()) | d.unit_files
    files = (mgr.unit_file(node, service), script_path(node, service),
             *(companion_script(node, service, role) for role in COMPANIONS), secret_path(service))
    paths = [p for p in dict.fromkeys(files) if p not in keep]
    unfirewall = [script("unfirewall", firewall.table(service), firewall.chain(service))] if node.os == "linux" else []
    return [*(control(c) for c in mgr.remove(node, service)), *unfirewall, Run(("rm", "-f", "--", *paths))]


def fetched(d: Desired, path: str) -> WeightFile:
    return next(w for w in [*d.weights, *(archive for _, archive in d.builds)] if w.path == path)


def describe(ops: Sequence[Op]) -> tuple[str, ...]:
    return tuple(op.display() for op in ops)
