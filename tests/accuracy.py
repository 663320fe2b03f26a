"""Compare clusterctl's llama.cpp estimate with what the real llama-server reports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from clusterctl.models.meta import ModelMeta
from clusterctl.planner.llama import HOST, Device, LlamaEstimate, LlamaParams, estimate_llama

MIB = 2**20
KV_TOLERANCE = 0.01  # KV cache: within 1% (it is exact in every measured case)
TOTAL_TOLERANCE = 0.05  # weights + KV + compute (+ output buffer) per device: within 5%


def params_from_args(args: Sequence[str]) -> LlamaParams:
    """LlamaParams for a llama-server argv (the flags the measurements use)."""
    a = list(args)

    def value(*flags: str, default: str | None = None) -> str | None:
        for flag in flags:
            if flag in a:
                return a[a.index(flag) + 1]
        return default

    n_parallel = value("-np", "--parallel")
    unified = "--kv-unified" in a or "-kvu" in a or n_parallel is None  # -np auto: 4 slots, unified
    return LlamaParams(
        n_ctx=int(value("-c", "--ctx-size", default="0") or 0) or None,
        n_parallel=int(n_parallel) if n_parallel else 4,
        kv_unified=unified,
        cache_type_k=value("-ctk", "--cache-type-k", default="f16") or "f16",
        cache_type_v=value("-ctv", "--cache-type-v", default="f16") or "f16",
        flash_attn=value("-fa", "--flash-attn", default="auto") != "off",
        n_batch=int(value("-b", "--batch-size", default="2048") or 2048),
        n_ubatch=int(value("-ub", "--ubatch-size", default="512") or 512),
        n_gpu_layers=int(value("-ngl", "--n-gpu-layers", default="999") or 999),
        swa_full="--swa-full" in a,
        mmap=not ("--no-mmap" in a or value("--load-mode") == "none"),
    )


def estimate_for(meta: ModelMeta, args: Sequence[str], rpc_workers: int) -> LlamaEstimate:
    devices = [Device(f"RPC{i}", 24 << 30, gpu=False) for i in range(rpc_workers)]
    return estimate_llama(meta, params_from_args(args), devices)


@dataclass(frozen=True)
class Row:
    device: str
    measured: Mapping[str, float]  # model, kv, compute, output (MiB)
    estimated: Mapping[str, float]

    @property
    def measured_total(self) -> float:
        return sum(self.measured.values())

    @property
    def estimated_total(self) -> float:
        return sum(self.estimated.values())

    def error(self, key: str) -> float:
        m = self.measured_total if key == "total" else self.measured[key]
        e = self.estimated_total if key == "total" else self.estimated[key]
        if m == 0:
            return 0.0 if e == 0 else float("inf")
        return (e - m) / m


def compare(est: LlamaEstimate, per_device: Mapping[str, Mapping[str, float]]) -> list[Row]:
    """One row per device llama-server reported ("CPU" is clusterctl's host)."""
    rows = []
    for name, measured in sorted(per_device.items()):
        dm = est.devices[HOST if name == "CPU" else name]
        # clusterctl counts the host's output buffer (logits) under compute
        estimated = {"model": dm.weights / MIB, "kv": dm.kv / MIB, "compute": dm.compute / MIB, "output": 0.0}
        m = {"model": measured["model"], "kv": measured["kv"],
             "compute": measured["compute"] + measured.get("output", 0.0), "output": 0.0}
        rows.append(Row(name, m, estimated))
    return rows
