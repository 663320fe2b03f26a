"""The engine adapters: one module per engine, each the single answer to what that engine is.

A new engine is one module here that defines an `Adapter` subclass and an `ADAPTER`, plus its
name in `ADAPTERS` (and the inventory's `Engine` literal).
"""

from __future__ import annotations

import dataclasses

from clusterctl import firewall
from clusterctl.engines import custom, exo, llama_server, mlx_lm, ollama, rpc_server, vllm
from clusterctl.engines.base import (
    EngineAdapter,
    LaunchContext,
    LaunchSpec,
    PlannedContexts,
    SecretFile,
)
from clusterctl.engines.container import containerise
from clusterctl.inventory import Inventory, Service

ADAPTERS: dict[str, EngineAdapter] = {m.ADAPTER.name: m.ADAPTER for m in
                                      (llama_server, rpc_server, vllm, ollama, mlx_lm, exo, custom)}

__all__ = ["ADAPTERS", "EngineAdapter", "LaunchSpec", "SecretFile", "adapter", "health_path", "launch_specs"]


def adapter(engine: str) -> EngineAdapter:
    try:
        return ADAPTERS[engine]
    except KeyError:
        raise KeyError(f"no adapter for engine {engine!r}; known: {', '.join(sorted(ADAPTERS))}") from None


def health_path(svc: Service) -> str | None:
    """The HTTP path that answers 200 once the service serves; None: a TCP connect is the check."""
    return adapter(svc.engine).health_path(svc)


def launch_specs(inv: Inventory, plan: PlannedContexts | None = None) -> list[LaunchSpec]:
    """One spec per (service, node), rpc workers first, in a stable order."""
    ctx = LaunchContext(inv, plan)
    specs: list[LaunchSpec] = []
    for name in sorted(inv.services, key=lambda n: (inv.services[n].engine != "rpc-server", n)):
        svc = inv.services[name]
        for nname in svc.node_names:
            node = inv.nodes[nname]
            spec = adapter(svc.engine).launch(ctx, name, svc, node)
            if svc.container is not None:
                spec = containerise(spec, svc, inv, node)
            if spec.port and svc.firewalled(node.manager):
                spec = dataclasses.replace(spec, firewall=tuple(firewall.sources(inv, name)))
            specs.append(spec)
    return specs
