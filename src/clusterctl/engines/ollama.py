"""Ollama: `ollama serve`, the model registered from a Modelfile once the server answers.
Render-only here (it cannot be installed on the test machines); the binary is the node's."""

from __future__ import annotations

from clusterctl.engines.base import Adapter, LaunchContext, LaunchSpec
from clusterctl.inventory import Node, Service
from clusterctl.layout import base_dir, host_port, model_path

DEFAULT_CONTEXT = 4096


class Ollama(Adapter):
    name = "ollama"
    provider = "Ollama"
    memory_model = "llama.cpp"
    default_health = "/api/version"

    def launch(self, ctx: LaunchContext, name: str, svc: Service, node: Node) -> LaunchSpec:
        inv = ctx.inv
        assert svc.model is not None
        env = dict(svc.env)
        env["OLLAMA_HOST"] = host_port(svc.bind, svc.default_port)  # Go's SplitHostPort: IPv6 in brackets
        env["OLLAMA_MODELS"] = f"{inv.models_dir(node)}/ollama"
        env.setdefault("OLLAMA_KEEP_ALIVE", "-1")
        if svc.flash_attn:
            env["OLLAMA_FLASH_ATTENTION"] = "1"
        if svc.cache_type_k != "f16":
            env["OLLAMA_KV_CACHE_TYPE"] = svc.cache_type_k
        env["OLLAMA_NUM_PARALLEL"] = str(svc.parallel)
        n_ctx = ctx.context(name, svc) or DEFAULT_CONTEXT
        modelfile = [f"FROM {model_path(inv, node, svc.model)}", f"PARAMETER num_ctx {n_ctx}"]
        if svc.gpu_layers != "all":
            modelfile.append(f"PARAMETER num_gpu {svc.gpu_layers}")
        binary = svc.binary or "/usr/local/bin/ollama"
        argv = [binary, "serve", *svc.extra_args]
        modelfile_path = f"{base_dir(node)}/ollama/{name}.Modelfile"
        create = (binary, "create", name, "-f", modelfile_path)
        return self.spec(ctx, name, svc, node, argv, env,
                         extra_files=((modelfile_path, "\n".join(modelfile) + "\n"),), post_start=(create,))


ADAPTER = Ollama()
