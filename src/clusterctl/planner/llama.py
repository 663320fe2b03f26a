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
import re
from dataclasses import dataclass

from clusterctl.errors import MetadataError
from clusterctl.models.meta import ModelMeta
from clusterctl.planner.compute import compute_buffers, per_stream
from clusterctl.planner.llama_base import CACHE_TYPES as CACHE_TYPES
from clusterctl.planner.llama_base import HOST as HOST
from clusterctl.planner.llama_base import MIB as MIB
from clusterctl.planner.llama_base import Device as Device
from clusterctl.planner.llama_base import DeviceMemory, kv_widths, pad, row_bytes, tensor_home
from clusterctl.planner.llama_base import LlamaParams as LlamaParams


@dataclass
class KVCache:
    cells: int
    layers: int
    k_bytes: int
    v_bytes: int
    swa: bool = False
    recurrent: bool = False  # a recurrent state (cells = sequences): k_bytes is r, v_bytes is s

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


# Which weights the CPU backend repacks into its interleaved layout (ggml-cpu/repack.cpp,
# ggml_repack_get_optimal_repack_type): ggml type -> rows (ne[1]) must be a multiple of this.
REPACK_RULES: dict[str, dict[str, int]] = {
    "x86_64": {"Q4_0": 8, "Q4_K": 8, "IQ4_NL": 8, "MXFP4": 8},  # AVX2
    "aarch64": {"Q4_0": 4, "Q4_K": 8, "Q5_K": 8, "Q6_K": 8, "IQ4_NL": 4, "MXFP4": 4, "Q8_0": 4},  # NEON i8mm
}
_BACKEND = re.compile(r"^(CUDA|ROCm|Vulkan|SYCL|MTL|Metal|CANN|MUSA|OpenCL|BLAS)(\d*)$")


class OverrideError(ValueError):
    """A tensor override names a buffer type that none of the instance's devices has."""


def resolve_buft(buft: str, devices: list[Device]) -> str:
    """Device id of a buffer type named in `-ot PATTERN=BUFT`: CPU (host memory), a device's
    id or alias (RPC[host:port]), or a backend's numbered device (CUDA0, ROCm1, Vulkan0, Metal)
    counted among the local GPUs in llama.cpp's order."""
    if buft in ("CPU", "CPU_REPACK", HOST):
        return HOST
    for d in devices:
        if buft == d.id or buft in d.aliases:
            return d.id
    m = _BACKEND.match(buft)
    local = [d for d in devices if not any(a.startswith("RPC[") for a in d.aliases)]
    if m and int(m.group(2) or 0) < len(local):
        return local[int(m.group(2) or 0)].id
    names = ["CPU"] + [f"{d.id} = {d.aliases[0]}" if d.aliases else d.id for d in devices]
    raise OverrideError(f"buffer type {buft!r} is none of this instance's devices ({', '.join(names)})")


def _repacked(name: str, type_: str, rows: int, p: LlamaParams) -> bool:
    """A weight in host memory that the CPU backend keeps a repacked copy of: a matrix used by a
    matmul (not the token embedding, which is looked up by row) of a repackable type."""
    if not p.repack or name.startswith("token_embd.") or rows <= 1:
        return False
    need = REPACK_RULES.get(p.cpu_arch, REPACK_RULES["x86_64"]).get(type_)
    return need is not None and rows % need == 0


def _place_tensors(meta: ModelMeta, p: LlamaParams, devices: list[Device], placement: list[str],
                   mem: dict[str, DeviceMemory]) -> dict[str, str]:
    """Weights tensor by tensor (GGUFs that list their tensors): each on its layer's device
    unless an override matches its name first. Returns the tensors moved off their layer's device."""
    assert meta.tensors is not None
    patterns = [(re.compile(pat), resolve_buft(buft, devices)) for pat, buft in p.overrides]
    moved: dict[str, str] = {}
    tied = _tied_output(meta) and not any(t.name.startswith("output.weight") for t in meta.tensors)
    for t in meta.tensors:
        home = tensor_home(t.name, placement)
        dev = next((d for rx, d in patterns if rx.search(t.name)), home)
        mem[dev].weights += t.bytes
        if dev != home:
            moved[t.name] = dev
            mem[dev].moved_in += t.bytes
        if dev == HOST and _repacked(t.name, t.type, t.rows, p) and p.mmap:
            # memory-mapped, the file stays mapped beside the repacked copy
            mem[HOST].weights += t.bytes
            mem[HOST].repack += t.bytes
        if tied and t.name == "token_embd.weight" and placement[-1] != HOST:
            mem[placement[-1]].weights += t.bytes  # the output layer's own copy of a tied matrix
    return moved


def _place_groups(meta: ModelMeta, placement: list[str], mem: dict[str, DeviceMemory]) -> None:
    """Weights by group (input, layers, output) where the tensors are not listed."""
    tb = meta.tensor_bytes
    layer_bytes = list(tb.layers) if tb.layers else []
    if len(layer_bytes) != meta.n_layer:
        per_layer = (meta.weights_bytes - tb.token_embd - tb.output) // max(meta.n_layer, 1)
        layer_bytes = [per_layer] * meta.n_layer
    for il, dev in enumerate(placement[:-1]):
        mem[dev].weights += layer_bytes[il]
    out_dev = placement[-1]
    mem[HOST].weights += tb.token_embd + tb.other
    mem[out_dev].weights += tb.output
    if _tied_output(meta) and out_dev != HOST:
        mem[out_dev].weights += tb.token_embd


def estimate_llama(meta: ModelMeta, p: LlamaParams, devices: list[Device]) -> LlamaEstimate:
    """Per-device memory of one llama.cpp instance. `devices` empty = CPU only."""
    if meta.recurrent and meta.recurrent_state is None:
        raise MetadataError(
            f"architecture '{meta.architecture}' has recurrent layers whose state size the estimator cannot "
            "tell from this file (it follows llama.cpp's ssm.*, wkv.* and shortconv.* keys; linear-attention and "
            "KDA layers are not modelled), so it cannot say whether this model fits",
            hint="plan it by hand from llama.cpp's own start-up log, or give the service engine: custom with "
            "memory: SIZE")
    if p.overrides and meta.tensors is None:
        raise MetadataError(
            "tensor overrides need the model's tensor list, which this metadata does not have",
            hint="read the model again: clusterctl resolve --refresh (or inspect the GGUF itself)")
    n_ctx, n_ctx_seq, n_stream = context_cells(meta, p)
    placement = layer_devices(meta.n_layer, devices, p)
    mem: dict[str, DeviceMemory] = {HOST: DeviceMemory()}
    for d in devices:
        mem[d.id] = DeviceMemory()
    for il, dev in enumerate(placement[:-1]):
        mem[dev].layers.append(il)
    mem[placement[-1]].output = True

    # weights
    moved: dict[str, str] = {}
    if meta.tensors:
        moved = _place_tensors(meta, p, devices, placement, mem)
    else:
        _place_groups(meta, placement, mem)

    # KV cache of the attention layers (per-layer KV heads; 0 = no cache on that layer)
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
    groups: dict[bool, list[int]] = {False: [0, 0, 0], True: [0, 0, 0]}  # swa -> [layers, k, v]
    for il, dev in enumerate(placement[:-1]):
        k_row, v_row = layer_kv_row_bytes(meta, p, il)
        if not k_row and not v_row:
            continue
        cells = swa_cells if swa[il] else full_cells
        g = groups[swa[il]]
        g[0] += 1
        g[1] += k_row * cells
        g[2] += v_row * cells
        mem[dev].kv += (k_row + v_row) * cells
    for is_swa in (False, True):
        n, k, v = groups[is_swa]
        if n:
            caches.append(KVCache(swa_cells if is_swa else full_cells, n, k, v, swa=is_swa))

    # recurrent state: one row of r and s (f32) per sequence per recurrent layer, on its layer's device
    if meta.recurrent and meta.recurrent_state is not None:
        rows = max(1, p.n_parallel)
        r_row, s_row = meta.recurrent_state.r * 4, meta.recurrent_state.s * 4
        n_rec = r_total = s_total = 0
        for il, dev in enumerate(placement[:-1]):
            if meta.is_recurrent_layer(il):
                n_rec += 1
                r_total += r_row * rows
                s_total += s_row * rows
                mem[dev].kv += (r_row + s_row) * rows
        if n_rec:
            caches.append(KVCache(rows, n_rec, r_total, s_total, recurrent=True))

    # compute buffers (+ the host's output buffer)
    n_swa_layers = groups[True][0]
    compute_buffers(meta, p, mem, placement, devices,
                    per_stream(n_ctx_seq, swa_cells // n_stream if n_swa_layers else None), moved)
    return LlamaEstimate(n_ctx=n_ctx, n_ctx_seq=n_ctx_seq, devices=mem, caches=caches)


def layer_kv_row_bytes(meta: ModelMeta, p: LlamaParams, il: int) -> tuple[int, int]:
    """Bytes per cell of layer `il` for K and for V (0, 0 for a layer without KV cache)."""
    heads = meta.kv_heads(il)
    if not heads or meta.n_head_kv == 0:
        return 0, 0
    k, v = kv_widths(meta)
    k, v = k * heads // meta.n_head_kv, v * heads // meta.n_head_kv
    return row_bytes(p.cache_type_k, k), (row_bytes(p.cache_type_v, v) if v else 0)
