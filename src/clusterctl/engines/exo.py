"""exo (exo-explore's): a peer-to-peer MLX cluster with a ChatGPT-compatible API. Render-only
here: it is not installable on Linux test machines (Python 3.13+, Rust bindings, no PyPI release).

Its command line is the one of exo 1.x (`exo.main:main`, argparse): `--api-port PORT` (default
52415); `--chatgpt-api-port` was exo 0.0.x's. PyPI's `exo` is another project (yeast epigenome
tools) whose `exo` command is `exo.cli:main`: the venv install checks the console script's entry
point, so that program never passes for exo."""

from __future__ import annotations

from clusterctl.engines.base import Adapter, LaunchContext, LaunchSpec
from clusterctl.inventory import Node, Service
from clusterctl.layout import base_dir, engine_dir


class Exo(Adapter):
    name = "exo"
    provider = "an exo venv"
    installer = "venv"
    executable = "exo"
    entry_point = "exo.main:main"  # what exo-explore's `exo` console script runs
    memory_model = "mlx"
    default_health = "/v1/models"

    def launch(self, ctx: LaunchContext, name: str, svc: Service, node: Node) -> LaunchSpec:
        env = dict(svc.env)
        env["EXO_HOME"] = f"{base_dir(node)}/exo"
        env["EXO_MODELS_DIR"] = ctx.inv.models_dir(node)
        argv = [svc.binary or f"{engine_dir(node)}/exo/bin/exo", "--api-port", str(svc.default_port),
                *svc.extra_args]
        return self.spec(ctx, name, svc, node, argv, env)


ADAPTER = Exo()
