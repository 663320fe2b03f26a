"""llama.cpp's llama-server: OpenAI API, /health, built on the node from the pinned source."""

from __future__ import annotations

from clusterctl.engines.base import Adapter, LaunchContext, LaunchSpec, SecretFile, secret_file
from clusterctl.inventory import LLAMA_CPP_MAX_PARALLEL, LLAMA_CPP_QUANTIZED_CACHE, Node, Service
from clusterctl.layout import base_dir, host_port, llama_bin, model_path, rpc_endpoint


class LlamaServer(Adapter):
    name = "llama-server"
    provider = "llama.cpp"
    installer = "llama.cpp"
    memory_model = "llama.cpp"
    # the engine's limits, checked when the inventory loads (inventory.py cites the source)
    max_parallel = LLAMA_CPP_MAX_PARALLEL
    quantized_cache = LLAMA_CPP_QUANTIZED_CACHE

    def launch(self, ctx: LaunchContext, name: str, svc: Service, node: Node) -> LaunchSpec:
        inv = ctx.inv
        assert svc.model is not None
        argv: list[str] = [svc.binary or llama_bin(node, "llama-server"),
                           "--model", model_path(inv, node, svc.model),
                           "--alias", name,
                           "--host", svc.bind, "--port", str(svc.default_port)]
        n_ctx = ctx.context(name, svc)
        if n_ctx is not None:
            argv += ["--ctx-size", str(n_ctx)]
        argv += ["--parallel", str(svc.parallel),
                 "--n-gpu-layers", "999" if svc.gpu_layers == "all" else str(svc.gpu_layers),
                 "--batch-size", str(svc.batch), "--ubatch-size", str(svc.ubatch),
                 "--cache-type-k", svc.cache_type_k, "--cache-type-v", svc.cache_type_v,
                 "--flash-attn", "auto" if svc.flash_attn is None else ("on" if svc.flash_attn else "off"),
                 "--fit", "off"]
        if svc.threads:
            argv += ["--threads", str(svc.threads)]
        if svc.tensor_split:
            argv += ["--tensor-split", ",".join(f"{x:g}" for x in svc.tensor_split)]
        for override in svc.override_tensors:  # llama.cpp's order: first match wins
            argv += ["--override-tensor", override]
        if svc.cpu_moe:
            argv.append("--cpu-moe")
        if svc.n_cpu_moe:
            argv += ["--n-cpu-moe", str(svc.n_cpu_moe)]
        if not svc.mmap:  # the release clusterctl builds took --no-mmap into --load-mode
            argv += ["--load-mode", "none"]
        remote: list[str] = []
        if svc.rpc_workers:
            endpoints = []
            for w in svc.rpc_workers:
                host, port = rpc_endpoint(inv, w)
                endpoints.append(host_port(host, port))
                remote.append(w)
            argv += ["--rpc", ",".join(endpoints)]
        if svc.metrics:
            argv.append("--metrics")
        files: list[tuple[str, str]] = []
        if svc.chat_template is not None:
            # a built-in name goes through llama.cpp's own formatter: with Jinja on, the name
            # would be taken as the text of a template
            argv += ["--no-jinja", "--chat-template", svc.chat_template]
        elif svc.chat_template_text is not None:
            path = chat_template_path(node, name)
            argv += ["--jinja", "--chat-template-file", path]
            files.append((path, svc.chat_template_text))
        secrets: list[SecretFile] = []
        key = secret_file(name, svc.api_key, None)
        if key is not None:
            argv += ["--api-key-file", key.path]
            secrets.append(key)
        argv += svc.extra_args
        return self.spec(ctx, name, svc, node, argv, secrets=tuple(secrets), remote_after=tuple(remote),
                         metrics_path="/metrics" if svc.metrics else None, extra_files=tuple(files))


def chat_template_path(node: Node, service: str) -> str:
    """Where a service's chat_template_file lives on its node."""
    return f"{base_dir(node)}/templates/{service}.jinja"


ADAPTER = LlamaServer()
