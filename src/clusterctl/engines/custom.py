"""A custom command: clusterctl knows only its argv, port and (optionally) a health path.

Without `health_path` it is up when its port accepts a TCP connection, in deploy, verify,
status and the router alike; it lists no model (no identity check) and is not sent the
smoke prompt unless it declares an HTTP health path."""

from __future__ import annotations

from clusterctl.engines.base import Adapter, LaunchContext, LaunchSpec, secret_file
from clusterctl.inventory import Node, Service


class Custom(Adapter):
    name = "custom"
    provider = "the custom command"
    memory_model = "declared"
    default_health = None
    identity = False

    def health_path(self, svc: Service) -> str | None:
        return svc.health_path

    def launch(self, ctx: LaunchContext, name: str, svc: Service, node: Node) -> LaunchSpec:
        key = secret_file(name, svc.api_key, "CLUSTERCTL_API_KEY")  # the command enforces it itself
        return self.spec(ctx, name, svc, node, [*svc.command, *svc.extra_args], secrets=(key,) if key else (),
                         chat=svc.health_path is not None)


ADAPTER = Custom()
