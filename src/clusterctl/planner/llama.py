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
from dataclasses import dataclass

from clusterctl.errors import MetadataError
from clusterctl.models.meta import ModelMeta
from clusterctl.planner.compute import compute_buffers, per_stream
from clusterctl.planner.llama_base import CACHE_TYPES as CACHE_TYPES
from clusterctl.planner.llama_base import HOST as HOST
from clusterctl.planner.llama_base import MIB as MIB
from clusterctl.planner.llama_base import Device as Device
from clusterctl.planner.llama_base import DeviceMemory, kv_widths, pad, row_bytes
from clusterctl.planner.llama_base import LlamaParams as LlamaParams


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

    # compute buffers (+ the host's output buffer)
    compute_buffers(meta, p, mem, placement, devices, per_stream(n_ctx_seq, swa_cells // n_stream if n_swa else None))
    return LlamaEstimate(n_ctx=n_ctx, n_ctx_seq=n_ctx_seq, devices=mem, caches=caches)
