"""exo: a peer-to-peer MLX cluster with a ChatGPT-compatible API. Render-only here."""

from __future__ import annotations

from clusterctl.engines.base import Adapter, LaunchContext, LaunchSpec
from clusterctl.inventory import Node, Service
from clusterctl.layout import base_dir, engine_dir


class Exo(Adapter):
    name = "exo"
    provider = "an exo venv"
    installer = "venv"
    executable = "exo"
    memory_model = "mlx"
    default_health = "/v1/models"

    def launch(self, ctx: LaunchContext, name: str, svc: Service, node: Node) -> LaunchSpec:
        env = dict(svc.env)
        env["EXO_HOME"] = f"{base_dir(node)}/exo"
        env["EXO_MODELS_DIR"] = ctx.inv.models_dir(node)
        argv = [svc.binary or f"{engine_dir(node)}/exo/bin/exo", "--chatgpt-api-port", str(svc.default_port),
                *svc.extra_args]
        return self.spec(ctx, name, svc, node, argv, env)


ADAPTER = Exo()
