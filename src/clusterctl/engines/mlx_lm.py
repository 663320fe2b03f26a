"""mlx-lm's `mlx_lm.server` (Apple silicon; its CPU build runs on Linux), from a venv."""

from __future__ import annotations

from clusterctl.engines.base import Adapter, LaunchContext, LaunchSpec
from clusterctl.inventory import Node, Service
from clusterctl.layout import engine_dir, model_dir


class MlxLm(Adapter):
    name = "mlx-lm"
    provider = "an mlx-lm venv"
    installer = "venv"
    executable = "mlx_lm.server"
    memory_model = "mlx"
    default_health = "/v1/models"  # answers once the model is loaded

    def launch(self, ctx: LaunchContext, name: str, svc: Service, node: Node) -> LaunchSpec:
        assert svc.model is not None
        argv = [svc.binary or f"{engine_dir(node)}/mlx-lm/bin/mlx_lm.server",
                "--model", model_dir(ctx.inv, node, svc.model), "--host", svc.bind, "--port", str(svc.default_port),
                *svc.extra_args]
        return self.spec(ctx, name, svc, node, argv, gpu_kinds=("metal",))


ADAPTER = MlxLm()
