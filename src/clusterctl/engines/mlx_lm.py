"""mlx-lm's `mlx_lm.server` (Apple silicon; its CPU build, `mlx-lm[cpu]`, runs on Linux), from a venv.

It has no alias flag and no API key: the model id it serves and expects in requests is the
`--model` folder, and it binds loopback, or its node's address behind the firewall rule its
systemd unit applies (clusterctl.firewall). It lists
that id in `/v1/models` only when HF_HUB_CACHE names an existing folder (otherwise the body is
empty), so it gets the model's own folder, and HF_HUB_OFFLINE keeps it off the hub."""

from __future__ import annotations

from clusterctl.engines.base import Adapter, LaunchContext, LaunchSpec
from clusterctl.inventory import Inventory, Node, Service
from clusterctl.layout import engine_dir, model_dir


class MlxLm(Adapter):
    name = "mlx-lm"
    provider = "an mlx-lm venv"
    installer = "venv"
    executable = "mlx_lm.server"
    memory_model = "mlx"
    default_health = "/v1/models"  # answers once the model is loaded

    def served_model(self, inv: Inventory, name: str, svc: Service, node: Node) -> str:
        assert svc.model is not None
        return model_dir(inv, node, svc.model)

    def launch(self, ctx: LaunchContext, name: str, svc: Service, node: Node) -> LaunchSpec:
        assert svc.model is not None
        folder = model_dir(ctx.inv, node, svc.model)
        argv = [svc.binary or f"{engine_dir(node)}/mlx-lm/bin/mlx_lm.server",
                "--model", folder, "--host", svc.bind, "--port", str(svc.default_port), *svc.extra_args]
        env = {"HF_HUB_CACHE": folder, "HF_HUB_OFFLINE": "1", **svc.env}
        return self.spec(ctx, name, svc, node, argv, env)


ADAPTER = MlxLm()
