"""vLLM's OpenAI server (`vllm serve`), installed into a venv per pinned requirement."""

from __future__ import annotations

from clusterctl.engines.base import Adapter, LaunchContext, LaunchSpec, secret_file
from clusterctl.inventory import Node, Service
from clusterctl.layout import engine_dir, model_dir, model_path


class Vllm(Adapter):
    name = "vllm"
    provider = "a vLLM venv"
    installer = "venv"
    executable = "vllm"
    memory_model = "vllm"

    def launch(self, ctx: LaunchContext, name: str, svc: Service, node: Node) -> LaunchSpec:
        inv = ctx.inv
        assert svc.model is not None
        model = inv.models[svc.model]
        target = model_dir(inv, node, svc.model) if model.format != "gguf" else model_path(inv, node, svc.model)
        argv = [svc.binary or f"{engine_dir(node)}/vllm/bin/vllm", "serve", target,
                "--served-model-name", name, "--host", svc.bind, "--port", str(svc.default_port),
                "--tensor-parallel-size", str(svc.tensor_parallel),
                "--pipeline-parallel-size", str(svc.pipeline_parallel),
                "--gpu-memory-utilization", f"{svc.gpu_memory_utilization:g}"]
        length = svc.max_model_len or ctx.context(name, svc)
        if length:
            argv += ["--max-model-len", str(length)]
        if svc.quantization:
            argv += ["--quantization", svc.quantization]
        if svc.parallel > 1:
            argv += ["--max-num-seqs", str(svc.parallel)]
        argv += svc.extra_args
        env = dict(svc.env)
        if svc.devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in svc.devices)
        key = secret_file(name, svc.api_key, "VLLM_API_KEY")
        return self.spec(ctx, name, svc, node, argv, env, secrets=(key,) if key else (), metrics_path="/metrics")


ADAPTER = Vllm()
