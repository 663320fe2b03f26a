"""Compute buffers of a llama.cpp instance: the graph scratch memory ggml reserves per device
for the worst-case ubatch, and the host's output buffer. Fitted to measurements and published
logs (docs/accuracy.md)."""

from __future__ import annotations

from clusterctl.models.meta import ModelMeta
from clusterctl.planner.llama_base import HOST, MIB, Device, DeviceMemory, LlamaParams, kv_widths, pad


def per_stream(n_ctx_seq: int, swa_cells: int | None) -> list[tuple[int, bool]]:
    """(cells per stream, is_swa) of each KV cache: the full one, and the sliding-window one."""
    out = [(n_ctx_seq, False)]
    if swa_cells is not None:
        out.append((swa_cells, True))
    return out


def compute_buffers(meta: ModelMeta, p: LlamaParams, mem: dict[str, DeviceMemory], placement: list[str],
                    devices: list[Device], caches: list[tuple[int, bool]],
                    moved: dict[str, str] | None = None) -> None:
    """Set each device's `compute` (the host's includes its output buffer: one row of logits per
    sequence). `placement` is the device of each of the n_layer + 1 layers; `moved` maps the name
    of each tensor that a tensor override put somewhere other than its layer's device (e.g. the
    experts of a GPU layer kept in host memory by --n-cpu-moe) to the device it went to."""
    offloaded = any(dev != HOST for dev in placement)
    all_offloaded = all(dev != HOST for dev in placement)
    n_copies = 4 if len(devices) > 1 and all_offloaded else 1
    kinds = {d.id: d.gpu for d in devices}
    for dev_id, dm in mem.items():
        dm.compute = compute_buffer(meta, p, dm, caches, on_host=dev_id == HOST, offloaded=offloaded,
                                    n_copies=n_copies, gpu=kinds.get(dev_id, False))
    mem[HOST].compute += meta.n_vocab * 4 * p.n_parallel


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

