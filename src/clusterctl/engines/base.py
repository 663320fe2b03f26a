"""What an engine is, once: the launch spec its adapter builds, and the adapter protocol.

An adapter answers every question a layer has about its engine: the argv, environment and
secrets of a service (`launch`), how its health is probed, whether `/v1/models` names the
service (identity), how it is installed on a node, and which memory model the planner uses.
Adapters are pure: they read the inventory and the planned contexts, nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from clusterctl.inventory import Inventory, Node, SecretRef, Service
from clusterctl.layout import node_name, secret_path

GPU_KINDS = ("cuda", "rocm", "vulkan", "metal")

Installer = Literal["llama.cpp", "venv", "none"]
MemoryModel = Literal["llama.cpp", "vllm", "mlx", "declared", "none"]


@dataclass(frozen=True)
class SecretFile:
    """A secret the launch script reads at start: from `path` (0600) into `env` (or just
    its path is passed to the engine when `env` is None)."""

    path: str
    env: str | None
    ref: str  # where deploy gets the value from: env:NAME or file:PATH on the controller


@dataclass(frozen=True)
class LaunchSpec:
    service: str
    node: str
    engine: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    # (VAR, ADDRESS): at start, VAR is set to the name of the node's interface that holds ADDRESS
    interface_env: tuple[tuple[str, str], ...] = ()
    secrets: tuple[SecretFile, ...] = ()
    after: tuple[str, ...] = ()  # services on the same node that must be started first
    remote_after: tuple[str, ...] = ()  # services on other nodes that must be up first (rpc workers)
    worker: bool = False  # started in the first wave, before the heads (rpc-server, vLLM's headless ranks)
    port: int = 0  # 0: listens on no port of its own (a headless worker: alive is healthy)
    bind: str = "127.0.0.1"
    health_path: str | None = "/health"  # None: the service is up when its port accepts a connection
    metrics_path: str | None = None
    gpu_kinds: tuple[str, ...] = ()  # device families the service must be allowed to open
    startup_timeout: float = 600.0
    container: tuple[str, ...] = ()  # the container runtime argv prefix when containerised
    container_name: str | None = None
    extra_files: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (path, content) e.g. Modelfile
    post_start: tuple[tuple[str, ...], ...] = ()  # commands run once the engine answers (e.g. ollama create)
    identity: bool = True  # GET /v1/models lists the service's `served_model`
    served_model: str = ""  # the model id the engine serves and expects in requests ("" = the service's name)
    chat: bool = True  # serves POST /v1/chat/completions
    firewall: tuple[str, ...] | None = None  # guarded: the port is accepted only from these (and loopback)

    @property
    def model_id(self) -> str:
        return self.served_model or self.service

    @property
    def command(self) -> tuple[str, ...]:
        return self.container + self.argv if self.container else self.argv


class PlannedService(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def context(self) -> int | None: ...


class PlannedContexts(Protocol):
    """What launch specs need of a plan (the planner's Plan satisfies it)."""

    @property
    def services(self) -> Sequence[PlannedService]: ...


@dataclass(frozen=True)
class LaunchContext:
    inv: Inventory
    plan: PlannedContexts | None

    def context(self, name: str, svc: Service) -> int | None:
        if svc.context is not None:
            return svc.context
        if self.plan is not None:
            for sp in self.plan.services:
                if sp.name == name:
                    return sp.context
        return None


class EngineAdapter(Protocol):
    name: str
    provider: str  # what puts its executable on a node, for messages ("a vLLM venv")
    installer: Installer
    executable: str | None  # the venv's console script (installer "venv")
    entry_point: str | None  # what that console script must run ("module:function"), or None: any
    memory_model: MemoryModel  # which estimator the planner runs
    default_health: str | None  # the health path of a service that does not set one

    def health_path(self, svc: Service) -> str | None: ...
    def served_model(self, inv: Inventory, name: str, svc: Service, node: Node) -> str: ...
    def launch(self, ctx: LaunchContext, name: str, svc: Service, node: Node) -> LaunchSpec: ...


class Adapter:
    """Defaults shared by the adapters; each engine module subclasses it."""

    name = ""
    provider = ""
    installer: Installer = "none"
    executable: str | None = None
    entry_point: str | None = None
    memory_model: MemoryModel = "none"
    default_health: str | None = "/health"
    identity = True
    chat = True

    def health_path(self, svc: Service) -> str | None:
        return self.default_health

    def served_model(self, inv: Inventory, name: str, svc: Service, node: Node) -> str:
        """The model id requests name (the engines that take an alias serve the service's name)."""
        return name

    def launch(self, ctx: LaunchContext, name: str, svc: Service, node: Node) -> LaunchSpec:
        raise NotImplementedError

    def spec(self, ctx: LaunchContext, name: str, svc: Service, node: Node, argv: Sequence[str],
             env: dict[str, str] | None = None, **kwargs: object) -> LaunchSpec:
        """The spec with what every engine shares: port, bind, health, timeout, devices."""
        values: dict[str, object] = {
            "port": svc.default_port, "bind": svc.bind, "health_path": self.health_path(svc),
            "gpu_kinds": gpu_kinds(node), "startup_timeout": svc.startup_timeout,
            "identity": self.identity, "chat": self.chat,
            "served_model": self.served_model(ctx.inv, name, svc, node)}
        values.update(kwargs)
        return LaunchSpec(name, node_name(ctx.inv, node), svc.engine, tuple(argv),
                          tuple(sorted((env if env is not None else svc.env).items())), **values)  # type: ignore[arg-type]


def secret_file(owner: str, key: SecretRef | None, env: str | None) -> SecretFile | None:
    if not isinstance(key, SecretRef):
        return None
    return SecretFile(secret_path(owner), env, key.describe())


def gpu_kinds(node: Node) -> tuple[str, ...]:
    kinds = sorted({a.kind for a in node.accelerators if a.kind in GPU_KINDS})
    if node.os == "macos":
        kinds = ["metal"]
    return tuple(kinds)
