"""llama.cpp's rpc-server: a raw TCP worker of a llama-server head (no HTTP, no health path)."""

from __future__ import annotations

from clusterctl.engines.base import Adapter, LaunchContext, LaunchSpec
from clusterctl.inventory import Node, Service
from clusterctl.layout import llama_bin


class RpcServer(Adapter):
    name = "rpc-server"
    provider = "llama.cpp"
    installer = "llama.cpp"
    memory_model = "none"  # its memory is planned as part of the head's split
    default_health = None
    identity = False
    chat = False

    def launch(self, ctx: LaunchContext, name: str, svc: Service, node: Node) -> LaunchSpec:
        argv = [svc.binary or llama_bin(node, "rpc-server"), "--host", svc.bind, "--port", str(svc.default_port)]
        if svc.threads:
            argv += ["--threads", str(svc.threads)]
        if svc.rpc_cache:
            argv.append("--cache")
        argv += svc.extra_args
        return self.spec(ctx, name, svc, node, argv, startup_timeout=60.0, worker=True)


ADAPTER = RpcServer()
