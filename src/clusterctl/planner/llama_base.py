"""What the llama.cpp estimator's parts share: the parameters of an instance, its devices, the
per-device ledger and ggml's sizes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from clusterctl.models.meta import ModelMeta

MIB = 2**20

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


@dataclass(frozen=True)
class Device:
    """One memory pool llama.cpp offloads to (a GPU, an RPC worker's device, unified memory)."""

    id: str
    free: int  # bytes; used for the default split, like llama.cpp's free-memory split
    gpu: bool = True  # False for CPU-backed devices (e.g. rpc-server on a CPU host)


@dataclass
class DeviceMemory:
    weights: int = 0
    kv: int = 0
    compute: int = 0
    layers: list[int] = field(default_factory=list)
    output: bool = False

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute


def kv_widths(meta: ModelMeta) -> tuple[int, int]:
    """Elements per cell per layer for K and V as llama.cpp stores them."""
    if meta.is_mla and meta.format == "gguf":
        return meta.n_head_kv * meta.head_dim_k, 0
    return meta.n_head_kv * meta.head_dim_k, meta.n_head_kv * meta.head_dim_v
