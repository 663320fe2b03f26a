"""Placement and fit of every service of an inventory on its nodes' devices."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from clusterctl.engines import adapter
from clusterctl.engines.install import archive_name, backend_label, llama_targets, pip_engines, requirement_for
from clusterctl.engines.ollama import DEFAULT_CONTEXT as OLLAMA_DEFAULT_CONTEXT
from clusterctl.engines.vllm import cpu_kv_bytes, on_cpu
from clusterctl.errors import MetadataError
from clusterctl.inventory import Inventory, Node, Service, split_override
from clusterctl.layout import host_port, rpc_endpoint
from clusterctl.models.meta import ModelMeta
from clusterctl.planner.engines import VllmEstimate, estimate_vllm, estimate_vllm_cpu, split_mlx
from clusterctl.planner.llama import HOST, Device, LlamaEstimate, LlamaParams, OverrideError, estimate_llama
from clusterctl.planner.llama_base import moe_overrides
from clusterctl.units import GIB, fmt_size, parse_rate

Verdict = Literal["fits", "tight", "does-not-fit"]
Severity = Literal["error", "warning", "info"]


@dataclass
class Usage:
    """One service's share of one device."""

    service: str
    engine: str
    model: str | None
    weights: int = 0
    kv: int = 0
    compute: int = 0
    note: str = ""
    quant: str | None = None

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute


@dataclass
class DevicePlan:
    node: str
    id: str  # gpu0, unified, ram
    kind: str
    capacity: int
    reserve: int
    safe_zone: float
    name: str | None = None
    usages: list[Usage] = field(default_factory=list)

    @property
    def used(self) -> int:
        return sum(u.total for u in self.usages) + self.reserve

    @property
    def utilization(self) -> float:
        if self.capacity <= 0:
            return 0.0 if self.used == 0 else 99.99
        return self.used / self.capacity

    @property
    def verdict(self) -> Verdict:
        if self.used > self.capacity:
            return "does-not-fit"
        if self.utilization > self.safe_zone:
            return "tight"
        return "fits"


@dataclass
class Finding:
    severity: Severity
    subject: str  # node or service name
    message: str
    hint: str | None = None


@dataclass
class Step:
    phase: Literal["acquire", "router", "services", "verify"]
    node: str
    action: str
    detail: str
    bytes: int = 0
    seconds: float = 0.0


@dataclass
class ServicePlan:
    name: str
    engine: str
    nodes: list[str]
    model: str | None
    port: int
    context: int | None  # tokens, after engine padding
    total: int  # bytes over all devices
    verdict: Verdict
    devices: list[str]  # "node/gpu0"
    max_context: int | None = None  # largest context that fits, for a misfit llama.cpp service
    kv_tokens: int | None = None  # vLLM: "KV cache size: N tokens" as the engine logs it
    max_concurrency: float | None = None  # vLLM: max_model_len sequences the KV cache holds at once


@dataclass
class Plan:
    cluster: str
    link_speed: str
    devices: list[DevicePlan]
    services: list[ServicePlan]
    findings: list[Finding]
    steps: list[Step]

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    @property
    def misfits(self) -> list[ServicePlan]:
        return [s for s in self.services if s.verdict == "does-not-fit"]

    def device(self, node: str, dev: str) -> DevicePlan:
        for d in self.devices:
            if d.node == node and d.id == dev:
                return d
        raise KeyError(f"{node}/{dev}")

    def to_json(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "ok": self.ok,
            "link_speed": self.link_speed,
            "devices": [
                {
                    "node": d.node, "device": d.id, "kind": d.kind, "name": d.name,
                    "capacity": d.capacity, "reserve": d.reserve, "used": d.used,
                    "utilization": round(d.utilization, 6), "safe_zone": d.safe_zone,
                    "verdict": d.verdict,
                    "usages": [asdict(u) | {"total": u.total} for u in d.usages],
                }
                for d in self.devices
            ],
            "services": [asdict(s) for s in self.services],
            "findings": [asdict(f) for f in self.findings],
            "steps": [asdict(s) for s in self.steps],
        }


# ---------------------------------------------------------------------------------------

class _Ledger:
    """Device plans of the whole cluster, filled service by service."""

    def __init__(self, inv: Inventory) -> None:
        self.inv = inv
        self.devices: dict[tuple[str, str], DevicePlan] = {}
        for name, node in inv.nodes.items():
            reserve = inv.effective_reserve(node)
            sz = inv.effective_safe_zone(node)
            for dev_id, kind, size in node.devices():
                acc_name = next((a.name for a in node.accelerators if a.kind == kind), None)
                self.devices[(name, dev_id)] = DevicePlan(name, dev_id, kind, size, reserve, sz, acc_name)

    def gpu_devices(self, node: str, indexes: list[int] | None = None) -> list[DevicePlan]:
        devs = [d for (n, _), d in self.devices.items() if n == node and d.id not in ("ram",)]
        if indexes:
            devs = [devs[i] for i in indexes if i < len(devs)]
        return devs

    def host(self, node: str) -> DevicePlan | None:
        """Where host-side allocations land: the unified pool, or RAM when declared."""
        n = self.inv.nodes[node]
        if n.unified_memory is not None:
            return self.devices[(node, "unified")]
        if (node, "cpu") in self.devices:
            return self.devices[(node, "cpu")]
        if n.ram is None:
            return None
        key = (node, "ram")
        if key not in self.devices:
            self.devices[key] = DevicePlan(node, "ram", "ram", n.ram, 0,
                                           self.inv.effective_safe_zone(n))
        return self.devices[key]

    def free(self, dev: DevicePlan) -> int:
        return dev.capacity - dev.used


def llama_params(svc: Service, meta: ModelMeta, *, context: int | None = None) -> LlamaParams:
    engine_default_ctx = OLLAMA_DEFAULT_CONTEXT if svc.engine == "ollama" else None
    ctx = context or svc.context or engine_default_ctx or meta.n_ctx_train
    flash = svc.flash_attn if svc.flash_attn is not None else svc.engine != "ollama"
    ngl = 999 if svc.gpu_layers == "all" else int(svc.gpu_layers)
    return LlamaParams(
        n_ctx=ctx, n_parallel=svc.parallel, kv_unified=False,
        cache_type_k=svc.cache_type_k, cache_type_v=svc.cache_type_v, flash_attn=flash,
        n_batch=svc.batch, n_ubatch=svc.ubatch, n_gpu_layers=ngl,
        tensor_split=tuple(svc.tensor_split),
        overrides=service_overrides(svc), mmap=svc.mmap,
    )


def service_overrides(svc: Service) -> tuple[tuple[str, str], ...]:
    """A service's tensor overrides in the order its rendered command gives them to llama.cpp:
    each override_tensors entry, then --cpu-moe, then --n-cpu-moe."""
    own = tuple(split_override(o) for o in svc.override_tensors)  # validated when the inventory loaded
    return own + moe_overrides(svc.cpu_moe, svc.n_cpu_moe)


def _llama_devices(ledger: _Ledger, inv: Inventory, name: str, svc: Service
                   ) -> tuple[list[Device], dict[str, DevicePlan]]:
    """llama.cpp's device list for a head: its own GPUs, then each RPC worker's devices."""
    devices: list[Device] = []
    plans: dict[str, DevicePlan] = {}
    node = svc.node_names[0]
    members = [(node, svc.devices or None)]
    w_endpoint: dict[str, tuple[str, int]] = {}
    for w in svc.rpc_workers:
        wsvc = inv.services[w]
        members.append((wsvc.node_names[0], wsvc.devices or None))
        w_endpoint[wsvc.node_names[0]] = rpc_endpoint(inv, w)
    for n, idx in members:
        for dp in ledger.gpu_devices(n, idx):
            if dp.kind == "cpu" and n == node:
                continue  # the head's own CPU is the host, not an offload device
            key = f"{n}/{dp.id}"
            aliases: tuple[str, ...] = ()
            if n != node and n in w_endpoint:
                aliases = (f"RPC[{host_port(*w_endpoint[n])}]",)
            devices.append(Device(key, max(ledger.free(dp), 0), gpu=dp.kind != "cpu", aliases=aliases))
            plans[key] = dp
    return devices, plans


def _apply_llama(est: LlamaEstimate, plans: dict[str, DevicePlan], host: DevicePlan | None,
                 name: str, svc: Service, head_node: str, quant: str | None) -> None:
    for key, dm in est.devices.items():
        target = host if key == HOST else plans[key]
        if target is None or (dm.total == 0 and key != HOST):
            continue
        note = ""
        if key != HOST and not key.startswith(head_node + "/"):
            note = f"rpc for {name}"
        elif key == HOST:
            note = "host"
        target.usages.append(Usage(name, svc.engine, svc.model, dm.weights, dm.kv, dm.compute, note, quant))


def _fits_alone(est: LlamaEstimate, plans: dict[str, DevicePlan], host: DevicePlan | None) -> bool:
    for key, dm in est.devices.items():
        target = host if key == HOST else plans.get(key)
        if target is None:
            continue
        if dm.total > target.capacity - target.used:
            return False
    return True


# the built-in chat template that is an architecture's own format, where one is unambiguous
ARCH_CHAT_TEMPLATES = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma"}


def missing_template_hint(architecture: str) -> str:
    """How to give a llama-server a chat template when its GGUF carries none."""
    name = ARCH_CHAT_TEMPLATES.get(architecture)
    builtin = (f"chat_template: {name} (llama.cpp's built-in for {architecture})" if name
               else "chat_template: NAME (one of llama.cpp's built-ins, see `llama-server --help`)")
    return f"set {builtin} or chat_template_file: /path/to/template.jinja on the service"


def make_plan(inv: Inventory, metas: dict[str, ModelMeta]) -> Plan:
    """Place every service and judge the fit. Pure: no I/O."""
    ledger = _Ledger(inv)
    findings: list[Finding] = []
    services: list[ServicePlan] = []
    # rpc workers first (they only host what their head sends), then heads, then the rest
    order = sorted(inv.services.items(), key=lambda kv: (kv[1].engine == "rpc-server", kv[0]))
    for name, svc in order:
        if svc.engine == "rpc-server":
            heads = [h for h, s in inv.services.items() if name in s.rpc_workers]
            if not heads:
                findings.append(Finding("warning", name, "rpc-server is not used by any llama-server head",
                                        "list it in a head's rpc_workers or remove it"))
            node = inv.nodes.get(svc.node or "")
            if not svc.firewalled(node.manager if node else None) and svc.bind not in ("127.0.0.1", "::1"):
                findings.append(Finding(
                    "warning", name,
                    f"rpc-server has no authentication: port {svc.default_port} on {svc.node} must be "
                    "reachable only from the head node",
                    "leave its firewall on (firewall: true, a systemd node), or firewall it yourself: "
                    "accept the port from the head's address only"))
            services.append(ServicePlan(name, svc.engine, svc.node_names, None, svc.default_port,
                                        None, 0, "fits", []))
            continue
        meta = metas.get(svc.model) if svc.model else None
        if svc.model and meta is None and adapter(svc.engine).memory_model != "declared":
            findings.append(Finding("error", name, f"no metadata for model '{svc.model}'",
                                    "run `clusterctl resolve` to pin it in the lock file"))
            continue
        if (svc.engine == "llama-server" and meta is not None and meta.has_chat_template is False
                and svc.chat_template is None and svc.chat_template_file is None):
            findings.append(Finding(
                "warning", name,
                f"model '{svc.model}' carries no chat template (tokenizer.chat_template): llama-server "
                "falls back to ChatML, which the model may not follow",
                missing_template_hint(meta.architecture)))
        memory_model = adapter(svc.engine).memory_model
        if memory_model == "llama.cpp":
            assert meta is not None
            try:
                services.append(_plan_llama(inv, ledger, metas, name, svc, meta, findings))
            except MetadataError as exc:  # a model the estimator does not understand: this service only
                findings.append(Finding("error", name, str(exc), exc.hint))
            except OverrideError as exc:
                findings.append(Finding("error", name, f"override_tensors: {exc}",
                                        "name CPU, CUDA0.. (the head's GPUs in order) or RPC[host:port] of one "
                                        "of its rpc_workers"))
        elif memory_model == "vllm":
            assert meta is not None
            services.append(_plan_vllm(inv, ledger, name, svc, meta, findings))
            if len(svc.node_names) > 1:
                findings.append(Finding(
                    "warning", name,
                    f"vLLM's ranks talk over torch.distributed without authentication: port "
                    f"{svc.vllm_master_port} on {svc.node_names[0]} and the ranks' message queues must be "
                    f"reachable only from {', '.join(svc.node_names)}",
                    "keep the nodes on a private network, or firewall the head to the other nodes' addresses"))
        elif memory_model == "mlx":
            assert meta is not None
            services.append(_plan_mlx(inv, ledger, name, svc, meta, findings))
        else:
            services.append(_plan_custom(ledger, name, svc))

    failed = {f.subject for f in findings if f.severity == "error"}
    for dp in ledger.devices.values():
        if not dp.usages:
            continue
        where = f"{dp.node}/{dp.id}"
        if dp.verdict == "does-not-fit" and not {u.service for u in dp.usages} <= failed:
            findings.append(Finding("error", dp.node,
                                    f"{where}: needs {fmt_size(dp.used)} of {fmt_size(dp.capacity)}"))
        elif dp.verdict == "tight":
            findings.append(Finding(
                "warning", dp.node,
                f"{where}: {dp.utilization:.0%} used, above the {dp.safe_zone:.0%} safe zone",
                "lower the context or parallel slots, use a smaller quantisation, or raise safe_zone "
                "if you accept the risk"))
    _size_findings(inv, metas, findings)
    steps = _steps(inv, metas, services)
    return Plan(inv.cluster.name, inv.cluster.defaults.link_speed, list(ledger.devices.values()),
                services, findings, steps)


def _verdict_of(devs: list[DevicePlan]) -> Verdict:
    verdicts = [d.verdict for d in devs]
    if "does-not-fit" in verdicts:
        return "does-not-fit"
    if "tight" in verdicts:
        return "tight"
    return "fits"


def _plan_llama(inv: Inventory, ledger: _Ledger, metas: dict[str, ModelMeta], name: str,
                svc: Service, meta: ModelMeta, findings: list[Finding]) -> ServicePlan:
    node = svc.node_names[0]
    devices, plans = _llama_devices(ledger, inv, name, svc)
    host = ledger.host(node)
    params = llama_params(svc, meta)
    est = estimate_llama(meta, params, devices)
    fits = _fits_alone(est, plans, host)
    max_ctx: int | None = None
    if not fits:
        max_ctx = _largest_context(meta, svc, devices, plans, host)
        findings.append(_misfit_finding(inv, ledger, metas, name, svc, meta, est, max_ctx))
    if params.n_ctx and params.n_ctx > meta.n_ctx_train:
        findings.append(Finding("warning", name,
                                f"context {params.n_ctx} exceeds the model's training context "
                                f"{meta.n_ctx_train}", "quality degrades past it without RoPE scaling"))
    _apply_llama(est, plans, host, name, svc, node, meta.file_type)
    used = [plans[k] for k in est.devices if k != HOST and k in plans and est.devices[k].total]
    if host is not None:
        used.append(host)
    return ServicePlan(name, svc.engine, svc.node_names, svc.model, svc.default_port, est.n_ctx,
                       est.total, "does-not-fit" if not fits else _verdict_of(used),
                       [f"{d.node}/{d.id}" for d in used], max_ctx)


def _largest_context(meta: ModelMeta, svc: Service, devices: list[Device],
                     plans: dict[str, DevicePlan], host: DevicePlan | None) -> int | None:
    lo, hi = 1, min(meta.n_ctx_train, svc.context or meta.n_ctx_train) // 256
    best: int | None = None
    while lo <= hi:
        mid = (lo + hi) // 2
        est = estimate_llama(meta, llama_params(svc, meta, context=mid * 256), devices)
        if _fits_alone(est, plans, host):
            best, lo = mid * 256, mid + 1
        else:
            hi = mid - 1
    return best


def _misfit_finding(inv: Inventory, ledger: _Ledger, metas: dict[str, ModelMeta], name: str,
                    svc: Service, meta: ModelMeta, est: LlamaEstimate, max_ctx: int | None
                    ) -> Finding:
    ctx = est.n_ctx
    need = est.total
    hints: list[str] = []
    if max_ctx:
        hints.append(f"the largest context that fits is {max_ctx} (asked {ctx})")
    model = inv.models[svc.model] if svc.model else None
    for alt in (model.alternatives if model else []):
        alt_meta = metas.get(alt)
        if alt_meta is None:
            continue
        devices, plans = _llama_devices(ledger, inv, name, svc)
        alt_est = estimate_llama(alt_meta, llama_params(svc, alt_meta), devices)
        label = alt_meta.file_type or alt
        if _fits_alone(alt_est, plans, ledger.host(svc.node_names[0])):
            hints.append(f"model '{alt}' ({label}, {fmt_size(alt_meta.weights_bytes)}) fits at this context")
            break
        alt_offload = _experts_offload(inv, ledger, name, svc, alt_meta)
        if alt_offload is not None:
            hints.append(f"model '{alt}' ({label}, {fmt_size(alt_meta.weights_bytes)}) with n_cpu_moe: "
                         f"{svc.n_cpu_moe + alt_offload[0]} (its experts of layers 0-"
                         f"{svc.n_cpu_moe + alt_offload[0] - 1} in host memory, {fmt_size(alt_offload[1])}) fits "
                         "at this context")
            break
    if not hints:
        hints.append(f"no listed quantisation of this model fits at context {ctx}")
    offload = _experts_offload(inv, ledger, name, svc, meta)
    if offload is not None:
        n, host_bytes = offload
        where = ledger.host(svc.node_names[0])
        pool = f"{svc.node_names[0]}'s {where.id if where else 'RAM'}"
        hints.append(f"n_cpu_moe: {svc.n_cpu_moe + n} (llama.cpp --n-cpu-moe: the experts of layers "
                     f"0-{svc.n_cpu_moe + n - 1} in {pool}, {fmt_size(host_bytes)} there) fits at context {ctx}")
    split = _rpc_split(inv, ledger, svc, meta)
    if split:
        hints.append(f"split it across {' + '.join(split)} over llama.cpp RPC: add an engine: rpc-server service "
                     f"on {', '.join(split[1:])} and list it in rpc_workers of '{name}'")
    else:
        hints.append(f"no combination of nodes has {fmt_size(need)} free; a node with at least "
                     f"{fmt_size(need)} is needed")
    return Finding("error", name,
                   f"does not fit: needs {fmt_size(need)} (weights {fmt_size(meta.weights_bytes)}, "
                   f"KV {fmt_size(est.kv_total)} at {ctx} tokens)",
                   "; ".join(hints))


def _experts_offload(inv: Inventory, ledger: _Ledger, name: str, svc: Service, meta: ModelMeta
                     ) -> tuple[int, int] | None:
    """The fewest more layers whose MoE experts, kept in the head's host memory (--n-cpu-moe),
    make the service fit at its context: (layers, bytes then in host memory); None when the
    model has no experts, its tensors are not known, it has no GPU to free, or no count fits."""
    if not meta.is_moe or not meta.tensors or svc.engine != "llama-server":
        return None
    devices, plans = _llama_devices(ledger, inv, name, svc)
    host = ledger.host(svc.node_names[0])
    if not devices or host is None:
        return None

    def estimate(extra: int) -> LlamaEstimate:
        svc_n = svc.model_copy(update={"n_cpu_moe": svc.n_cpu_moe + extra})
        return estimate_llama(meta, llama_params(svc_n, meta), devices)

    lo, hi = 1, meta.n_layer - svc.n_cpu_moe
    if hi < 1:
        return None
    fitting = estimate(hi)  # the estimate at `hi`, the fewest layers known to fit
    if not _fits_alone(fitting, plans, host):
        return None
    while lo < hi:  # more experts in host memory only ever frees GPU memory
        mid = (lo + hi) // 2
        est = estimate(mid)
        if _fits_alone(est, plans, host):
            hi, fitting = mid, est
        else:
            lo = mid + 1
    return hi, fitting.devices[HOST].total


def _rpc_split(inv: Inventory, ledger: _Ledger, svc: Service, meta: ModelMeta) -> list[str] | None:
    """Smallest set of nodes (head first, then the freest) whose devices hold the model."""
    head = svc.node_names[0]
    others = sorted((n for n in inv.nodes if n != head),
                    key=lambda n: -sum(ledger.free(d) for d in ledger.gpu_devices(n)))
    chosen = [head]
    for n in others:
        chosen.append(n)
        devices: list[Device] = []
        plans: dict[str, DevicePlan] = {}
        for m in chosen:
            for dp in ledger.gpu_devices(m):
                key = f"{m}/{dp.id}"
                devices.append(Device(key, max(ledger.free(dp), 0)))
                plans[key] = dp
        est = estimate_llama(meta, llama_params(svc, meta), devices)
        if _fits_alone(est, plans, ledger.host(head)):
            return chosen
    return None


def _plan_vllm(inv: Inventory, ledger: _Ledger, name: str, svc: Service, meta: ModelMeta,
               findings: list[Finding]) -> ServicePlan:
    """vLLM's ranks (tensor x pipeline parallel) run evenly over the service's nodes: on each GPU
    node's GPUs, or as processes in a CPU node's memory."""
    world = svc.tensor_parallel * svc.pipeline_parallel
    local = world // len(svc.node_names)
    cpu = [on_cpu(inv.nodes[n]) for n in svc.node_names]
    if any(cpu) and not all(cpu):
        findings.append(Finding("error", name, "one vLLM instance cannot mix GPU and CPU nodes: "
                                f"{', '.join(n for n, c in zip(svc.node_names, cpu, strict=True) if c)} have no GPU",
                                "give the instance nodes of one kind"))
    if all(cpu):
        return _plan_vllm_cpu(inv, ledger, name, svc, meta, findings, local)
    gpus: list[DevicePlan] = []
    for n in svc.node_names:
        have = ledger.gpu_devices(n, svc.devices or None)
        if len(have) < local:
            split = f" ({world} ranks over {len(svc.node_names)} nodes)" if len(svc.node_names) > 1 else ""
            findings.append(Finding("error", name, f"tensor_parallel x pipeline_parallel needs {local} GPUs on "
                                    f"node '{n}'{split}; it has {len(have)}",
                                    "lower tensor_parallel / pipeline_parallel or add nodes"))
        gpus += have[:local]
    mem = min(d.capacity for d in gpus) if gpus else 0
    names = [a.name for n in svc.node_names for a in inv.nodes[n].accelerators
             if a.kind in ("cuda", "rocm") and a.name]
    est = estimate_vllm(meta, gpu_memory=mem, utilization=svc.gpu_memory_utilization,
                        tp=svc.tensor_parallel, pp=svc.pipeline_parallel,
                        max_model_len=svc.max_model_len or svc.context,
                        vllm_version=_vllm_requirement(inv, inv.nodes[svc.node_names[0]]),
                        gpu_name=names[0] if names else None, enforce_eager="--enforce-eager" in svc.extra_args)
    for d in gpus:
        d.usages.append(Usage(name, "vllm", svc.model, est.weights, max(est.kv_budget, 0),
                              est.activation, f"gpu_memory_utilization {svc.gpu_memory_utilization}",
                              meta.file_type))
    if est.kv_budget <= 0:
        findings.append(Finding("error", name,
                                f"weights {fmt_size(est.weights)} per GPU exceed the vLLM budget "
                                f"{fmt_size(est.budget)} ({svc.gpu_memory_utilization:.0%} of {fmt_size(mem)})",
                                "raise tensor_parallel, use a quantised checkpoint, or bigger GPUs"))
        verdict: Verdict = "does-not-fit"
    elif not est.fits:
        findings.append(_vllm_too_long(name, est.kv_bytes_per_token, est.max_model_len, est.longest,
                                       "per GPU", "or raise gpu_memory_utilization"))
        verdict = "does-not-fit"
    else:
        verdict = _verdict_of(gpus)
    need = est.weights + est.activation + max(est.kv_budget, est.kv_bytes_per_token * est.max_model_len)
    return ServicePlan(name, "vllm", svc.node_names, svc.model, svc.default_port, est.max_model_len,
                       need * len(gpus), verdict, [f"{d.node}/{d.id}" for d in gpus],
                       est.longest if not est.fits else None, *_vllm_capacity(est))


def _vllm_requirement(inv: Inventory, node: Node) -> str | None:
    """The vLLM release the node installs (its defaults decide the budget): the pinned
    requirement, or the CPU build's on a node without a GPU; None when nothing is pinned."""
    spec = inv.cluster.engines.vllm
    if spec is None:
        return None
    return spec.cpu_requirement if spec.cpu_requirement is not None and on_cpu(node) else spec.requirement


def _vllm_capacity(est: VllmEstimate) -> tuple[int | None, float | None]:
    return (est.max_tokens, round(est.max_concurrency, 2)) if est.num_gpu_blocks > 0 else (None, None)


def _vllm_too_long(name: str, per_token: int, length: int, tokens: int, where: str, more: str) -> Finding:
    if tokens == 0:  # not one block: no max_model_len helps
        return Finding("error", name, f"max_model_len {length} needs {fmt_size(per_token * length)} of KV {where}; "
                       "not one KV block fits", more.removeprefix("or "))
    return Finding("error", name, f"max_model_len {length} needs {fmt_size(per_token * length)} of KV {where}; "
                   f"{tokens} tokens fit", f"set max_model_len <= {tokens} {more}")


def _plan_vllm_cpu(inv: Inventory, ledger: _Ledger, name: str, svc: Service, meta: ModelMeta,
                   findings: list[Finding], local: int) -> ServicePlan:
    """vllm-cpu: each rank holds its share of the weights and a KV cache of exactly
    VLLM_CPU_KVCACHE_SPACE GiB (vLLM allocates that, whatever the context), in host memory."""
    kv = cpu_kv_bytes(svc)
    est = estimate_vllm_cpu(meta, kv_bytes=kv, tp=svc.tensor_parallel, pp=svc.pipeline_parallel,
                            max_model_len=svc.max_model_len or svc.context,
                            vllm_version=_vllm_requirement(inv, inv.nodes[svc.node_names[0]]))
    per_node = local * (est.weights + kv + est.activation)
    pools: list[DevicePlan] = []
    for n in svc.node_names:
        host = ledger.host(n)
        if host is None:
            findings.append(Finding("warning", name, f"node '{n}' declares no ram: vLLM's CPU ranks there "
                                    f"({fmt_size(per_node)}) are not checked",
                                    f"set nodes.{n}.ram"))
            continue
        host.usages.append(Usage(name, "vllm", svc.model, local * est.weights, local * kv, local * est.activation,
                                 f"{local} CPU rank(s), VLLM_CPU_KVCACHE_SPACE {kv // 2**30} GiB each",
                                 meta.file_type))
        pools.append(host)
    if not est.fits:
        findings.append(_vllm_too_long(name, est.kv_bytes_per_token, est.max_model_len, est.longest, "per rank",
                                       "or raise VLLM_CPU_KVCACHE_SPACE in the service's env"))
    verdict: Verdict = _verdict_of(pools) if est.fits else "does-not-fit"
    return ServicePlan(name, "vllm", svc.node_names, svc.model, svc.default_port, est.max_model_len,
                       len(svc.node_names) * per_node, verdict, [f"{d.node}/{d.id}" for d in pools],
                       est.longest if not est.fits else None, *_vllm_capacity(est))


def _plan_mlx(inv: Inventory, ledger: _Ledger, name: str, svc: Service, meta: ModelMeta,
              findings: list[Finding]) -> ServicePlan:
    pools: list[DevicePlan] = []
    for n in svc.node_names:
        host = ledger.host(n)
        if host is None or inv.nodes[n].unified_memory is None:
            findings.append(Finding("warning", name, f"node '{n}' has no unified_memory; "
                                    f"{svc.engine} runs on Apple silicon",
                                    "set unified_memory on the node"))
        if host is not None:
            pools.append(host)
    context = svc.context or min(meta.n_ctx_train, 32768)
    shares = split_mlx(meta, context, [p.capacity for p in pools])
    for pool, share in zip(pools, shares, strict=True):
        note = f"{len(pools)}-way split" if len(pools) > 1 else ""
        pool.usages.append(Usage(name, svc.engine, svc.model, share.weights, share.kv, share.overhead, note,
                                 meta.file_type))
    verdict = _verdict_of(pools) if pools else "does-not-fit"
    return ServicePlan(name, svc.engine, svc.node_names, svc.model, svc.default_port, context,
                       sum(s.total for s in shares), verdict, [f"{p.node}/{p.id}" for p in pools])


def _plan_custom(ledger: _Ledger, name: str, svc: Service) -> ServicePlan:
    node = svc.node_names[0]
    devs = ledger.gpu_devices(node, svc.devices or None)[:1]
    if svc.memory and devs:
        devs[0].usages.append(Usage(name, "custom", svc.model, svc.memory, 0, 0, "declared"))
    return ServicePlan(name, "custom", svc.node_names, svc.model, svc.default_port, svc.context,
                       svc.memory or 0, _verdict_of(devs) if devs else "fits",
                       [f"{d.node}/{d.id}" for d in devs])


def _size_findings(inv: Inventory, metas: dict[str, ModelMeta], findings: list[Finding]) -> None:
    for name, model in inv.models.items():
        meta = metas.get(name)
        if meta is None or model.size is None or not meta.file_bytes:
            continue
        ratio = model.size / meta.file_bytes
        if ratio < 0.9 or ratio > 1.1:
            findings.append(Finding(
                "warning", name,
                f"the inventory says {fmt_size(model.size)} but the files are {fmt_size(meta.file_bytes)}",
                "fix 'size' (or remove it: the lock file has the real size)"))


def _steps(inv: Inventory, metas: dict[str, ModelMeta], services: list[ServicePlan]) -> list[Step]:
    rate = parse_rate(inv.cluster.defaults.link_speed)
    steps: list[Step] = []
    seen: set[tuple[str, str]] = set()
    build = inv.cluster.engines.llama_cpp_build
    for n, targets in llama_targets(inv).items():
        assert build is not None
        steps.append(Step("acquire", n, "build", f"llama.cpp {', '.join(sorted(targets))} from "
                          f"{archive_name(build.source)} ({backend_label(inv.nodes[n])})"))
    for n, engines in pip_engines(inv).items():
        for engine, python_engine in engines:
            requirement = requirement_for(inv.nodes[n], engine, python_engine)
            steps.append(Step("acquire", n, "install", f"{requirement} (venv)"))
    for sp in services:
        if sp.model is None or sp.engine == "rpc-server":
            continue
        meta = metas.get(sp.model)
        model = inv.models[sp.model]
        size = (meta.file_bytes if meta else 0) or model.size or 0
        for n in sp.nodes:
            if (n, sp.model) in seen:
                continue
            seen.add((n, sp.model))
            files = _files_label(meta.files if meta else [], sp.model)
            steps.append(Step("acquire", n, "download", files, size, size / rate if rate else 0.0))
    if inv.router is not None:
        r = inv.router
        steps.append(Step("router", r.node, "install",
                          f"router :{r.port}, {len(r.routes)} task routes"))
    workers: list[Step] = []
    heads: list[Step] = []
    for sp in sorted(services, key=lambda s: s.name):
        for rank, n in enumerate(sp.nodes):
            if sp.engine == "vllm" and rank:  # deploy starts the headless ranks before their head
                svc = inv.services[sp.name]
                workers.append(Step("services", n, "start", f"{sp.name} rank {rank} (vllm, headless; joins "
                                    f"{sp.nodes[0]}:{svc.vllm_master_port})"))
            else:
                (workers if sp.engine == "rpc-server" else heads).append(
                    Step("services", n, "start", f"{sp.name} ({sp.engine}) :{sp.port}"))
    count = len(services)
    routes = len(inv.router.routes) if inv.router else 0
    phases = ["acquire", "router"]
    steps = sorted(steps, key=lambda st: (phases.index(st.phase), st.node))
    by_node = sorted(workers, key=lambda st: st.node) + sorted(heads, key=lambda st: st.node)
    return steps + by_node + [Step("verify", "*", "check", f"{count} services, {routes} routes")]


def _files_label(files: list[str], fallback: str) -> str:
    if not files:
        return fallback
    if len(files) == 1:
        return files[0]
    return f"{files[0]} (+{len(files) - 1} more parts)"


def node_summary(node: Node) -> str:
    """'1x cuda 80 GiB' or 'unified 512 GiB'."""
    if node.unified_memory is not None:
        return f"unified {node.unified_memory / GIB:.0f} GiB"
    parts = [f"{a.count}x {a.name or a.kind} {a.memory / GIB:.0f} GiB" for a in node.accelerators
             if a.kind != "cpu"]
    return ", ".join(parts) or (f"CPU, {node.ram / GIB:.0f} GiB RAM" if node.ram else "CPU")
