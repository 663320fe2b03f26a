"""Deploy: make the nodes match the inventory, in phases acquire -> router -> services -> verify.

Facts are gathered per node, `changes.diff` turns them into steps, and only this module runs
steps (through a Transport). Nodes run in parallel (bounded); phases are barriers; a failed
node stops its own rollout and never another's in-flight work; results are kept per node.
A service whose new version does not become healthy gets its previous files back and is
restarted on them, and the failure is reported with its last log lines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fcntl
import hashlib
import json
import os
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from clusterctl import facts as facts_mod
from clusterctl.changes import (
    FETCH_KINDS,
    PHASES,
    Desired,
    EngineFile,
    Phase,
    SecretValue,
    Step,
    WeightFile,
    diff,
)
from clusterctl.engines import (
    BACKEND_TOOLS,
    LlamaBuild,
    VenvInstall,
    backends,
    llama_build,
    llama_targets,
    pip_engines,
    venv_install,
)
from clusterctl.errors import ClusterctlError, ExitCode, LockedError
from clusterctl.inventory import Inventory, Node, SecretRef
from clusterctl.launch import (
    LaunchSpec,
    base_dir,
    launch_specs,
    llama_bin,
    local_host,
    model_dir,
    rpc_endpoint,
    unit_name,
)
from clusterctl.lockfile import LockFile
from clusterctl.planner import Plan
from clusterctl.render import Rendered, RenderedFile
from clusterctl.secretref import read_secret
from clusterctl.transport import Transport, TransportError


class DeployError(ClusterctlError):
    exit_code = ExitCode.DEPLOY_FAILED


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
    log_tail: str = ""
    rolled_back: list[str] = field(default_factory=list)
    diffs: dict[str, str] = field(default_factory=dict)  # path -> unified diff (dry run)
    bytes_sent: int = 0

    @property
    def ok(self) -> bool:
        return self.failed is None


@dataclass
class DeployResult:
    nodes: dict[str, NodeResult]
    dry_run: bool
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.nodes.values())

    @property
    def changes(self) -> int:
        return sum(len(r.steps) for r in self.nodes.values())

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok, "dry_run": self.dry_run, "seconds": round(self.seconds, 3), "changes": self.changes,
            "nodes": {
                name: {
                    "ok": r.ok, "failed": r.failed, "log_tail": r.log_tail, "rolled_back": r.rolled_back,
                    "bytes_sent": r.bytes_sent,
                    "steps": [{"phase": s.phase, "kind": s.kind, "target": s.target, "reason": s.reason,
                               "bytes": s.bytes, "done": s in r.done, "sensitive": s.sensitive}
                              for s in r.steps],
                    "diffs": r.diffs,
                } for name, r in sorted(self.nodes.items())
            },
        }


# -- the cluster lock ------------------------------------------------------------------------

@contextlib.contextmanager
def cluster_lock(inventory_path: Path) -> Iterator[dict[str, object]]:
    """One deploy per inventory at a time (an flock the kernel releases if we die).
    Yields what the previous holder left when it did not finish (a stale record)."""
    path = inventory_path.with_name(f".{inventory_path.stem}.deploy.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_fd(fd)
            raise LockedError(
                f"another deploy of {inventory_path.name} is running: pid {holder.get('pid')} on "
                f"{holder.get('host')}, started {holder.get('started')}",
                hint="wait for it to finish; the lock is released when it exits") from None
        stale = _read_fd(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode(), 0)
        os.fsync(fd)
        yield stale
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def _read_fd(fd: int) -> dict[str, object]:
    try:
        data = os.pread(fd, 4096, 0)
        value = json.loads(data) if data else {}
        return value if isinstance(value, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


# -- desired state ---------------------------------------------------------------------------

def _secret_value(ref: str) -> bytes:
    kind, _, name = ref.partition(":")
    value = read_secret(SecretRef(env=name) if kind == "env" else SecretRef(file=name))
    if value is None:
        where = f"environment variable {name}" if kind == "env" else f"file {name}"
        raise DeployError(f"secret {ref} is not set", hint=f"set the {where} on the controller")
    return (value + "\n").encode()


def _hash_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "clusterctl" / "file-hashes.json"


def file_sha256(path: str) -> str:
    """sha256 of a controller file, remembered by (path, size, mtime) across runs: a 100 GB
    model is hashed once, not on every deploy."""
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
    cache_path = _hash_cache_path()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    if key in cache:
        return str(cache[key])
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(4 << 20), b""):
            h.update(chunk)
    cache[key] = h.hexdigest()
    with contextlib.suppress(OSError):
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache, sort_keys=True))
        os.replace(tmp, cache_path)
    return str(cache[key])


def build_desired(inv: Inventory, lock: LockFile, rendered: Rendered, plan: Plan | None = None
                  ) -> dict[str, Desired]:
    specs = launch_specs(inv, plan)
    out: dict[str, Desired] = {}
    for name, node in inv.nodes.items():
        out[name] = Desired(node=name, base=base_dir(node), systemd=node.manager == "systemd")
    for f in rendered.files:
        out[f.node].files.append(f)
    values: dict[str, bytes] = {}
    for node_name, secret in rendered.secrets:
        if secret.ref not in values:
            values[secret.ref] = _secret_value(secret.ref)
        out[node_name].secrets.append(SecretValue(secret.path, secret.ref, values[secret.ref]))
    order = [s.service for s in specs]
    for spec in specs:
        d = out[spec.node]
        if spec.service not in d.services:
            d.services.append(spec.service)
            d.units[spec.service] = _unit_or_ctl(inv, spec.node, spec.service)
    if inv.router is not None:
        d = out[inv.router.node]
        d.services.append("router")
        d.units["router"] = _unit_or_ctl(inv, inv.router.node, "router")
    for spec in specs:
        svc = inv.services[spec.service]
        node = inv.nodes[spec.node]
        d = out[spec.node]
        if svc.model is not None:
            _add_weights(inv, lock, d, node, svc.model)
        if svc.engine in ("llama-server", "rpc-server") and svc.binary is None and inv.cluster.engines.llama_cpp:
            _add_llama_engine(inv, d, node)
    _add_builds(inv, out)
    for node_name, engines in pip_engines(inv).items():
        for engine, python_engine in engines:
            install = venv_install(inv.nodes[node_name], engine, python_engine)
            out[node_name].venvs.append(install)
            out[node_name].commands.setdefault("install-engine", []).append(install.python)
    for spec in specs:
        provider = {"llama-server": "llama.cpp", "rpc-server": "llama.cpp", "vllm": "a vLLM venv",
                    "ollama": "Ollama", "mlx-lm": "an mlx-lm venv", "exo": "an exo venv",
                    "custom": "the custom command"}[spec.engine]
        program = spec.container[0] if spec.container else spec.argv[0]
        if program.startswith("/"):
            out[spec.node].binaries[program] = f"{spec.container[0].rsplit('/', 1)[-1]} for {spec.service}" \
                if spec.container else f"{provider} for {spec.service}"
            out[spec.node].users.setdefault(program, []).append(spec.service)
    for d in out.values():
        d.services.sort(key=lambda s: order.index(s) if s in order else len(order))
    return out


def _unit_or_ctl(inv: Inventory, node: str, service: str) -> str:
    """What tells whether a service runs: its systemd unit, or its direct-control script."""
    n = inv.nodes[node]
    if n.manager == "systemd":
        return f"{unit_name(service)}.service"
    if n.manager == "direct":
        return f"{base_dir(n)}/bin/{service}-ctl.sh"
    return ""


def _add_weights(inv: Inventory, lock: LockFile, d: Desired, node: Node, model_name: str) -> None:
    from clusterctl.models.remote import parse_source, source_url

    model = inv.models[model_name]
    entry = lock.models.get(model_name)
    meta = entry.meta if entry and entry.source == model.source else None
    src = parse_source(model.source)
    if entry is not None and meta is not None and entry.revision and src.scheme == "hf":
        src = dataclasses.replace(src, revision=entry.revision)  # the revision the plan was made from
    names = model.files or (meta.files if meta and meta.files else [src.filename])
    total = (meta.file_bytes if meta else 0) or model.size or 0
    folder = model_dir(inv, node, model_name)
    existing = {w.path for w in d.weights}
    for fname in names:
        path = f"{folder}/{fname.rsplit('/', 1)[-1]}"
        if path in existing:
            continue
        if src.scheme == "file":
            base = src.path if len(names) == 1 else f"{src.path.rsplit('/', 1)[0]}/{fname}"
            size = os.stat(base).st_size if os.path.exists(base) else 0
            sha = model.sha256 if len(names) == 1 and model.sha256 else (file_sha256(base) if size else None)
            d.weights.append(WeightFile(path, size, sha, local=base))
        else:
            sub = src.with_path(f"{src.path.rsplit('/', 1)[0]}/{fname}" if "/" in src.path else fname)
            size = total if len(names) == 1 else 0
            sha = model.sha256 if len(names) == 1 else None
            d.weights.append(WeightFile(path, size or (model.size or 0), sha,
                                        url=source_url(sub, endpoint=inv.cluster.huggingface.endpoint),
                                        hub=src.scheme == "hf"))


def _add_builds(inv: Inventory, out: dict[str, Desired]) -> None:
    """llama.cpp built on each node whose llama-server / rpc-server services use the default binary."""
    build = inv.cluster.engines.llama_cpp_build
    wanted = llama_targets(inv)
    if build is None or not wanted:
        return
    local = url = None
    size = 0
    sha = build.sha256
    if build.source.startswith("file://"):
        local = build.source.removeprefix("file://")
        if not os.path.isfile(local):
            raise DeployError(f"cluster.engines.llama_cpp_build.source: {local} does not exist on the controller",
                              hint="download the archive there, or give an https:// URL the nodes can reach")
        size = os.stat(local).st_size
        actual = file_sha256(local)
        if sha is not None and actual != sha:
            raise DeployError(f"cluster.engines.llama_cpp_build.source: {local} has sha256 {actual[:16]}..., "
                              f"the inventory pins {sha[:16]}...", hint="fetch the pinned archive again")
        sha = actual
    else:
        url = build.source
    assert sha is not None  # https sources are pinned by the inventory's validation
    for node_name, targets in wanted.items():
        b = llama_build(inv, node_name, targets, sha)
        assert b is not None
        d = out[node_name]
        d.builds.append((b, WeightFile(b.archive, size, sha, local=local, url=url, what="source")))
        node = inv.nodes[node_name]
        d.commands["build-engine"] = ["cmake", "c++|g++|clang++", "tar", "make|ninja"] + [
            f"{tool}|{'/usr/local/cuda/bin/nvcc' if tool == 'nvcc' else '/opt/rocm/bin/' + tool}"
            for k, tool in BACKEND_TOOLS.items() if k in backends(node)]
        if url is not None:
            d.commands["pull-source"] = ["curl"]


def _add_llama_engine(inv: Inventory, d: Desired, node: Node) -> None:
    folder = inv.cluster.engines.llama_cpp
    assert folder is not None
    folder = os.path.expanduser(folder)
    for target, candidates in (("llama-server", ["llama-server"]), ("rpc-server", ["rpc-server", "ggml-rpc-server"])):
        local = next((f"{folder}/{c}" for c in candidates if os.path.exists(f"{folder}/{c}")), None)
        if local is None:
            raise DeployError(f"cluster.engines.llama_cpp: no {' or '.join(candidates)} in {folder}",
                              hint="point it at a folder with the llama.cpp binaries built for the nodes")
        path = llama_bin(node, target)
        if all(e.path != path for e in d.engines):
            d.engines.append(EngineFile(path, local, file_sha256(local), os.stat(local).st_size))


# -- running steps ---------------------------------------------------------------------------

BUILD_TIMEOUT = 4 * 3600.0
PULL_POLL = 1.0  # seconds between size reports of a node-side download
HEALTH_POLL_FIRST = 0.1  # seconds before the second health probe of a restarted service, doubling
HEALTH_POLL_MAX = 1.0

# Builds llama.cpp on the node: $1 archive, $2 work folder (kept: extracted source and build
# tree, so a later build with more targets is incremental), $3 subdir ("" = find it), $4 jobs
# ("" = all cores), $5 bin folder, then the binaries to install, "--", the cmake flags.
# Each binary is installed atomically (temp file + rename) and printed as INSTALLED name sha size.
BUILD_SCRIPT = r"""set -euo pipefail
archive=$1 work=$2 subdir=$3 jobs=$4 bin=$5; shift 5
names=(); while [ "$1" != "--" ]; do names+=("$1"); shift; done; shift
[ -n "$jobs" ] || jobs=$(nproc 2>/dev/null || sysctl -n hw.ncpu)
mkdir -p "$work" "$bin"
if [ ! -f "$work/.extracted" ]; then
  rm -rf "$work/src"; mkdir "$work/src"
  tar -xf "$archive" -C "$work/src" --no-same-owner
  touch "$work/.extracted"
fi
src=""
if [ -n "$subdir" ]; then
  tops=("$work"/src/*/)
  if [ ${#tops[@]} = 1 ] && [ -d "${tops[0]}$subdir" ]; then src=${tops[0]}$subdir; else src=$work/src/$subdir; fi
else
  found=$(find "$work/src" -maxdepth 6 -path '*/ggml/CMakeLists.txt' -printf '%d %h\n' | sort -n | head -n 1)
  [ -z "$found" ] || src=${found#* }; src=${src%/ggml}
fi
if [ -z "$src" ] || [ ! -f "$src/CMakeLists.txt" ]; then
  echo "no llama.cpp source tree (a CMakeLists.txt next to ggml/) in $archive" >&2; exit 3
fi
gen=(); if command -v ninja >/dev/null 2>&1; then gen=(-G Ninja); fi
if [ ! -f "$work/build/CMakeCache.txt" ]; then
  rm -rf "$work/build"
  if ! cmake -S "$src" -B "$work/build" "${gen[@]}" "$@" >"$work/configure.log" 2>&1; then
    tail -n 30 "$work/configure.log" >&2; rm -rf "$work/build"; exit 4
  fi
fi
help=$(cmake --build "$work/build" --target help 2>/dev/null || true)
targets=()
for n in "${names[@]}"; do
  case $n in rpc-server) cands="ggml-rpc-server rpc-server";; *) cands=$n;; esac
  t=""
  for c in $cands; do if grep -Eq "(^|[ .])$c(:|\s|$)" <<<"$help"; then t=$c; break; fi; done
  if [ -z "$t" ]; then echo "this llama.cpp source has no target $cands" >&2; exit 5; fi
  targets+=("$t")
done
if ! cmake --build "$work/build" -j "$jobs" --target "${targets[@]}" >"$work/build.log" 2>&1; then
  tail -n 40 "$work/build.log" >&2; exit 6
fi
for i in "${!names[@]}"; do
  f=$(find "$work/build" -type f -name "${targets[$i]}" -perm -u+x | head -n 1)
  install -m 0755 "$f" "$bin/.${names[$i]}.part"
  mv -f "$bin/.${names[$i]}.part" "$bin/${names[$i]}"
  echo "INSTALLED ${names[$i]} $(sha256sum <"$bin/${names[$i]}" | cut -d' ' -f1) $(stat -c %s "$bin/${names[$i]}")"
done
"""

# Installs a pip engine into its own venv and switches the folder the services run from (a
# symlink) to it only once pip succeeded: $1 python, $2 venv, $3 link, $4 requirement,
# $5 index URL, $6 find-links, $7 the executable it must provide. The previous venv is kept
# (one back), older ones removed.
VENV_SCRIPT = r"""set -euo pipefail
python=$1 venv=$2 link=$3 req=$4 index=$5 links=$6 exe=$7
name=$(basename "$venv")
if [ -e "$link" ] && [ ! -L "$link" ]; then exit 6; fi
prev=$(readlink "$link" 2>/dev/null || true)
if [ "$prev" = "$name" ] && [ -x "$venv/bin/$exe" ]; then exit 0; fi
mkdir -p "$(dirname "$venv")"
rm -rf "$venv"
if ! "$python" -m venv "$venv" >"$venv.log" 2>&1; then tail -n 20 "$venv.log" >&2; rm -rf "$venv"; exit 3; fi
args=(--disable-pip-version-check --no-input)
if [ -n "$index" ]; then args+=(--index-url "$index"); elif [ -n "$links" ]; then args+=(--no-index); fi
if [ -n "$links" ]; then args+=(--find-links "$links"); fi
if ! "$venv/bin/python" -m pip install "${args[@]}" "$req" >>"$venv.log" 2>&1; then
  tail -n 30 "$venv.log" >&2; rm -rf "$venv"; exit 4
fi
if [ ! -x "$venv/bin/$exe" ]; then rm -rf "$venv"; exit 5; fi
ln -sfn "$name" "$link.new"
mv -fT "$link.new" "$link"
for old in "$link"-*/; do
  old=${old%/}
  case $(basename "$old") in "$name"|"$prev") ;; *) rm -rf "$old" "$old.log";; esac
done
"""

Connector = Callable[[str], Transport]


class _NodeRun:
    def __init__(self, inv: Inventory, desired: Desired, transport: Transport, reporter: Reporter,
                 specs: dict[str, LaunchSpec]) -> None:
        self.inv = inv
        self.d = desired
        self.t = transport
        self.reporter = reporter
        self.specs = specs
        self.result = NodeResult(desired.node)
        self.facts: facts_mod.NodeFacts | None = None
        self.backups: dict[str, bytes | None] = {}

    # facts and plan
    def gather(self) -> None:
        weights = [w.path for w in self.d.weights]
        units = [u for u in self.d.units.values() if u]
        weights += [archive.path for _, archive in self.d.builds]
        dirs = sorted({w.rsplit("/", 1)[0] for w in weights})
        commands = sorted({c for alts in self.d.commands.values() for alt in alts for c in alt.split("|")})
        self.facts = facts_mod.gather(self.t, base=self.d.base, files=self.d.all_paths(), units=units,
                                      weights=weights, dirs=dirs, systemd=self.d.systemd,
                                      binaries=list(self.d.binaries), commands=commands)
        self.result.steps = diff(self.d, self.facts)

    def drift(self) -> None:
        """Stop this node when it has less GPU memory than the inventory (and so the plan) assumes."""
        assert self.facts is not None
        problem = facts_mod.gpu_drift(self.inv.nodes[self.d.node], self.facts.gpus)
        if problem:
            raise DeployError(f"{self.d.node}: {problem}",
                              hint="fix the node's accelerators in the inventory and run clusterctl plan")

    def preflight(self) -> None:
        assert self.facts is not None
        self.drift()
        for step in self.result.steps:
            if step.kind not in ("restart", "start") or step.service not in self.specs:
                continue
            spec = self.specs[step.service]
            unit = self.d.units.get(step.service, "")
            running = self.facts.units.get(unit) == "active"
            taken = facts_mod.port_conflict(self.facts.listeners, spec.bind, spec.port)
            if taken is not None and not running:
                address, owner = taken
                raise DeployError(f"{self.d.node}: port {spec.port} is taken on {address} by another process "
                                  f"({owner or 'owner not visible'}); {step.service} would not start",
                                  hint="stop that process or give the service another port; "
                                  "clusterctl does not kill processes it did not start")
        pushed = {e.path for e in self.d.engines}
        pushed |= {b.binary(t) for b, _ in self.d.builds for t in b.targets}
        pushed |= {v.binary for v in self.d.venvs}
        missing = [b for b in sorted(self.d.binaries) if b not in self.facts.executables and b not in pushed]
        if missing:
            what = "; ".join(f"{b} ({self.d.binaries[b]})" for b in missing)
            raise DeployError(f"{self.d.node}: engine(s) missing: {what}",
                              hint="install them on the node, set the service's `binary`, or set "
                              "cluster.engines.llama_cpp to push a llama.cpp build")
        kinds = {s.kind for s in self.result.steps}
        for kind, alternatives in self.d.commands.items():
            absent = [alt.split("|")[0] for alt in dict.fromkeys(alternatives)
                      if not set(alt.split("|")) & self.facts.commands]
            if kind in kinds and absent:
                what = {"build-engine": "build llama.cpp", "pull-source": "download the llama.cpp source",
                        "install-engine": "create the engines' venvs"}[kind]
                raise DeployError(f"{self.d.node}: {', '.join(absent)} not found on the node; needed to {what}",
                                  hint="install it (Debian/Ubuntu: apt install cmake g++ make curl python3-venv; "
                                  "CUDA: the CUDA toolkit; ROCm: hipcc), or push a controller-side build with "
                                  "cluster.engines.llama_cpp")
        need: dict[str, int] = {}
        for s in self.result.steps:
            if s.kind in FETCH_KINDS:
                folder = s.target.rsplit("/", 1)[0]
                need[folder] = need.get(folder, 0) + s.bytes
        for folder, size in need.items():
            free = self.facts.disk_free.get(folder, 0)
            if free < size:
                raise DeployError(f"{self.d.node}: {folder} has {free / 1e9:.1f} GB free, "
                                  f"{size / 1e9:.1f} GB are needed",
                                  hint="free disk space or move models_dir; nothing was downloaded")

    def dry_run_diffs(self) -> None:
        for s in self.result.steps:
            if s.kind != "upload":
                continue
            f = self._file(s.target)
            old = self.t.get(s.target)
            old_text = old.decode(errors="replace") if old is not None else ""
            self.result.diffs[s.target] = "".join(difflib.unified_diff(
                old_text.splitlines(keepends=True), f.content.splitlines(keepends=True),
                f"a{s.target}", f"b{s.target}"))

    def _file(self, path: str) -> RenderedFile:
        return next(f for f in self.d.files if f.path == path)

    # phase runners
    def run_phase(self, phase: Phase, *, services_wave: str | None = None) -> None:
        steps = [s for s in self.result.steps if s.phase == phase]
        if phase == "services" and services_wave is not None:
            rpc = {n for n, spec in self.specs.items() if spec.engine == "rpc-server"}
            if services_wave == "workers":
                steps = [s for s in steps if s.service in rpc or s.kind == "daemon-reload"]
            else:
                steps = [s for s in steps if s not in self.result.done]
        if not steps:
            return
        if phase == "acquire":
            for s in steps:
                self._acquire(s)
            return
        self._apply(steps)

    def _acquire(self, s: Step) -> None:
        self.reporter.step(self.d.node, s, "start")
        if s.kind == "push-engine":
            e = next(e for e in self.d.engines if e.path == s.target)
            self._push(e.local, e.path, e.sha256, 0o755, e.size)
        elif s.kind == "build-engine":
            self._build(next(b for b, _ in self.d.builds if b.bindir == s.target))
        elif s.kind == "install-engine":
            self._install(next(v for v in self.d.venvs if v.link == s.target))
        elif s.kind in ("push-weight", "pull-weight", "verify-weight", "push-source", "pull-source", "verify-source"):
            files = self.d.weights + [archive for _, archive in self.d.builds]
            w = next(w for w in files if w.path == s.target)
            if s.kind in ("push-weight", "push-source"):
                assert w.local is not None
                self._push(w.local, w.path, w.sha256, 0o644, w.size)
            elif s.kind in ("pull-weight", "pull-source"):
                self._pull(w)
            else:
                self._verify_in_place(w)
        self.result.done.append(s)
        self.reporter.step(self.d.node, s, "done")

    def _push(self, local: str, path: str, sha: str | None, mode: int, size: int) -> None:
        part = path + ".part"
        self.t.run(["mkdir", "-p", "--", path.rsplit("/", 1)[0]], timeout=60)
        sent = self.t.push(local, part, mode=mode,
                           progress=lambda done, total: self.reporter.progress(self.d.node, path, done, total))
        self.result.bytes_sent += sent
        self._verify_and_place(part, path, sha, size)

    def _pull(self, w: WeightFile) -> None:
        assert w.url is not None
        part = w.path + ".part"
        token = read_secret(self.inv.cluster.huggingface.token) if w.hub else None
        header = f"Authorization: Bearer {token}\n".encode() if token else b""
        self.t.run(["mkdir", "-p", "--", w.path.rsplit("/", 1)[0]], timeout=60)
        argv = ["curl", "--fail", "--silent", "--show-error", "--location", "--retry", "5", "--retry-delay", "2",
                "--speed-limit", "1024", "--speed-time", "60", "--continue-at", "-", "--output", part,
                "--header", "@-", w.url]
        with self._watch_size(part, w.path, w.size):
            r = self.t.run(argv, input=header, timeout=24 * 3600)
        if not r.ok:
            message = r.err.strip().splitlines()[-1] if r.err.strip() else f"curl exit {r.rc}"
            hints = {"401": "the hub wants a token: set cluster.huggingface.token",
                     "403": "the token has no access to this repository (gated? accept its licence)",
                     "404": "the repository, revision or file does not exist"}
            hint = next((h for code, h in hints.items() if f" {code}" in message), None)
            raise DeployError(f"{self.d.node}: download of {w.path.rsplit('/', 1)[-1]} failed: {message}", hint)
        self._verify_and_place(part, w.path, w.sha256, w.size)

    def _build(self, b: LlamaBuild) -> None:
        jobs = str(b.jobs) if b.jobs else ""
        r = self.t.run(["bash", "-c", BUILD_SCRIPT, "clusterctl-build", b.archive, b.workdir, b.subdir or "", jobs,
                        b.bindir, *b.targets, "--", *b.flags], timeout=BUILD_TIMEOUT)
        if not r.ok:
            what = {3: "the archive holds no llama.cpp source tree", 4: "cmake could not configure the build",
                    5: "the source has no such target", 6: "the build failed"}.get(r.rc, f"exit {r.rc}")
            self.result.log_tail = r.err.strip()
            raise DeployError(f"{self.d.node}: building llama.cpp ({', '.join(b.targets)}, {b.label}) failed: "
                              f"{what}; logs in {b.workdir}",
                              hint="see the last lines above; fix the flags (cluster.engines.llama_cpp_build."
                              "cmake_flags) or the node's toolchain and deploy again: finished work is kept")
        installed = [line.split() for line in r.out.splitlines() if line.startswith("INSTALLED ")]
        for _, name, sha, size in installed:
            self._record(b.binary(name), sha, int(size), build=b.key)

    def _install(self, v: VenvInstall) -> None:
        exe = v.binary.rsplit("/", 1)[-1]
        r = self.t.run(["bash", "-c", VENV_SCRIPT, "clusterctl-venv", v.python, v.venv, v.link, v.requirement,
                        v.index_url or "", v.find_links or "", exe], timeout=BUILD_TIMEOUT)
        if not r.ok:
            self.result.log_tail = r.err.strip()
            what = {3: f"{v.python} could not create a venv (Debian/Ubuntu: apt install python3-venv)",
                    4: f"pip could not install {v.requirement}",
                    5: f"{v.requirement} has no {exe} executable",
                    6: f"{v.link} exists and is not a symlink clusterctl made; move it away"}.get(r.rc, f"exit {r.rc}")
            raise DeployError(f"{self.d.node}: installing {v.engine} failed: {what}",
                              hint="the previous installation, if any, is untouched and still in use")
        self._record_entry(v.link, {"venv": v.key, "requirement": v.requirement})

    @contextlib.contextmanager
    def _watch_size(self, part: str, label: str, total: int) -> Iterator[None]:
        """While a node-side download runs: report the size of its file every PULL_POLL seconds
        (a second session on the same connection), for the progress bars."""
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(PULL_POLL):
                try:
                    st = self.t.run(["stat", "-c", "%s", "--", part], timeout=30)
                except TransportError:
                    return
                if st.ok and st.out.strip().isdigit():
                    self.reporter.progress(self.d.node, label, int(st.out.strip()), total)

        watcher = threading.Thread(target=watch, name=f"watch {self.d.node} {label}", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()

    def _remote_sha(self, path: str) -> str:
        r = self.t.run(["sh", "-c", facts_mod.SHA256_SCRIPT, "sh", path], timeout=3600)
        return facts_mod.parse_sha256sum(r.out).get(path, "") if r.ok else ""

    def _verify_and_place(self, part: str, path: str, sha: str | None, size: int) -> None:
        stat = self.t.run(["stat", "-c", "%s", "--", part], timeout=60)
        actual = int(stat.out.strip()) if stat.ok and stat.out.strip().isdigit() else -1
        if size and actual != size:
            self.t.run(["rm", "-f", "--", part], timeout=60)
            raise DeployError(f"{self.d.node}: {path} has {actual} bytes, {size} were expected; the partial file "
                              "was removed", hint="run deploy again; if it persists, run clusterctl resolve")
        size = actual
        got = self._remote_sha(part)
        if sha is not None and got != sha:
            self.t.run(["rm", "-f", "--", part], timeout=60)
            raise DeployError(f"{self.d.node}: {path} failed verification (sha256 {got[:16]}..., "
                              f"expected {sha[:16]}...); the partial file was removed",
                              hint="run deploy again to fetch it anew; the previous file is untouched")
        self.t.run(["mv", "-f", "--", part, path], timeout=60)
        self._record(path, got, size)

    def _verify_in_place(self, w: WeightFile) -> None:
        got = self._remote_sha(w.path)
        if w.sha256 is not None and got != w.sha256:
            raise DeployError(f"{self.d.node}: {w.path} is corrupt (sha256 {got[:16]}...)",
                              hint="delete it and deploy again")
        self._record(w.path, got, w.size)

    def _record(self, path: str, sha: str, size: int, **extra: object) -> None:
        self._record_entry(path, {"sha256": sha, "size": size, **extra})

    def _record_entry(self, path: str, entry: dict[str, object]) -> None:
        """Set `path`'s entry in the node's manifest (what deploy verified or installed there)."""
        manifest_path = f"{self.d.base}/{facts_mod.MANIFEST}"
        manifest = facts_mod.parse_manifest(self.t.get(manifest_path))
        manifest[path] = entry
        self.t.put(manifest_path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode(), mode=0o644)

    def _apply(self, steps: list[Step]) -> None:
        # a head whose rpc workers are down is refused before any of its files change
        for s in steps:
            if s.kind in ("restart", "start") and s.service is not None:
                self._check_workers(s.service)
        uploads = [s for s in steps if s.kind in ("upload", "secret")]
        for s in uploads:
            self.reporter.step(self.d.node, s, "start")
            if s.target not in self.backups:
                self.backups[s.target] = self.t.get(s.target)
            if s.kind == "secret":
                secret = next(x for x in self.d.secrets if x.path == s.target)
                self.t.put(secret.path, secret.data, mode=0o600)
            else:
                f = self._file(s.target)
                self.t.put(f.path, f.content.encode(), mode=f.mode)
            self.result.done.append(s)
            self.reporter.step(self.d.node, s, "done")
        for s in steps:
            if s.kind == "daemon-reload":
                self._daemon_reload()
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

    def _daemon_reload(self) -> None:
        if self.d.systemd:
            self.t.run(["systemctl", "daemon-reload"], timeout=120)

    def _control(self, service: str, action: str) -> tuple[bool, str]:
        if self.d.systemd:
            unit = self.d.units[service]
            if action == "restart":
                self.t.run(["systemctl", "enable", "--", unit], timeout=60)
                self.t.run(["systemctl", "reset-failed", "--", unit], timeout=60)
            r = self.t.run(["systemctl", action, "--", unit], timeout=120)
            return r.ok, r.err
        ctl = f"{self.d.base}/bin/{service}-ctl.sh"
        r = self.t.run([ctl, action], timeout=120)
        return r.ok, r.err + r.out

    def _check_workers(self, service: str) -> None:
        spec = self.specs.get(service)
        if spec is not None and spec.remote_after:
            for worker in spec.remote_after:
                wsvc = self.inv.services[worker]
                host, port = rpc_endpoint(self.inv, worker)
                probe = self.t.run(["bash", "-c", f"exec 3<>/dev/tcp/{shlex.quote(host)}/{int(port)}"], timeout=15)
                if not probe.ok:
                    raise DeployError(f"{self.d.node}: {service} was not restarted: its rpc worker {worker} "
                                      f"({host}:{wsvc.default_port} on {wsvc.node_names[0]}) is not reachable",
                                      hint=f"start {worker} first (deploy {wsvc.node_names[0]}) and check the "
                                      "firewall between the nodes")

    def _restart_and_wait(self, service: str) -> str | None:
        ok, err = self._control(service, "restart")
        if not ok:
            return f"{service} did not start: {err.strip()}"
        return self._wait_healthy(service)

    def _wait_healthy(self, service: str) -> str | None:
        spec = self.specs.get(service)
        port = spec.port if spec else (self.inv.router.port if self.inv.router else 0)
        bind = spec.bind if spec else (self.inv.router.bind if self.inv.router else "127.0.0.1")
        health = spec.health_path if spec else "/health"
        timeout = spec.startup_timeout if spec else 60.0
        host = local_host(bind)
        deadline = time.monotonic() + timeout
        pause = HEALTH_POLL_FIRST
        while time.monotonic() < deadline:
            if health is None:
                probe = self.t.run(["bash", "-c", f"exec 3<>/dev/tcp/{shlex.quote(host)}/{int(port)}"], timeout=10)
                if probe.ok:
                    return None
            else:
                probe = self.t.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
                                    f"http://{host}:{port}{health}"], timeout=15)
                if probe.out.strip() == "200":
                    return None
            if not self._alive(service):
                return f"{service} exited during start-up"
            time.sleep(pause)
            pause = min(pause * 2, HEALTH_POLL_MAX)  # a small model answers within a second
        return f"{service} not healthy after {timeout:.0f} s"

    def _alive(self, service: str) -> bool:
        if self.d.systemd:
            r = self.t.run(["systemctl", "show", "-p", "ActiveState", "-p", "SubState", "--", self.d.units[service]],
                           timeout=30)
            props = dict(line.split("=", 1) for line in r.out.splitlines() if "=" in line)
            # a crashed unit waiting to be restarted is 'activating' too: its sub-state says so
            return props.get("ActiveState") in ("active", "activating", "reloading") and \
                props.get("SubState") not in ("auto-restart", "failed", "dead")
        ok, _ = self._control(service, "status")
        return ok

    def _logs(self, service: str) -> str:
        if self.d.systemd:
            r = self.t.run(["journalctl", "-u", self.d.units[service], "-n", "25", "--no-pager", "-o", "cat"],
                           timeout=60)
            return r.out
        r = self.t.run(["tail", "-n", "25", f"{self.d.base}/log/{service}.log"], timeout=30)
        return r.out

    def _rollback(self, service: str, error: str) -> None:
        self.result.log_tail = self._logs(service)
        touched = [p for p in self.backups if self._owner(p) == service]
        for path in touched:
            old = self.backups[path]
            if old is None:
                self.t.run(["rm", "-f", "--", path], timeout=60)
            else:
                mode = 0o600 if "/secrets/" in path else next(
                    (f.mode for f in self.d.files if f.path == path), 0o644)
                self.t.put(path, old, mode=mode)
            self.result.rolled_back.append(path)
        self._daemon_reload()
        restored = ""
        had_old = any(self.backups[p] is not None for p in touched)
        if had_old:
            ok, _ = self._control(service, "restart")
            back = self._wait_healthy(service) if ok else "did not start"
            restored = (" ; the previous version is serving again" if back is None
                        else f"; the previous version did not come back either ({back}): restore it by hand "
                        f"(systemctl status {self.d.units.get(service, service)})")
        else:
            self._control(service, "stop")
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


def deploy(inv: Inventory, lock: LockFile, rendered: Rendered, connect: Connector, *,
           nodes: list[str] | None = None, phases: tuple[Phase, ...] = PHASES, dry_run: bool = False,
           max_fail: int = 0, reporter: Reporter | None = None, plan: Plan | None = None) -> DeployResult:
    """Run the rollout. `max_fail`: how many failed nodes are tolerated before the remaining
    phases are skipped for everyone (in-flight work always finishes)."""
    reporter = reporter or NullReporter()
    started = time.monotonic()
    wanted = nodes or list(inv.nodes)
    desired = build_desired(inv, lock, rendered, plan)
    specs = {s.service: s for s in launch_specs(inv, plan)}
    runs: dict[str, _NodeRun] = {}
    results: dict[str, NodeResult] = {}
    transports: dict[str, Transport] = {}

    def prepare(name: str) -> None:
        try:
            t = connect(name)
            transports[name] = t
            node_specs = {k: v for k, v in specs.items() if v.node == name}
            run = _NodeRun(inv, desired[name], t, reporter, node_specs)
            runs[name] = run
            run.gather()
            run.result.steps = [s for s in run.result.steps if s.phase in phases]
            if dry_run:
                run.dry_run_diffs()
            else:
                run.preflight()
            results[name] = run.result
        except (TransportError, ClusterctlError) as exc:
            r = runs[name].result if name in runs else NodeResult(name)
            r.failed = str(exc) + (f" ({exc.hint})" if exc.hint else "")
            results[name] = r

    workers = max(1, min(inv.cluster.max_parallel, len(wanted)))
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(prepare, wanted))
            if not dry_run:
                for phase in phases:
                    if phase == "verify":
                        continue
                    failed = sum(1 for r in results.values() if not r.ok)
                    if failed > max_fail:
                        break
                    reporter.phase(phase)
                    waves: list[str | None] = ["workers", "rest"] if phase == "services" else [None]
                    for wave in waves:
                        live = [n for n in wanted if n in runs and results[n].ok]

                        def step(name: str, phase: Phase = phase, wave: str | None = wave) -> None:
                            try:
                                runs[name].run_phase(phase, services_wave=wave)
                            except (TransportError, ClusterctlError) as exc:
                                results[name].failed = str(exc) + (f" ({exc.hint})" if exc.hint else "")

                        list(pool.map(step, live))
    finally:
        for t in transports.values():
            with contextlib.suppress(Exception):
                t.close()
    return DeployResult(results, dry_run, time.monotonic() - started)
