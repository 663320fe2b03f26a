"""The data deploy works on: what a node should hold (Desired), what it holds (NodeFacts) and
the steps between them. Plain data, no behaviour beyond small derived values."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

from clusterctl.engines.install import LlamaBuild, VenvInstall
from clusterctl.render import RenderedFile

Phase = Literal["acquire", "router", "services", "verify"]
Kind = Literal["push-weight", "pull-weight", "verify-weight", "push-engine", "push-source", "pull-source",
               "verify-source", "build-engine", "install-engine", "upload", "secret", "daemon-reload", "restart",
               "start", "remove"]
FETCH_KINDS = ("push-weight", "pull-weight", "push-source", "pull-source")
PHASES: tuple[Phase, ...] = ("acquire", "router", "services", "verify")
ROUTER = "router"
MANIFEST = "state/manifest.json"  # under the node's base dir: verified weights and engines


@dataclass(frozen=True)
class WeightFile:
    path: str  # final path on the node
    size: int
    sha256: str | None  # expected; None = trust the size (no hash known)
    local: str | None = None  # controller-side file to push
    url: str | None = None  # URL the node pulls from
    what: Literal["weight", "source"] = "weight"
    hub: bool = False  # from the Hugging Face hub: the node sends the hub token (to no other host)


@dataclass(frozen=True)
class EngineFile:
    path: str
    local: str
    sha256: str
    size: int


@dataclass(frozen=True)
class SecretValue:
    path: str
    ref: str  # env:NAME / file:PATH, shown instead of the value
    data: bytes | None = field(repr=False)  # None: not read (a dry run never reads secrets)

    @property
    def sha256(self) -> str | None:
        return hashlib.sha256(self.data).hexdigest() if self.data is not None else None


@dataclass
class Desired:
    node: str
    base: str
    manager: str  # systemd, launchd, direct
    files: list[RenderedFile] = field(default_factory=list)
    secrets: list[SecretValue] = field(default_factory=list)
    weights: list[WeightFile] = field(default_factory=list)
    engines: list[EngineFile] = field(default_factory=list)
    services: list[str] = field(default_factory=list)  # in start order (rpc workers first)
    units: dict[str, str] = field(default_factory=dict)  # service -> the manager's handle (unit, label, script)
    unit_files: set[str] = field(default_factory=set)  # the files that define services to the manager
    binaries: dict[str, str] = field(default_factory=dict)  # executable the services need -> what provides it
    users: dict[str, list[str]] = field(default_factory=dict)  # executable -> the services that run it
    builds: list[tuple[LlamaBuild, WeightFile]] = field(default_factory=list)  # with the source archive
    venvs: list[VenvInstall] = field(default_factory=list)
    commands: dict[str, list[str]] = field(default_factory=dict)  # step kind -> commands it runs ("a|b": either)
    pythons: dict[str, tuple[int, int]] = field(default_factory=dict)  # interpreter -> the oldest version it may be

    @property
    def systemd(self) -> bool:
        return self.manager == "systemd"

    def all_paths(self) -> list[str]:
        return [f.path for f in self.files] + [s.path for s in self.secrets] + [e.path for e in self.engines]


@dataclass(frozen=True)
class Step:
    phase: Phase
    node: str
    kind: Kind
    target: str  # a path or a service
    reason: str
    bytes: int = 0
    service: str | None = None
    sensitive: bool = False
    commands: tuple[str, ...] = ()  # what it runs on the node, shell-quoted (secrets travel on stdin)

    def describe(self) -> str:
        size = f" ({self.bytes / 1e9:.2f} GB)" if self.bytes >= 10**8 else ""
        return f"{self.kind} {self.target}{size}: {self.reason}"


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: int  # bytes


@dataclass
class NodeFacts:
    node: str
    os: str = ""
    arch: str = ""
    gpus: list[Gpu] = field(default_factory=list)
    memory_total: int = 0
    disk_free: dict[str, int] = field(default_factory=dict)  # path -> bytes available
    hashes: dict[str, str] = field(default_factory=dict)  # path -> sha256 of managed files present
    modes: dict[str, int] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)  # unit -> active/inactive/failed/...
    listeners: list[tuple[str, int, str]] = field(default_factory=list)  # (address, port, process)
    port_units: dict[tuple[str, int], str] = field(default_factory=dict)  # (address, port) -> listener's unit
    manifest: dict[str, dict[str, object]] = field(default_factory=dict)  # path -> {sha256, size}
    sizes: dict[str, int] = field(default_factory=dict)  # path -> size (weights, .part files)
    has_systemd: bool = False
    has_manager: bool = False  # the node's service manager answers (systemctl / launchctl on PATH)
    executables: set[str] = field(default_factory=set)  # of the binaries asked about, those present
    commands: set[str] = field(default_factory=set)  # of the commands asked about, those on PATH
    python_versions: dict[str, tuple[int, int]] = field(default_factory=dict)  # python* command -> (major, minor)
    installed: dict[str, str] = field(default_factory=dict)  # service -> its unit/plist/control script found
