"""A scripted fake node: a Transport whose file system is a dict and whose commands are
answered from that state, in the output formats of the real tools (ss, stat, openssl dgst -r,
wc -c, df -Pk, systemctl show / is-active, launchctl print / bootstrap / bootout, curl -w,
the control scripts' status line, the packaged scripts' exit codes and INSTALLED lines, the
probe's listing of installed unit files / plists / control scripts, the files rm deletes).

It stands in for the nodes where deploy's logic is under test (executor, rollback, max-fail,
dry run, managers); the e2e tests prove the same paths on real systemd nodes. A command it
has no answer for exits 127 and is listed in `unknown`, so a test can insist on none.

    node = FakeNode("n1")                          systemd, Linux
    node.service("chat", port=8080)                a service deploy will start
    node.services["chat"].outcome = "crash"        ... that crashes on start
    node.urls["https://hub/x.gguf"] = b"..."       what curl downloads
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from clusterctl.deploy import shell
from clusterctl.transport import CommandResult, Progress

Outcome = Literal["ok", "crash", "unhealthy"]


@dataclass
class FakeService:
    name: str
    port: int
    bind: str = "127.0.0.1"
    health_path: str | None = "/health"  # None: only a TCP connect is answered
    process: str = "server"
    outcome: Outcome | Callable[[FakeNode], Outcome] = "ok"  # what a (re)start leads to
    state: str = "inactive"  # systemd's ActiveState word
    loaded: bool = False  # launchd: bootstrapped
    starts: int = 0
    pid: int = 0
    log: list[str] = field(default_factory=list)
    models: tuple[str, ...] | None = ()  # what GET /v1/models lists; None: an empty body (mlx-lm's quirk)
    answer: str = "The sea is wide and blue."  # the chat completion's content

    @property
    def running(self) -> bool:
        return self.state in ("active", "unhealthy")


@dataclass(frozen=True)
class Ran:
    argv: tuple[str, ...]
    stdin: bytes | None


class FakeNode:
    def __init__(self, name: str, *, manager: str = "systemd", os: str = "linux", base: str | None = None) -> None:
        self.host = name
        self.manager = manager
        self.os = os
        self.base = base or ("/usr/local/clusterctl" if os == "macos" else "/opt/clusterctl")
        self.files: dict[str, tuple[bytes, int]] = {}
        self.tools: set[str] = {"sh", "bash", "curl", "tar", "cmake", "g++", "make", "ninja", "python3"}
        self.tools.add({"systemd": "systemctl", "launchd": "launchctl"}.get(manager, "sh"))
        self.services: dict[str, FakeService] = {}
        self.foreign: list[tuple[str, int, str]] = []  # listeners deploy did not start
        self.urls: dict[str, bytes | int] = {}  # what curl gets: content, or an HTTP error status
        self.curl_version = "7.88.1"  # what `curl --version` says
        self.gpus: list[tuple[str, int]] = []  # (name, MiB)
        self.memory_kb = 16 * 2**20
        self.disk_free = 100 * 2**30
        self.build_rc = 0
        self.venv_rc = 0
        self.corrupt_pushes = False  # the copy arrives with one byte changed
        self.ran: list[Ran] = []
        self.unknown: list[tuple[str, ...]] = []
        self.writes: list[str] = []  # paths written by put / push / mv / rm
        self.removed: list[str] = []  # paths deleted by rm
        self.disabled: list[str] = []  # systemd units disabled
        self.read_only: set[str] = set()  # paths rm may not delete (a removal that fails)
        self.reloads = 0
        self.loaded: dict[str, bytes | None] = {}  # systemd: unit files as of the last daemon-reload
        self.stale_starts: list[str] = []  # units (re)started while their file changed since the last reload
        self.closed = False
        self.unfirewalled: list[tuple[str, ...]] = []  # (table, chain) of each firewall rule removed
        self._pids = 4000

    # -- set-up ------------------------------------------------------------------------------
    def service(self, name: str, port: int, **kwargs: object) -> FakeService:
        svc = FakeService(name, port, **kwargs)  # type: ignore[arg-type]
        self.services[name] = svc
        return svc

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.files[path] = (data, mode)

    def commands(self) -> list[str]:
        """Every command run, as shell text; packaged scripts by name."""
        out = []
        for r in self.ran:
            name = r.argv[3] if len(r.argv) > 3 and r.argv[1] == "-c" and r.argv[3].startswith("clusterctl-") else None
            out.append(f"{name.removeprefix('clusterctl-')}.sh " + shlex.join(r.argv[4:]) if name
                       else shlex.join(r.argv))
        return out

    # -- Transport ---------------------------------------------------------------------------
    def run(self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 120.0,
            sudo: bool = False, env: Mapping[str, str] | None = None) -> CommandResult:
        args = tuple(argv)
        self.ran.append(Ran(args, input))
        rc, out, err = self._answer(args, input)
        return CommandResult(args, rc, out.encode(), err.encode(), 0.0)

    def put(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        self.files[path] = (data, mode)
        self.writes.append(path)

    def push(self, local: str, remote: str, *, mode: int = 0o644, progress: Progress | None = None) -> int:
        data = Path(local).read_bytes()
        have = self.files.get(remote, (b"", mode))[0]
        start = len(have) if data.startswith(have) else 0
        sent = data[start:]
        if self.corrupt_pushes and data:
            data = bytes([data[0] ^ 1]) + data[1:]
        self.files[remote] = (data, mode)
        self.writes.append(remote)
        if progress is not None:
            progress(len(data), len(data))
        return len(sent)

    def get(self, path: str) -> bytes | None:
        entry = self.files.get(path)
        return entry[0] if entry is not None else None

    def close(self) -> None:
        self.closed = True

    # -- answers -----------------------------------------------------------------------------
    def _answer(self, a: tuple[str, ...], stdin: bytes | None) -> tuple[int, str, str]:
        if len(a) >= 4 and a[0] in ("sh", "bash") and a[1] == "-c" and a[3].startswith("clusterctl-"):
            name = a[3].removeprefix("clusterctl-")
            if a[2] != shell.text(name):
                return 2, "", f"{name}: not the packaged script"
            return getattr(self, "_script_" + name.replace("-", "_"))(list(a[4:]))
        if a[:2] == ("sh", "-c") and a[2].startswith("ss -ltnH 'sport = :"):
            port = int(a[2].split(":")[1].rstrip("'"))
            return 0, "".join(f"LISTEN 0 128 {h}:{p} 0.0.0.0:*\n" for h, p, _ in self._listeners() if p == port), ""
        if a[0] == "lsof" and self.os == "macos":
            port = int(a[2].removeprefix("-iTCP:"))
            rows = [f"{proc} 123 root 5u IPv4 0x1 0t0 TCP {h}:{p} (LISTEN)" for h, p, proc in self._listeners()
                    if p == port]
            head = "COMMAND PID USER FD TYPE DEVICE SIZE/OFF NODE NAME"
            return (0, "\n".join([head, *rows]) + "\n", "") if rows else (1, "", "")
        handler: Callable[[tuple[str, ...], bytes | None], tuple[int, str, str]] | None = {
            "mkdir": self._mkdir, "mv": self._mv, "rm": self._rm, "wc": self._wc, "curl": self._curl,
            "systemctl": self._systemctl, "journalctl": self._journalctl, "launchctl": self._launchctl,
            "tail": self._tail, "ps": self._ps,
        }.get(a[0])
        if handler is None and a[0].endswith("-ctl.sh"):
            handler = self._ctl
        if handler is None or (a[0] in ("systemctl", "journalctl") and self.manager != "systemd") \
                or (a[0] == "launchctl" and self.manager != "launchd"):
            self.unknown.append(a)
            return 127, "", f"{a[0]}: command not found"
        return handler(a, stdin)

    # file tools
    def _mkdir(self, a: tuple[str, ...], stdin: bytes | None) -> tuple[int, str, str]:
        return 0, "", ""

    def _mv(self, a: tuple[str, ...], stdin: bytes | None) -> tuple[int, str, str]:
        src, dst = a[-2], a[-1]
        if src not in self.files:
            return 1, "", f"mv: cannot stat '{src}': No such file or directory\n"
        self.files[dst] = self.files.pop(src)
        self.writes.append(dst)
        return 0, "", ""

    def _rm(self, a: tuple[str, ...], stdin: bytes | None) -> tuple[int, str, str]:
        """rm -f -- PATH...: like GNU rm, a path it cannot remove is reported and the rest go."""
        err = ""
        for path in a[a.index("--") + 1:]:
            if path in self.read_only:
                err += f"rm: cannot remove '{path}': Permission denied\n"
            elif self.files.pop(path, None) is not None:
                self.writes.append(path)
                self.removed.append(path)
        return (1 if err else 0), "", err

    def _wc(self, a: tuple[str, ...], stdin: bytes | None) -> tuple[int, str, str]:
        path = a[-1]
        if path not in self.files:
            return 1, "", f"wc: {path}: No such file or directory\n"
        return 0, f"{len(self.files[path][0])} {path}\n", ""

    def _tail(self, a: tuple[str, ...], stdin: bytes | None) -> tuple[int, str, str]:
        n, path = int(a[2]), a[3]
        svc = next((s for s in self.services.values() if path.endswith(f"/log/{s.name}.log")), None)
        if svc is None:
            return 1, "", f"tail: cannot open '{path}' for reading: No such file or directory\n"
        return 0, "".join(line + "\n" for line in svc.log[-n:]), ""

    def _ps(self, a: tuple[str, ...], stdin: bytes | None) -> tuple[int, str, str]:
        return 0, " 20480\n", ""

    # the packaged scripts
    def _sha(self, path: str) -> str:
        return hashlib.sha256(self.files[path][0]).hexdigest()

    def _script_sha256(self, args: list[str]) -> tuple[int, str, str]:
        out = ""
        for path in args:
            if path not in self.files:
                return 1, out, f"{path}: No such file or directory\n"
            out += f"{self._sha(path)} *{path}\n"
        return 0, out, ""

    def _script_tcp_probe(self, args: list[str]) -> tuple[int, str, str]:
        host, port = args[0], int(args[1])
        if any(p == port and h in (host, "0.0.0.0", "*") for h, p, _ in self._listeners()):
            return 0, "", ""
        return 1, "", f"clusterctl-tcp-probe: connect: Connection refused\nline 3: /dev/tcp/{host}/{port}: " \
            "Connection refused\n"

    def _script_build_llama(self, args: list[str]) -> tuple[int, str, str]:
        archive, work, _subdir, _jobs, bindir = args[:5]
        rest = args[5:]
        names = rest[:rest.index("--")]
        flags = rest[rest.index("--") + 1:]
        if archive not in self.files:
            return 1, "", f"tar: {archive}: Cannot open: No such file or directory\n"
        if self.build_rc:
            return self.build_rc, "", ("CMake Error at CMakeLists.txt:1 (project):\n"
                                       "  No CMAKE_CXX_COMPILER could be found.\n")
        out = ""
        for n in names:
            data = f"llama.cpp {n} {' '.join(flags)}".encode()
            self.files[f"{bindir}/{n}"] = (data, 0o755)
            self.writes.append(f"{bindir}/{n}")
            out += f"INSTALLED {n} {hashlib.sha256(data).hexdigest()} {len(data)}\n"
        self.files[f"{work}/build/CMakeCache.txt"] = (b"", 0o644)
        return 0, out, ""

    def _script_venv(self, args: list[str]) -> tuple[int, str, str]:
        _python, venv, link, req, _index, _links, exe = args[:7]
        if self.venv_rc:
            return self.venv_rc, "", f"ERROR: No matching distribution found for {req}\n"
        for path in (f"{venv}/bin/{exe}", f"{link}/bin/{exe}", f"{venv}/bin/python", f"{link}/bin/python"):
            self.files[path] = (f"#!{venv}/bin/python\n".encode(), 0o755)
            self.writes.append(path)
        return 0, "", ""

    def _script_unfirewall(self, args: list[str]) -> tuple[int, str, str]:
        self.unfirewalled.append(tuple(args))
        return 0, "", ""

    def _script_probe(self, args: list[str]) -> tuple[int, str, str]:
        _sha, marker, base, manager, unit_dir, prefix, suffix = args[:7]
        groups: list[list[str]] = [[]]
        for word in args[7:]:
            if word == "--" and len(groups) < 6:
                groups.append([])
            else:
                groups[-1].append(word)
        files, weights, dirs, handles, binaries, commands = groups + [[]] * (6 - len(groups))
        out: list[str] = []

        def section(name: str, *lines: str) -> None:
            out.append(marker + name)
            out.extend(lines)

        section("uname", "Darwin arm64" if self.os == "macos" else "Linux x86_64")
        section("memory", f"MemTotal:       {self.memory_kb} kB")
        section("nvidia", *(f"{n}, {mib}" for n, mib in self.gpus))
        section("stat", *self._stats(files))
        present = [f for f in files if f in self.files]
        section("sha", *(f"{self._sha(f)} *{f}" for f in present))
        section("wstat", *self._stats([p for w in weights for p in (w, w + ".part")]))
        for i, _ in enumerate(dirs):
            section(f"df{i}", "Filesystem     1024-blocks      Used Available Capacity Mounted on",
                    f"/dev/vda1        104857600  10485760 {self.disk_free // 1024:>9} 10% /")
        tool = {"systemd": "systemctl", "launchd": "launchctl"}.get(manager)
        if tool is None:
            section("manager", "direct")
        else:
            section("manager", *([f"/usr/bin/{tool}"] if tool in self.tools else []))
        section("states", *(self._state_word(h) for h in handles))
        section("installed", *sorted(name for d, _, name in (p.rpartition("/") for p in self.files)
                                     if unit_dir and d == unit_dir and name.startswith(prefix)
                                     and name.endswith(suffix) and len(name) > len(prefix) + len(suffix)))
        listeners = self._listeners()
        if self.os == "macos":
            section("listeners", "#lsof", *(f"{proc} 123 root 5u IPv4 0x1 0t0 TCP {h}:{p} (LISTEN)"
                                            for h, p, proc in listeners))
        else:
            # a pid per listener; the cgroup's unit for clusterctl's own services under systemd
            mine = {s.port: s.name for s in self.services.values() if s.running}
            units = [f"#unit {100 + i} clusterctl-{mine[p]}.service" for i, (_, p, _) in enumerate(listeners)
                     if p in mine and manager == "systemd"]
            section("listeners", *(f'LISTEN 0 128 {h}:{p} 0.0.0.0:* users:(("{proc}",pid={100 + i},fd=3))'
                                   for i, (h, p, proc) in enumerate(listeners)), *units)
        manifest = self.get(f"{base}/state/manifest.json")
        section("manifest", *([manifest.decode()] if manifest else []))
        section("found", *(b for b in binaries if self.files.get(b, (b"", 0))[1] & 0o111), "--",
                *(c for c in commands if c in self.tools or self.files.get(c, (b"", 0))[1] & 0o111))
        return 0, "\n".join(out) + "\n", ""

    def _stats(self, paths: list[str]) -> list[str]:
        return [f"{len(self.files[p][0])} {self.files[p][1]:o} {p}" for p in paths if p in self.files]

    def _listeners(self) -> list[tuple[str, int, str]]:
        mine = [(s.bind, s.port, s.process) for s in self.services.values() if s.running]
        return mine + self.foreign

    # services
    def _by_handle(self, handle: str) -> FakeService | None:
        m = re.match(r"^(?:system/)?(?:clusterctl-(.+)\.service|io\.clusterctl\.(.+)|.*/bin/(.+)-ctl\.sh)$", handle)
        name = next((g for g in m.groups() if g), None) if m else None
        return self.services.get(name) if name else None

    def _state_word(self, handle: str) -> str:
        svc = self._by_handle(handle)
        if svc is None:
            return "unknown" if self.manager == "launchd" else "inactive"
        if self.manager == "launchd":
            return "unknown" if not svc.loaded else ("active" if svc.running else "inactive")
        if self.manager == "direct":
            return "active" if svc.running else "inactive"
        return "active" if svc.running else svc.state

    def _start(self, svc: FakeService) -> None:
        outcome = svc.outcome(self) if callable(svc.outcome) else svc.outcome
        svc.starts += 1
        self._pids += 1
        if outcome == "crash":
            svc.state, svc.pid = "failed", 0
            svc.log.append(f"{svc.name}: error: failed to load model")
        else:
            svc.state, svc.pid = ("active" if outcome == "ok" else "unhealthy"), self._pids
            svc.log.append(f"{svc.name}: listening on {svc.bind}:{svc.port}")

    def _unit_file(self, svc: FakeService) -> str:
        return {"systemd": f"/etc/systemd/system/clusterctl-{svc.name}.service",
                "launchd": f"/Library/LaunchDaemons/io.clusterctl.{svc.name}.plist"}.get(
                    self.manager, f"{self.base}/bin/{svc.name}-ctl.sh")

    def _systemctl(self, a: tuple[str, ...], stdin: bytes | None) -> tuple[int, str, str]:
        verb = a[1]
        if verb == "daemon-reload":
            self.reloads += 1
            self.loaded = {p: d for p, (d, _) in self.files.items() if p.startswith("/etc/systemd/system/")}
            return 0, "", ""
        unit = a[-1]
        svc = self._by_handle(unit)
        if verb == "show":
            if svc is None:
                return 0, "ActiveState=inactive\nSubState=dead\nMainPID=0\nMemoryCurrent=[not set]\n", ""
            sub = {"active": "running", "unhealthy": "running", "failed": "failed"}.get(svc.state, "dead")
            active = "active" if svc.running else svc.state
            return 0, (f"MainPID={svc.pid}\nActiveState={active}\nSubState={sub}\n"
                       f"MemoryCurrent={123 * 2**20 if svc.running else '[not set]'}\n"), ""
        if verb == "is-active":
            word = self._state_word(unit)
            return (0 if word == "active" else 3), word + "\n", ""
        if verb == "stop" and svc is not None and svc.running:  # a loaded unit stops without its file
            svc.state, svc.pid = "inactive", 0
            return 0, "", ""
        if svc is None or self._unit_file(svc) not in self.files:
            return 5, "", f"Failed to {verb} {unit}: Unit {unit} not found.\n"
        if verb in ("enable", "reset-failed"):
            return 0, "", ""
        if verb == "disable":
            self.disabled.append(unit)
            return 0, "", ""
        if verb in ("restart", "start"):
            path = self._unit_file(svc)
            if path in self.loaded and self.loaded[path] != self.files[path][0]:
                self.stale_starts.append(unit)  # systemd would run the unit as it was at the last reload
            self._start(svc)
            return 0, "", ""
        if verb == "stop":
            svc.state, svc.pid = "inactive", 0
            return 0, "", ""
        self.unknown.append(a)
        return 1, "", f"Unknown command verb {verb}.\n"

    def _journalctl(self, a: tuple[str, ...], stdin: bytes | None) -> tuple[int, str, str]:
        svc = self._by_handle(a[a.index("-u") + 1])
        n = int(a[a.index("-n") + 1])
        lines = svc.log if svc else []
        if "-p" in a:  # errors only
            lines = [line for line in lines if "error" in line]
        return 0, "".join(line + "\n" for line in lines[-n:]), ""

    def _launchctl(self, a: tuple[str, ...], stdin: bytes | None) -> tuple[int, str, str]:
        verb = a[1]
        if verb == "bootstrap":
            svc = self._by_handle(a[3].rsplit("/", 1)[-1].removesuffix(".plist"))
            if svc is None or a[3] not in self.files:
                return 5, "", "Bootstrap failed: 5: Input/output error\n"
            if svc.loaded:
                return 5, "", "Bootstrap failed: 5: Input/output error\n"  # already loaded: bootout first
            svc.loaded = True
            self._start(svc)  # RunAtLoad
            return 0, "", ""
        svc = self._by_handle(a[2])
        if verb == "bootout":
            if svc is None or not svc.loaded:
                return 3, "", "Boot-out failed: 3: No such process\n"
            svc.loaded, svc.state, svc.pid = False, "inactive", 0
            return 0, "", ""
        if svc is None or not svc.loaded:
            return 113, "", f'Could not find service "{a[2].split("/", 1)[-1]}" in domain for system\n'
        if verb == "kickstart":
            if not svc.running:
                self._start(svc)
            return 0, "", ""
        if verb == "print":
            state = "running" if svc.running else "not running"
            pid = f"\tpid = {svc.pid}\n" if svc.running else ""
            return 0, (f"{a[2]} = {{\n\tactive count = {int(svc.running)}\n\tpath = {self._unit_file(svc)}\n"
                       f"\ttype = LaunchDaemon\n\tstate = {state}\n\n\tprogram = /bin/bash\n{pid}"
                       "\tlast exit code = 0\n}\n"), ""
        self.unknown.append(a)
        return 64, "", f"Unrecognized subcommand: {verb}\n"

    def _ctl(self, a: tuple[str, ...], stdin: bytes | None) -> tuple[int, str, str]:
        if a[0] not in self.files:
            return 127, "", f"bash: {a[0]}: No such file or directory\n"
        svc = self._by_handle(a[0])
        assert svc is not None, a
        verb = a[1]
        if verb == "status":
            if svc.running:
                return 0, f"{svc.name}: running (pid {svc.pid})\n", ""
            return 3, f"{svc.name}: stopped\n", ""
        if verb in ("stop", "restart"):
            svc.state, svc.pid = "inactive", 0
        if verb in ("start", "restart"):
            self._start(svc)
            return 0, f"{svc.name}: started (pid {svc.pid})\n", ""
        return 0, f"{svc.name}: stopped\n", ""

    def _curl(self, a: tuple[str, ...], stdin: bytes | None) -> tuple[int, str, str]:
        if a[1:] == ("--version",):
            return 0, f"curl {self.curl_version} (x86_64-pc-linux-gnu) libcurl/{self.curl_version}\n", ""
        url = a[-1]
        if "--output" in a:  # a download
            part = a[a.index("--output") + 1]
            body = self.urls.get(url)
            if body is None or isinstance(body, int):
                code = body or 404
                return 22, "", f"curl: (22) The requested URL returned error: {code}\n"
            have = self.files.get(part, (b"", 0o644))[0]
            data = have + body[len(have):] if body.startswith(have) else body
            self.files[part] = (data, 0o644)
            self.writes.append(part)
            return 0, "", ""
        m = re.match(r"^http://([^/:]+):(\d+)(/.*)$", url)
        assert m, url
        port, path = int(m.group(2)), m.group(3)
        svc = next((s for s in self.services.values() if s.port == port and s.running), None)
        if "-w" in a:  # a health probe: the status code only
            if svc is None:
                return 7, "000", "curl: (7) Failed to connect: Connection refused\n"
            code = 200 if svc.state == "active" and path == svc.health_path else (503 if svc.health_path else 404)
            return 0, str(code), ""
        if svc is None:  # verify's requests (curl -i)
            return 7, "", "curl: (7) Failed to connect: Connection refused\n"
        status, payload = self._http(svc, path, a)
        return 0, f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n\r\n{payload}", ""

    def _http(self, svc: FakeService, path: str, a: tuple[str, ...]) -> tuple[int, str]:
        if path == "/v1/models" and svc.state == "active":
            listing = json.dumps({"object": "list", "data": [{"id": m} for m in svc.models or ()]})
            return 200, "" if svc.models is None else listing
        if path == svc.health_path:
            return (200, '{"status":"ok"}') if svc.state == "active" else (503, '{"status":"loading"}')
        if path == "/v1/chat/completions":
            return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": svc.answer}}],
                                    "usage": {"completion_tokens": 8},
                                    "timings": {"predicted_per_second": 42.0, "prompt_ms": 12.0}})
        return 404, '{"error":"not found"}'
