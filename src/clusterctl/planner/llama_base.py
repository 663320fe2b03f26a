"""What the llama.cpp estimator's parts share: the parameters of an instance, its devices, the
per-device ledger and ggml's sizes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from clusterctl.models.meta import ModelMeta

MIB = 2**20

MOE_EXPERTS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"  # llama.cpp's LLM_FFN_EXPS_REGEX

# bytes per element of each KV cache type: (block size, bytes per block), as in ggml
CACHE_TYPES: dict[str, tuple[int, int]] = {
    "f32": (1, 4), "f16": (1, 2), "bf16": (1, 2),
    "q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20),
    "iq4_nl": (32, 18), "q5_0": (32, 22), "q5_1": (32, 24),
}

HOST = "host"


def row_bytes(cache_type: str, n: int) -> int:
    block, size = CACHE_TYPES[cache_type]
    return math.ceil(n / block) * size


def pad(n: int, to: int) -> int:
    return ((n + to - 1) // to) * to


def moe_overrides(cpu_moe: bool, n_cpu_moe: int) -> tuple[tuple[str, str], ...]:
    """The overrides llama.cpp's --cpu-moe and --n-cpu-moe N add (common/arg.cpp): every
    layer's experts, or those of layers 0..N-1, in host memory."""
    out: list[tuple[str, str]] = []
    if cpu_moe:
        out.append((MOE_EXPERTS_REGEX, "CPU"))
    out.extend((rf"blk\.{i}{MOE_EXPERTS_REGEX}", "CPU") for i in range(n_cpu_moe))
    return tuple(out)


def tensor_home(name: str, placement: list[str]) -> str:
    """The device a weight tensor lives on before any override: its layer's (blk.N.*), the
    output layer's (output.*, output_norm.*), else host memory (the token embedding and the
    rest). `placement` is the device of each of the n_layer + 1 layers, the output layer last."""
    if name.startswith("blk."):
        il = int(name.split(".", 2)[1])
        return placement[il] if il < len(placement) - 1 else HOST
    if name.startswith(("output.", "output_norm.")):
        return placement[-1]
    return HOST


@dataclass(frozen=True)
class LlamaParams:
    n_ctx: int | None = None  # None: the model's training context
    n_parallel: int = 1
    kv_unified: bool = False
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: bool = True
    n_batch: int = 2048
    n_ubatch: int = 512
    n_gpu_layers: int = 999
    swa_full: bool = False
    tensor_split: tuple[float, ...] = ()
    # tensor buffer-type overrides in llama.cpp's order (-ot, then --cpu-moe / --n-cpu-moe
    # expanded by moe_overrides): (regex searched in the tensor name, buffer type); first match wins
    overrides: tuple[tuple[str, str], ...] = ()
    mmap: bool = True  # llama.cpp's default; --no-mmap / --load-mode none read the weights instead
    repack: bool = True  # the CPU backend's repacked copies (CPU_REPACK); --no-repack turns them off
    cpu_arch: str = "x86_64"  # which repack kernels the host CPU has: x86_64 (AVX2) or aarch64
    # llama.cpp build number (bNNNN) whose compute-buffer sizing to follow; None: the release
    # the tests build (planner/compute.py lists the builds at which the rules changed)
    llama_build: int | None = None


@dataclass(frozen=True)
class Device:
    """One memory pool llama.cpp offloads to (a GPU, an RPC worker's device, unified memory)."""

    id: str
    free: int  # bytes; used for the default split, like llama.cpp's free-memory split
    gpu: bool = True  # False for CPU-backed devices (e.g. rpc-server on a CPU host)
    aliases: tuple[str, ...] = ()  # llama.cpp's names for it in -ot (CUDA0, RPC[10.0.0.2:50052])


@dataclass
class DeviceMemory:
    weights: int = 0
    kv: int = 0
    compute: int = 0
    layers: list[int] = field(default_factory=list)
    output: bool = False
    repack: int = 0  # of `weights`: the CPU backend's repacked copies beside the memory-mapped file
    moved_in: int = 0  # of `weights`: tensors that overrides put here from another device's layers

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute


def kv_widths(meta: ModelMeta) -> tuple[int, int]:
    """Elements per cell per layer for K and V as llama.cpp stores them."""
    if meta.is_mla and meta.format == "gguf":
        return meta.n_head_kv * meta.head_dim_k, 0
    return meta.n_head_kv * meta.head_dim_k, meta.n_head_kv * meta.head_dim_v
