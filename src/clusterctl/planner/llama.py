"""Memory of a llama.cpp model instance (llama-server, its RPC workers, Ollama), per device.

Follows llama.cpp's own rules (src/llama-model.cpp, src/llama-context.cpp,
src/llama-kv-cache*.cpp of the release the tests build):
- n_ctx is padded to 256; with n_parallel slots and a non-unified cache every slot gets
  pad256(n_ctx / n_parallel) cells in its own stream;
- the last `n_gpu_layers` of the n_layer + 1 "layers" (the output layer counts as one) are
  offloaded, split over the devices by the cumulative tensor split (default: by free memory);
- the token embedding (input layer) always stays in host memory; a model with tied
  embeddings gets a second copy of that matrix as its output weight on the output device;
- each layer's KV cache lives on that layer's device; sliding-window layers get
  pad256(min(cells, n_swa * streams_sharing + n_ubatch)) cells; MLA models (GGUFs with the
  key_length_mla keys) store one 576-wide compressed K row per layer and no V.
Compute buffers are fitted to measurements (docs/accuracy.md).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from clusterctl.errors import MetadataError
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


@dataclass
class KVCache:
    cells: int
    layers: int
    k_bytes: int
    v_bytes: int
    swa: bool = False

    @property
    def total(self) -> int:
        return self.k_bytes + self.v_bytes


@dataclass
class LlamaEstimate:
    n_ctx: int  # after padding
    n_ctx_seq: int
    devices: dict[str, DeviceMemory]  # includes HOST
    caches: list[KVCache]

    @property
    def total(self) -> int:
        return sum(d.total for d in self.devices.values())

    @property
    def kv_total(self) -> int:
        return sum(c.total for c in self.caches)


def context_cells(meta: ModelMeta, p: LlamaParams) -> tuple[int, int, int]:
    """(n_ctx, n_ctx_seq, n_stream) after llama.cpp's padding rules."""
    n_ctx = pad(p.n_ctx or meta.n_ctx_train, 256)
    if p.kv_unified or p.n_parallel == 1:
        return n_ctx, n_ctx, 1
    n_ctx_seq = pad(n_ctx // p.n_parallel, 256)
    return n_ctx_seq * p.n_parallel, n_ctx_seq, p.n_parallel


def kv_row_bytes(meta: ModelMeta, p: LlamaParams) -> tuple[int, int]:
    """Bytes per cell per layer for K and for V. llama.cpp's MLA cache (GGUFs with the
    key_length_mla keys) is one compressed row (n_head_kv = 1, head_dim_k = 576) and no V."""
    k, v = kv_widths(meta)
    return row_bytes(p.cache_type_k, k), (row_bytes(p.cache_type_v, v) if v else 0)


def layer_devices(n_layer: int, devices: list[Device], p: LlamaParams) -> list[str]:
    """Device id of each of the n_layer + 1 layers (the last one is the output layer)."""
    if not devices:
        return [HOST] * (n_layer + 1)
    weights = list(p.tensor_split) if any(p.tensor_split) else [float(d.free) for d in devices]
    weights = (weights + [0.0] * len(devices))[: len(devices)]
    total = sum(weights) or 1.0
    cumulative: list[float] = []
    running = 0.0
    for w in weights:
        running += w
        cumulative.append(running / total)
    gpu_start = max(n_layer + 1 - p.n_gpu_layers, 0)
    active = min(p.n_gpu_layers, n_layer + 1)
    out: list[str] = []
    for il in range(n_layer + 1):
        if il < gpu_start or il - gpu_start >= active:
            out.append(HOST)
            continue
        idx = bisect.bisect_right(cumulative, (il - gpu_start) / active)
        out.append(devices[min(idx, len(devices) - 1)].id)
    return out


def _swa_layers(meta: ModelMeta) -> list[bool]:
    if meta.swa_layers and meta.sliding_window:
        return list(meta.swa_layers) + [False] * (meta.n_layer - len(meta.swa_layers))
    return [False] * meta.n_layer


def _tied_output(meta: ModelMeta) -> bool:
    tb = meta.tensor_bytes
    return tb.token_embd > 0 and tb.output * 4 < tb.token_embd


def estimate_llama(meta: ModelMeta, p: LlamaParams, devices: list[Device]) -> LlamaEstimate:
    """Per-device memory of one llama.cpp instance. `devices` empty = CPU only."""
    if meta.recurrent:
        raise MetadataError(
            f"architecture '{meta.architecture}' has recurrent (state-space) layers: the llama.cpp estimator "
            "does not model their state yet, so it cannot say whether this model fits",
            hint="plan it by hand from llama.cpp's own start-up log, or give the service engine: custom with "
            "memory: SIZE")
    n_ctx, n_ctx_seq, n_stream = context_cells(meta, p)
    placement = layer_devices(meta.n_layer, devices, p)
    mem: dict[str, DeviceMemory] = {HOST: DeviceMemory()}
    for d in devices:
        mem[d.id] = DeviceMemory()

    # weights
    tb = meta.tensor_bytes
    layer_bytes = list(tb.layers) if tb.layers else []
    if len(layer_bytes) != meta.n_layer:
        per_layer = (meta.weights_bytes - tb.token_embd - tb.output) // max(meta.n_layer, 1)
        layer_bytes = [per_layer] * meta.n_layer
    for il, dev in enumerate(placement[:-1]):
        mem[dev].weights += layer_bytes[il]
        mem[dev].layers.append(il)
    out_dev = placement[-1]
    mem[out_dev].output = True
    mem[HOST].weights += tb.token_embd + tb.other
    mem[out_dev].weights += tb.output
    if _tied_output(meta) and out_dev != HOST:
        mem[out_dev].weights += tb.token_embd

    # KV cache
    k_row, v_row = kv_row_bytes(meta, p)
    swa = _swa_layers(meta)
    caches: list[KVCache] = []
    full_cells = n_ctx_seq * n_stream
    if any(swa) and meta.sliding_window:
        shared = p.n_parallel if (p.kv_unified or p.n_parallel == 1) else 1
        swa_cells_stream = pad(min(n_ctx_seq, meta.sliding_window * shared + p.n_ubatch), 256)
        if p.swa_full:
            swa_cells_stream = n_ctx_seq
        swa_cells = swa_cells_stream * n_stream
    else:
        swa_cells = full_cells
    n_full = sum(1 for s in swa if not s)
    n_swa = meta.n_layer - n_full
    if n_full:
        caches.append(KVCache(full_cells, n_full, k_row * full_cells * n_full, v_row * full_cells * n_full))
    if n_swa:
        caches.append(KVCache(swa_cells, n_swa, k_row * swa_cells * n_swa, v_row * swa_cells * n_swa,
                              swa=True))
    for il, dev in enumerate(placement[:-1]):
        cells = swa_cells if swa[il] else full_cells
        mem[dev].kv += (k_row + v_row) * cells

    # compute buffers (+ the host's output buffer: one row of logits per sequence)
    per_stream = [(n_ctx_seq, False)]
    if n_swa:
        per_stream.append((swa_cells // n_stream, True))
    offloaded = any(dev != HOST for dev in placement)
    all_offloaded = all(dev != HOST for dev in placement)
    n_copies = 4 if len(devices) > 1 and all_offloaded else 1
    kinds = {d.id: d.gpu for d in devices}
    for dev_id, dm in mem.items():
        dm.compute = compute_buffer(meta, p, dm, per_stream, on_host=dev_id == HOST, offloaded=offloaded,
                                    n_copies=n_copies, gpu=kinds.get(dev_id, False))
    mem[HOST].compute += meta.n_vocab * 4 * p.n_parallel
    return LlamaEstimate(n_ctx=n_ctx, n_ctx_seq=n_ctx_seq, devices=mem, caches=caches)


def _masks(caches: list[tuple[int, bool]], ub: int, flash_attn: bool) -> int:
    """KQ masks, one per cache (full, SWA): cells x ubatch, f16 with flash attention else f32."""
    return sum(cells * ub * (2 if flash_attn else 4) for cells, _ in caches)


def compute_buffer(meta: ModelMeta, p: LlamaParams, dm: DeviceMemory, caches: list[tuple[int, bool]], *,
                   on_host: bool, offloaded: bool, n_copies: int, gpu: bool) -> int:
    """Graph scratch memory that ggml reserves on one device for the worst-case ubatch.

    Fitted to the real llama-server (docs/accuracy.md): the activations of one layer for
    n_ubatch tokens (FFN gate/up/activation, residual stream, query), the KQ masks, and with
    flash attention off the f32 attention scores. `caches` holds (cells per stream, is_swa).
    With pipeline parallelism (several devices, every layer offloaded) ggml keeps
    `n_copies` copies of the graph inputs, the masks among them."""
    ub = min(p.n_ubatch, p.n_batch, pad(p.n_ctx or meta.n_ctx_train, 256))
    f32 = 4
    masks = _masks(caches, ub, p.flash_attn)
    if on_host and offloaded and not dm.layers:
        # the host only embeds the input tokens and holds the graph inputs
        return n_copies * (masks + ub * meta.n_embd * f32) + MIB
    if not dm.layers and not dm.output:
        return 0
    n_ff = (meta.n_ff or 4 * meta.n_embd) * max(1, meta.n_expert_used)
    q_dim = meta.n_head * (meta.head_dim_k_mla or meta.head_dim_k)
    residual = ub * 3 * meta.n_embd * f32
    if p.flash_attn:
        act = ub * (3 * n_ff + q_dim) * f32 + residual
        if gpu and (p.cache_type_k not in ("f16", "bf16") or p.cache_type_v not in ("f16", "bf16")):
            # GPU flash-attention kernels read a quantised cache through f16 copies of K and V
            n_kv = max((cells for cells, swa in caches if not swa), default=0)
            k, v = kv_widths(meta)
            act += n_kv * (k + v) * 2
    else:
        n_kv = max((cells for cells, swa in caches if not swa), default=0)
        scores = n_kv * ub * meta.n_head * f32 + ub * 2 * q_dim * f32
        act = max(ub * 3 * n_ff * f32, scores) + residual
    return act + n_copies * masks


def kv_widths(meta: ModelMeta) -> tuple[int, int]:
    """Elements per cell per layer for K and V as llama.cpp stores them."""
    if meta.is_mla and meta.format == "gguf":
        return meta.n_head_kv * meta.head_dim_k, 0
    return meta.n_head_kv * meta.head_dim_k, meta.n_head_kv * meta.head_dim_v
