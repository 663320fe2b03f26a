"""The executor: the one place that changes a node. It runs a step's operations (ops.py) over
the node's transport, verifies what it fetched, keeps the node's manifest, and rolls a
service back to its previous files when the new version does not become healthy."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from clusterctl.deploy import checks, ops
from clusterctl.deploy.desired import DeployError
from clusterctl.deploy.facts import parse_manifest, parse_sha256sum
from clusterctl.deploy.managers import ServiceManager
from clusterctl.deploy.model import Desired, Phase, Step, WeightFile
from clusterctl.engines import LaunchSpec
from clusterctl.engines.install import LlamaBuild, VenvInstall
from clusterctl.errors import ClusterctlError, ExitCode
from clusterctl.inventory import Inventory, Node
from clusterctl.models import remote
from clusterctl.secretref import read_secret
from clusterctl.transport import CommandResult, Transport, TransportError

PULL_POLL = 1.0  # seconds between size reports of a node-side download

BUILD_FAILURES = {3: "the archive holds no llama.cpp source tree", 4: "cmake could not configure the build",
                  5: "the source has no such target", 6: "the build failed"}
HUB_HINTS = {"401": "the hub wants a token: set cluster.huggingface.token",
             "403": "the token has no access to this repository (gated? accept its licence)",
             "404": "the repository, revision or file does not exist"}


class Reporter(Protocol):
    def phase(self, phase: Phase) -> None: ...
    def step(self, node: str, step: Step, status: str, detail: str = "") -> None: ...
    def progress(self, node: str, label: str, done: int, total: int) -> None: ...


class NullReporter:
    def phase(self, phase: Phase) -> None:
        pass

    def step(self, node: str, step: Step, status: str, detail: str = "") -> None:
        pass

    def progress(self, node: str, label: str, done: int, total: int) -> None:
        pass


@dataclass
class NodeResult:
    node: str
    steps: list[Step] = field(default_factory=list)
    done: list[Step] = field(default_factory=list)
    failed: str | None = None  # why this node's rollout stopped
    error: ClusterctlError | None = field(default=None, repr=False)  # the typed cause, when one was raised
    log_tail: str = ""
    rolled_back: list[str] = field(default_factory=list)
    diffs: dict[str, str] = field(default_factory=dict)  # path -> unified diff (dry run)
    orphans: list[str] = field(default_factory=list)  # services installed here the inventory does not hold here
    bytes_sent: int = 0

    @property
    def ok(self) -> bool:
        return self.failed is None

    @property
    def exit_code(self) -> ExitCode:
        """OK, the typed cause's exit code, or DEPLOY_FAILED (a rollout that failed and rolled back)."""
        if self.ok:
            return ExitCode.OK
        return self.error.exit_code if self.error is not None else ExitCode.DEPLOY_FAILED

    def fail(self, exc: ClusterctlError) -> None:
        """Stop this node's rollout for `exc`, keeping it typed (its exit code) and as text."""
        self.error = exc
        self.failed = str(exc) + (f" ({exc.hint})" if exc.hint else "")


class Executor:
    def __init__(self, inv: Inventory, d: Desired, node: Node, mgr: ServiceManager, t: Transport,
                 reporter: Reporter, specs: dict[str, LaunchSpec], result: NodeResult) -> None:
        self.inv, self.d, self.node, self.mgr, self.t = inv, d, node, mgr, t
        self.reporter, self.specs, self.result = reporter, specs, result
        self.backups: dict[str, bytes | None] = {}
        self.acquirers: dict[str, Callable[[Step], None]] = {
            "push-engine": self._push_engine, "push-weight": self._fetch, "push-source": self._fetch,
            "pull-weight": self._fetch, "pull-source": self._fetch, "verify-weight": self._verify_in_place,
            "verify-source": self._verify_in_place, "build-engine": self._build, "install-engine": self._install}

    # -- running operations --------------------------------------------------------------------
    def run(self, op: ops.Run) -> CommandResult:
        return self.t.run(list(op.argv), input=op.stdin, timeout=op.timeout)

    def control(self, controls: list[ops.Run]) -> tuple[bool, str]:
        for c in controls:
            r = self.run(c)
            if c.check and not r.ok:
                return False, (r.err + r.out).strip()
        return True, ""

    # -- acquire -------------------------------------------------------------------------------
    def acquire(self, s: Step) -> None:
        self.reporter.step(self.d.node, s, "start")
        self.acquirers[s.kind](s)
        self.result.done.append(s)
        self.reporter.step(self.d.node, s, "done")

    def _push_engine(self, s: Step) -> None:
        e = next(e for e in self.d.engines if e.path == s.target)
        self._push(e.local, e.path, e.sha256, 0o755, e.size)

    def _fetch(self, s: Step) -> None:
        w = ops.fetched(self.d, s.target)
        if w.local:
            self._push(w.local, w.path, w.sha256, 0o644, w.size)
        else:
            self._pull(w)

    def _push(self, local: str, path: str, sha: str | None, mode: int, size: int) -> None:
        part = path + ".part"
        self.run(ops.mkdir(path.rsplit("/", 1)[0]))
        push = ops.Push(local, part, mode)
        self.result.bytes_sent += self.t.push(push.local, push.remote, mode=push.mode, progress=lambda done, total:
                                              self.reporter.progress(self.d.node, path, done, total))
        self._verify_and_place(part, path, sha, size)

    def _pull(self, w: WeightFile) -> None:
        assert w.url is not None
        endpoint = self.inv.cluster.huggingface.endpoint
        # the hub token goes to the hub's own origin only, and only through a curl that keeps it
        # from the hosts a redirect leads to (the CDN holding the file)
        token = remote.token_for(w.url, read_secret(self.inv.cluster.huggingface.token) if w.hub else None,
                                 endpoint=endpoint)
        if token:
            self._check_curl()
        header = f"Authorization: Bearer {token}\n".encode() if token else b""  # on stdin: never in argv
        self.run(ops.mkdir(w.path.rsplit("/", 1)[0]))
        with self._watch_size(w.path + ".part", w.path, w.size):
            r = self.run(ops.curl_pull(w, header))
        if not r.ok:
            message = r.err.strip().splitlines()[-1] if r.err.strip() else f"curl exit {r.rc}"
            hint = next((h for code, h in HUB_HINTS.items() if f" {code}" in message), None)
            raise DeployError(f"{self.d.node}: download of {w.path.rsplit('/', 1)[-1]} failed: {message}", hint)
        self._verify_and_place(w.path + ".part", w.path, w.sha256, w.size)

    def _check_curl(self) -> None:
        """Refuse a curl that forwards a custom Authorization header across redirects.

        curl follows redirects with --location; since 7.58.0 (CVE-2018-1000007) it sends a custom
        Authorization header to the first host name only, and since 7.83.0 (CVE-2022-27776) not
        when the scheme or port changes either (an https hub's pull forbids redirects to http:
        ops.curl_pull); --location-trusted, never used here, would send it everywhere."""
        r = self.run(ops.curl_version())
        found = ops.parse_curl_version(r.out) if r.ok else None
        if found is None or found < ops.CURL_SAFE_REDIRECTS:
            have = ".".join(map(str, found)) if found else "an unknown version"
            need = ".".join(map(str, ops.CURL_SAFE_REDIRECTS))
            raise DeployError(f"{self.d.node}: curl is {have}; before {need} it sends the hub token on to the "
                              "host a redirect points at", hint=f"upgrade curl on the node to {need} or later, "
                              "or copy the model to the controller and use a file:// source")

    def _build(self, s: Step) -> None:
        b: LlamaBuild = next(b for b, _ in self.d.builds if b.bindir == s.target)
        r = self.run(ops.build(b))
        if not r.ok:
            self.result.log_tail = r.err.strip()
            raise DeployError(f"{self.d.node}: building llama.cpp ({', '.join(b.targets)}, {b.label}) failed: "
                              f"{BUILD_FAILURES.get(r.rc, f'exit {r.rc}')}; logs in {b.workdir}",
                              hint="see the last lines above; fix the flags (cluster.engines.llama_cpp_build."
                              "cmake_flags) or the node's toolchain and deploy again: finished work is kept")
        for _, name, sha, size in (line.split() for line in r.out.splitlines() if line.startswith("INSTALLED ")):
            self._record(b.binary(name), {"sha256": sha, "size": int(size), "build": b.key})

    def _install(self, s: Step) -> None:
        self.install(next(v for v in self.d.venvs if v.link == s.target))

    def install(self, v: VenvInstall) -> None:
        """Install a pip engine into its venv and switch the services' link to it."""
        r = self.run(ops.install(v))
        if not r.ok:
            self.result.log_tail = r.err.strip()
            exe = v.binary.rsplit("/", 1)[-1]
            what = {3: f"{v.python} could not create a venv (Debian/Ubuntu: apt install python3-venv)",
                    4: f"pip could not install {v.requirement}",
                    5: f"{v.requirement} has no {exe} executable",
                    6: f"{v.link} exists and is not a symlink clusterctl made; move it away",
                    7: f"{v.requirement} is another project of the same name: its {exe} "
                       f"{r.err.strip().removeprefix(exe + ' ')}, {v.engine}'s runs {v.entry_point}",
                    }.get(r.rc, f"exit {r.rc}")
            raise DeployError(f"{self.d.node}: installing {v.engine} failed: {what}",
                              hint="the previous installation, if any, is untouched and still in use")
        self._record(v.link, {"venv": v.key, "requirement": v.requirement})

    @contextlib.contextmanager
    def _watch_size(self, part: str, label: str, total: int) -> Iterator[None]:
        """While a node-side download runs: report the size of its file every PULL_POLL seconds
        (a second session on the same connection), for the progress bars."""
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(PULL_POLL):
                try:
                    size = self._size(part)
                except TransportError:
                    return
                if size >= 0:
                    self.reporter.progress(self.d.node, label, size, total)

        watcher = threading.Thread(target=watch, name=f"watch {self.d.node} {label}", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()

    def _size(self, path: str) -> int:
        r = self.run(ops.size_of(path))
        words = r.out.split()
        return int(words[0]) if r.ok and words and words[0].isdigit() else -1

    def _sha(self, path: str) -> str:
        r = self.run(ops.sha256(path))
        return parse_sha256sum(r.out).get(path, "") if r.ok else ""

    def _verify_and_place(self, part: str, path: str, sha: str | None, size: int) -> None:
        actual = self._size(part)
        if size and actual != size:
            self.run(ops.remove(part))
            raise DeployError(f"{self.d.node}: {path} has {actual} bytes, {size} were expected; the partial file "
                              "was removed", hint="run deploy again; if it persists, run clusterctl resolve")
        got = self._sha(part)
        if sha is not None and got != sha:
            self.run(ops.remove(part))
            raise DeployError(f"{self.d.node}: {path} failed verification (sha256 {got[:16]}..., "
                              f"expected {sha[:16]}...); the partial file was removed",
                              hint="run deploy again to fetch it anew; the previous file is untouched")
        self.run(ops.move(part, path))
        self._record(path, {"sha256": got, "size": actual})

    def _verify_in_place(self, s: Step) -> None:
        w = ops.fetched(self.d, s.target)
        got = self._sha(w.path)
        if w.sha256 is not None and got != w.sha256:
            raise DeployError(f"{self.d.node}: {w.path} is corrupt (sha256 {got[:16]}...)",
                              hint="delete it and deploy again")
        self._record(w.path, {"sha256": got, "size": w.size})

    def _record(self, path: str, entry: dict[str, object]) -> None:
        """Set `path`'s entry in the node's manifest (what deploy verified or installed there)."""
        put = ops.manifest_put(self.d.base)
        manifest = parse_manifest(self.t.get(put.path))
        manifest[path] = entry
        self.t.put(put.path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode(), mode=put.mode)

    # -- files and services --------------------------------------------------------------------
    def apply(self, steps: list[Step]) -> None:
        for s in steps:
            if s.kind in ("restart", "start") and s.service in self.specs:
                checks.check_workers(self.inv, self.t, self.d, self.specs[s.service])
        for s in (s for s in steps if s.kind in ("upload", "secret")):
            self.reporter.step(self.d.node, s, "start")
            if s.target not in self.backups:
                self.backups[s.target] = self.t.get(s.target)
            (put,) = ops.step_ops(s, self.d, self.node, self.mgr)
            assert isinstance(put, ops.Put)
            data = next(x.data for x in self.d.secrets if x.path == s.target) if s.kind == "secret" else \
                next(f.content.encode() for f in self.d.files if f.path == s.target)
            assert data is not None  # only a dry run leaves a secret unread, and it runs no executor
            self.t.put(put.path, data, mode=put.mode)
            self.result.done.append(s)
            self.reporter.step(self.d.node, s, "done")
        for s in steps:
            if s.kind == "remove":
                self._remove(s)
        for s in steps:
            if s.kind == "daemon-reload":
                self.control([ops.control(c) for c in self.mgr.reload()])
                self.result.done.append(s)
        for s in steps:
            if s.kind in ("restart", "start"):
                self.reporter.step(self.d.node, s, "start")
                assert s.service is not None
                error = self._restart_and_wait(s.service)
                if error is not None:
                    self._rollback(s.service, error)
                    return
                self.result.done.append(s)
                self.reporter.step(self.d.node, s, "done")

    def _remove(self, s: Step) -> None:
        """Stop, disable and delete an orphan (`deploy --prune`); a failure stops this node."""
        self.reporter.step(self.d.node, s, "start")
        runs = [op for op in ops.step_ops(s, self.d, self.node, self.mgr) if isinstance(op, ops.Run)]
        ok, err = self.control(runs)
        if not ok:
            raise DeployError(f"{self.d.node}: removing {s.target} failed: {err or 'a command failed'}",
                              hint=f"see `{self.mgr.look(self.node, s.target)}` on the node; deploy --prune "
                              "tries again; nothing else of it was touched after the failing command")
        self.result.done.append(s)
        self.reporter.step(self.d.node, s, "done")

    def _restart_and_wait(self, service: str) -> str | None:
        ok, err = self.control([ops.control(c) for c in self.mgr.restart(self.node, service)])
        if not ok:
            return f"{service} did not start: {err}"
        return checks.wait_healthy(self.t, self.mgr, self.node, self.specs[service])

    def _rollback(self, service: str, error: str) -> None:
        self.result.log_tail = checks.logs(self.t, self.mgr, self.node, service)
        touched = [p for p in self.backups if self._owner(p) == service]
        for path in touched:
            old = self.backups[path]
            if old is None:
                self.run(ops.remove(path))
            else:
                mode = 0o600 if any(s.path == path for s in self.d.secrets) else next(
                    (f.mode for f in self.d.files if f.path == path), 0o644)
                self.t.put(path, old, mode=mode)
            self.result.rolled_back.append(path)
        self.control([ops.control(c) for c in self.mgr.reload()])
        if any(self.backups[p] is not None for p in touched):
            back = self._restart_and_wait(service)
            restored = (" ; the previous version is serving again" if back is None
                        else f"; the previous version did not come back either ({back}): restore it by hand "
                        f"({self.mgr.look(self.node, service)})")
        else:
            self.control([ops.control(c) for c in self.mgr.stop(self.node, service)])
            restored = "; it was new, so it was stopped and its files removed"
        self.result.failed = f"{error}{restored}"

    def _owner(self, path: str) -> str | None:
        for f in self.d.files:
            if f.path == path:
                return f.restarts[0] if f.restarts else None
        for s in self.result.steps:
            if s.target == path:
                return s.service
        return None
