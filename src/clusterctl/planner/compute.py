"""Compute buffers of a llama.cpp instance: the graph scratch memory ggml reserves per device
for the worst-case ubatch, and the host's output buffer.

llama.cpp sizes these buffers by building the graph of one ubatch and running ggml's graph
allocator over it without computing anything. This module does the same on a model of that
graph: the tensors of each layer (activations only; weights and the KV cache live in their own
buffers) in llama.cpp's order, the scheduler's choice of device for each node, the copies it
makes where a node reads a tensor of another device, and ggml-alloc's best-fit allocator with
its in-place reuse and frees after the last use. The largest offset each device's allocator
reaches is its compute buffer. docs/accuracy.md compares the result with published logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clusterctl.models.meta import ModelMeta
from clusterctl.planner.llama_base import HOST, Device, DeviceMemory, LlamaParams, pad, tensor_home

# llama.cpp builds at which the sizing rules changed (approximate where the PR's build number
# is not known exactly; the build of a published log is compared with them)
OP_OFFLOAD_BUILD = 2500  # ggml-backend: a GPU runs big-batch ops on weights kept in host memory
NEW_RESERVE_BUILD = 9300  # May 2026: f16 KQ mask with flash attention, llama-server reserves one output per slot
RPC_EVENTS_BUILD = 9300  # RPC devices support events (pipeline parallelism over RPC); after b6209
OVERRIDES_NO_PP_BUILD = 5000  # pipeline parallelism is off when tensors are overridden
FUSED_GLU_BUILD = 5900  # the FFN's activation and gating fused in one op (a new tensor, not in place)
BATCHED_MOE_BUILD = 2600  # mul_mat_id computes every selected expert at once (before: one slot at a time)
EMBD_INPUT_BUILD = 9300  # the embeddings input is a graph input even when tokens are given
TESTED_BUILD = 10**6  # None: the release the tests build (newer than every rule above)

PARALLEL_BLOCK = ("command-r", "cohere2")  # architectures whose FFN runs beside the attention
OFFLOAD_MIN_BATCH = 32  # GGML_OP_OFFLOAD_MIN_BATCH
N_COPIES = 4  # GGML_SCHED_MAX_COPIES
ALIGN = 32
_INF = 1 << 62
F32 = 4


def per_stream(n_ctx_seq: int, swa_cells: int | None) -> list[tuple[int, bool]]:
    """(cells per stream, is_swa) of each KV cache: the full one, and the sliding-window one."""
    out = [(n_ctx_seq, False)]
    if swa_cells is not None:
        out.append((swa_cells, True))
    return out


# --- ggml-alloc ------------------------------------------------------------------------------

class _DynAlloc:
    """ggml_dyn_tallocr: free blocks sorted by offset, the last one unbounded; best fit among the
    others, else the last; freed ranges merge with their neighbours."""

    def __init__(self) -> None:
        self.blocks: list[list[int]] = [[0, _INF]]
        self.max_size = 0

    def alloc(self, size: int) -> int:
        size = pad(size, ALIGN)
        best, best_size = -1, _INF
        for i, (_, bsize) in enumerate(self.blocks[:-1]):
            if size <= bsize <= best_size:
                best, best_size = i, bsize
        if best == -1:
            best = len(self.blocks) - 1
        block = self.blocks[best]
        off = block[0]
        block[0] += size
        block[1] -= size
        if block[1] == 0:
            del self.blocks[best]
        self.max_size = max(self.max_size, off + size)
        return off

    def free(self, off: int, size: int) -> None:
        size = pad(size, ALIGN)
        for i, block in enumerate(self.blocks):
            if block[0] + block[1] == off:
                block[1] += size
                if i + 1 < len(self.blocks) and block[0] + block[1] == self.blocks[i + 1][0]:
                    block[1] += self.blocks[i + 1][1]
                    del self.blocks[i + 1]
                return
            if off + size == block[0]:
                block[0] = off
                block[1] += size
                if i > 0 and self.blocks[i - 1][0] + self.blocks[i - 1][1] == block[0]:
                    self.blocks[i - 1][1] += block[1]
                    del self.blocks[i]
                return
        i = next((i for i, b in enumerate(self.blocks) if b[0] > off), len(self.blocks))
        self.blocks.insert(i, [off, size])


@dataclass(eq=False)
class _T:
    """A tensor of the graph. `external`: lives in another buffer (weights, KV cache)."""

    size: int
    dev: str | None = None
    srcs: list[_T] = field(default_factory=list)
    inplace: bool = False
    weight: _T | None = None  # the weight this op multiplies (its device decides the op's)
    matmul: bool = False
    external: bool = False
    is_input: bool = False
    is_output: bool = False
    fixed: bool = False  # device set by the graph itself (inputs, stores into the KV cache)
    rows: int = 0  # batch size of the op, for op offload
    no_offload: bool = False  # get_rows: never offloaded (its batch size counts as 0)


def _gallocr(nodes: list[_T], leafs: list[_T]) -> dict[str, int]:
    """ggml_gallocr_alloc_graph: leafs and inputs first, then nodes in order, each freed after
    its last consumer (outputs never); an in-place op takes over its parent's memory."""
    allocs: dict[str, _DynAlloc] = {}
    where: dict[int, tuple[str, int]] = {}
    children: dict[int, int] = {}

    def alloc(t: _T, dev: str) -> None:
        if t.external or id(t) in where or t.size == 0:
            return
        if t.inplace:
            for s in t.srcs:
                if (id(s) in where and not s.is_output and s.size == t.size and children.get(id(s)) == 1
                        and where[id(s)][0] == dev):
                    where[id(t)] = where.pop(id(s))
                    return
        a = allocs.setdefault(dev, _DynAlloc())
        where[id(t)] = (dev, a.alloc(t.size))

    for t in leafs:
        alloc(t, t.dev or HOST)
    for n in nodes:
        for s in n.srcs:
            children[id(s)] = children.get(id(s), 0) + 1
        if n.is_input:
            alloc(n, n.dev or HOST)
        for s in n.srcs:
            if s.is_input:
                alloc(s, s.dev or HOST)
    for n in nodes:
        alloc(n, n.dev or HOST)
        for s in n.srcs:
            children[id(s)] -= 1
            if children[id(s)] == 0 and not s.is_output and id(s) in where:
                dev, off = where.pop(id(s))
                allocs[dev].free(off, s.size)
    return {dev: a.max_size for dev, a in allocs.items()}


# --- the scheduler ---------------------------------------------------------------------------

def _assign(nodes: list[_T], offload_to: str | None) -> None:
    """ggml_backend_sched's passes 1-2: an op on a weight runs where the weight is (a GPU takes
    big-batch ops on host weights: op offload); the other ops follow their neighbours, GPUs first."""
    for n in nodes:
        if n.fixed:
            continue
        n.dev = None
        if n.weight is not None:
            n.dev = n.weight.dev
            if n.dev == HOST and offload_to and n.rows >= OFFLOAD_MIN_BATCH and not n.no_offload:
                n.dev = offload_to
    for gpu_only in (True, False):
        for order in (nodes, nodes[::-1]):
            cur: str | None = None
            for n in order:
                if n.dev is not None:
                    cur = None if (gpu_only and n.dev == HOST) else n.dev
                elif cur is not None:
                    n.dev = cur
    for n in nodes:
        if n.dev is None:
            n.dev = HOST


def _split_copies(nodes: list[_T], n_copies: int) -> tuple[list[_T], list[_T]]:
    """Splits (runs of nodes on one device) and the copies of their inputs from other devices.
    With pipeline parallelism every copy and every graph input exists n_copies times and is
    never freed; otherwise a copy is an ordinary tensor, made at the start of its split."""
    out: list[_T] = []
    leafs: list[_T] = []
    copies: dict[tuple[int, str], _T] = {}
    if n_copies > 1:
        inputs = {id(s): s for n in nodes for s in n.srcs if s.is_input}
        for s in inputs.values():
            s.is_output = True
            leafs.extend([s] + [_T(s.size, s.dev, is_input=True, is_output=True) for _ in range(n_copies - 1)])
    i = 0
    while i < len(nodes):
        dev = nodes[i].dev
        j = i
        n_inputs = 0  # tensors this split copies in from other devices
        while j < len(nodes) and nodes[j].dev == dev:
            # ggml_backend_sched_split_graph starts a new split at a node whose weight lives on
            # another device once the split has inputs, "so that the memory of the previously
            # offloaded weights can be reused": op offload holds one weight copy at a time
            srcs = [src for src in nodes[j].srcs if src.dev != dev and src.size]
            if n_inputs and any(src.external for src in srcs):
                break
            n_inputs += len(srcs)
            j += 1
        split = nodes[i:j]
        head: list[_T] = []
        for n in split:
            for k, s in enumerate(n.srcs):
                if s.dev == dev or s.size == 0:
                    continue
                key = (id(s), dev or HOST)
                if key not in copies:
                    cp = _T(s.size, dev)
                    copies[key] = cp
                    if n_copies > 1:
                        cp.is_input = cp.is_output = True
                        leafs.extend([cp] + [_T(s.size, dev, is_input=True, is_output=True)
                                             for _ in range(n_copies - 1)])
                    else:
                        cp.srcs = [s]  # keeps the source alive until the copy is made
                        head.append(cp)
                n.srcs[k] = copies[key]
        out.extend(head)
        out.extend(split)
        i = j
    return out, leafs


# --- the graph of one ubatch -----------------------------------------------------------------

class _Graph:
    def __init__(self, meta: ModelMeta, weights: dict[str, tuple[str, int]]) -> None:
        self.meta = meta
        self.weights = weights  # tensor name -> (device, bytes)
        self.nodes: list[_T] = []
        self._w: dict[str, _T] = {}
        self.home = HOST  # the device of the layer being built (for weights the model lacks)

    def w(self, name: str) -> _T:
        if name not in self._w:
            dev, size = self.weights.get(name, (self.home, 0))
            self._w[name] = _T(size, dev, external=True)
        return self._w[name]

    def op(self, size: int, *srcs: _T, weight: str | None = None, inplace: bool = False, rows: int = 0,
           dev: str | None = None, get_rows: bool = False) -> _T:
        w = self.w(weight) if weight else None
        t = _T(size, dev, [s for s in srcs] + ([w] if w is not None else []), inplace=inplace,
               weight=w, rows=rows, fixed=dev is not None, no_offload=get_rows)
        self.nodes.append(t)
        return t


def _tensor_weights(meta: ModelMeta, placement: list[str], moved: dict[str, str]) -> dict[str, tuple[str, int]]:
    """Device and bytes of each weight tensor the graph multiplies by."""
    return {t.name: (moved.get(t.name, tensor_home(t.name, placement)), t.bytes) for t in meta.tensors or []}


def _group_weights(meta: ModelMeta, placement: list[str], moved: dict[str, str],
                   shapes: dict[int, dict[str, int]]) -> dict[str, tuple[str, int]]:
    """Without a tensor list: each layer's bytes shared out by the element counts of its
    matrices (shapes: layer -> tensor suffix -> elements)."""
    tb = meta.tensor_bytes
    layer_bytes = list(tb.layers) if len(tb.layers) == meta.n_layer else []
    if not layer_bytes:
        per = (meta.weights_bytes - tb.token_embd - tb.output) // max(meta.n_layer, 1)
        layer_bytes = [per] * meta.n_layer
    out: dict[str, tuple[str, int]] = {}
    for il, elems in shapes.items():
        total = sum(elems.values()) or 1
        for suffix, n in elems.items():
            name = f"blk.{il}.{suffix}.weight"
            out[name] = (moved.get(name, placement[il]), layer_bytes[il] * n // total)
    out["output.weight"] = (moved.get("output.weight", placement[-1]), tb.output)
    out["output_norm.weight"] = (placement[-1], 0)
    out["token_embd.weight"] = (HOST, tb.token_embd)
    return out


@dataclass(frozen=True)
class _Dims:
    E: int
    H: int
    dk: int
    dv: int
    kv_k: int
    kv_v: int
    n_vocab: int


def _ffn_widths(meta: ModelMeta, il: int) -> tuple[int, int, int]:
    """(dense width, per-expert width, shared-expert width) of layer il; dense 0 on a MoE layer."""
    dense = (meta.n_ff_layers[il] if meta.n_ff_layers and il < len(meta.n_ff_layers) else meta.n_ff) \
        or 4 * meta.n_embd
    if not meta.is_moe:
        return dense, 0, 0
    if meta.architecture.startswith("deepseek") and il == 0:
        return dense, 0, 0  # DeepSeek's leading dense layer(s)
    exp = meta.n_ff_exp or dense
    return 0, exp, exp * meta.n_expert_shared


def _layer_shapes(meta: ModelMeta, il: int) -> dict[str, int]:
    E = meta.n_embd
    H = meta.n_head
    s: dict[str, int] = {}
    if meta.is_mla:
        dk = meta.head_dim_k_mla or meta.head_dim_k
        r = meta.kv_lora_rank or 512
        q_lora = 1536 if H >= 64 else 0
        if q_lora:
            s["attn_q_a"] = E * q_lora
            s["attn_q_b"] = q_lora * H * dk
        else:
            s["attn_q"] = E * H * dk
        s["attn_kv_a_mqa"] = E * meta.head_dim_k
        s["attn_k_b"] = r * H * (dk - (meta.head_dim_k - r))
        s["attn_v_b"] = r * H * (meta.head_dim_v_mla or 128)
        s["attn_output"] = H * (meta.head_dim_v_mla or 128) * E
    else:
        s["attn_q"] = E * H * meta.head_dim_k
        s["attn_k"] = E * meta.n_head_kv * meta.head_dim_k
        s["attn_v"] = E * meta.n_head_kv * meta.head_dim_v
        s["attn_output"] = H * meta.head_dim_v * E
    dense, exp, shexp = _ffn_widths(meta, il)
    if dense:
        for k in ("ffn_up", "ffn_gate", "ffn_down"):
            s[k] = E * dense
    else:
        s["ffn_gate_inp"] = E * meta.n_expert
        for k in ("ffn_up_exps", "ffn_gate_exps", "ffn_down_exps"):
            s[k] = E * exp * meta.n_expert
        if shexp:
            for k in ("ffn_up_shexp", "ffn_gate_shexp", "ffn_down_shexp"):
                s[k] = E * shexp
    return s


def _build(g: _Graph, meta: ModelMeta, p: LlamaParams, placement: list[str], caches: list[tuple[int, bool]],
           ub: int, n_out: int, build: int, swa: list[bool]) -> None:
    E, H = meta.n_embd, meta.n_head
    # llama.cpp pins each layer's norms to the layer's device under full offload or small batches
    pin = all(d != HOST for d in placement) or ub < OFFLOAD_MIN_BATCH
    fa = p.flash_attn
    f16_mask = fa and build >= NEW_RESERVE_BUILD
    tok = _T(ub * 4, HOST, is_input=True, fixed=True)
    pos = _T(ub * 4, HOST, is_input=True, fixed=True)
    masks: dict[bool, _T] = {}
    cells: dict[bool, int] = {}
    for n_kv, is_swa in caches:
        masks[is_swa] = _T(n_kv * ub * (2 if f16_mask else F32), HOST, is_input=True, fixed=True)
        cells[is_swa] = n_kv
    casts: dict[bool, _T] = {}
    out_ids = _T(n_out * 4, HOST, is_input=True, fixed=True) if n_out < ub else None
    # the input for embeddings given instead of tokens: in the graph (unused) since mid 2025
    # (a leaf no node reads: allocated first and never freed)
    embd_in = _T(ub * E * F32, HOST, is_input=True, is_output=True, fixed=True) if build >= EMBD_INPUT_BUILD else None
    cur = g.op(ub * E * F32, tok, weight="token_embd.weight", rows=ub, get_rows=True)
    if embd_in is not None:
        g.op(0, embd_in, dev=HOST)
    if meta.architecture.startswith("gemma"):
        cur = g.op(ub * E * F32, cur, inplace=True)  # scaled by sqrt(n_embd)
    T = ub
    for il in range(meta.n_layer):
        dev = g.home = placement[il]
        b = f"blk.{il}."
        is_swa = swa[il] if il < len(swa) else False
        mask = masks.get(is_swa, masks[False])
        n_kv = cells.get(is_swa, cells[False])
        if fa and not f16_mask:
            if is_swa not in casts:
                casts[is_swa] = g.op(n_kv * ub * 2, mask)  # ggml_cast to f16, on the first layer's device
            mask = casts[is_swa]
        inp = cur
        x = g.op(T * E * F32, inp, dev=dev if pin else None)  # rms_norm
        x = x_attn = g.op(T * E * F32, x, weight=b + "attn_norm.weight", inplace=True, rows=T)
        if meta.is_mla:
            att = _mla(g, meta, b, x, pos, mask, n_kv, T, dev, fa)
        else:
            att = _mha(g, meta, b, x, pos, mask, n_kv, T, dev, fa)
        att = g.op(T * E * F32, att, weight=b + "attn_output.weight", rows=T)
        if il == meta.n_layer - 1 and out_ids is not None:
            att = g.op(n_out * E * F32, att, out_ids)
            inp = g.op(n_out * E * F32, inp, out_ids)
            T = n_out
        if meta.architecture in PARALLEL_BLOCK:
            # attention and FFN both read the attention norm's output
            ffn = _ffn(g, meta, il, b, x_attn, T, build)
            res = g.op(T * E * F32, att, ffn, inplace=True)
            cur = g.op(T * E * F32, res, inp, inplace=True)
            continue
        res = g.op(T * E * F32, att, inp, inplace=True)
        x = g.op(T * E * F32, res, dev=dev if pin else None)
        x = g.op(T * E * F32, x, weight=b + "ffn_norm.weight", inplace=True, rows=T)
        ffn = _ffn(g, meta, il, b, x, T, build)
        cur = g.op(T * E * F32, ffn, res, inplace=True)
    g.home = placement[-1]
    x = g.op(n_out * E * F32, cur)
    x = g.op(n_out * E * F32, x, weight="output_norm.weight", inplace=True, rows=n_out)
    logits = g.op(n_out * meta.n_vocab * F32, x, weight="output.weight", rows=n_out)
    logits.is_output = True
    del H


def _mha(g: _Graph, meta: ModelMeta, b: str, x: _T, pos: _T, mask: _T, n_kv: int, T: int, dev: str,
         fa: bool) -> _T:
    H, dk, dv, hkv = meta.n_head, meta.head_dim_k, meta.head_dim_v, meta.n_head_kv
    q = g.op(T * H * dk * F32, x, weight=b + "attn_q.weight", rows=T)
    k = g.op(T * hkv * dk * F32, x, weight=b + "attn_k.weight", rows=T)
    v = g.op(T * hkv * dv * F32, x, weight=b + "attn_v.weight", rows=T)
    q = g.op(q.size, q, pos, inplace=True)  # rope
    k = g.op(k.size, k, pos, inplace=True)
    g.op(0, k, dev=dev)  # set_rows into the K cache
    g.op(0, v, dev=dev)
    if fa:
        return g.op(T * H * dv * F32, q, mask)
    kq = g.op(n_kv * T * H * F32, q)
    kq = g.op(kq.size, kq, mask, inplace=True)  # soft_max_ext
    kqv = g.op(T * H * dv * F32, kq)
    return g.op(kqv.size, kqv)  # cont of the permuted heads


def _mla(g: _Graph, meta: ModelMeta, b: str, x: _T, pos: _T, mask: _T, n_kv: int, T: int, dev: str,
         fa: bool) -> _T:
    """DeepSeek's multi-head latent attention with the absorbed K/V projections."""
    H = meta.n_head
    r = meta.kv_lora_rank or 512
    rope = meta.head_dim_k - r
    dk = meta.head_dim_k_mla or meta.head_dim_k
    dv = meta.head_dim_v_mla or 128
    if H >= 64:
        qa = g.op(T * 1536 * F32, x, weight=b + "attn_q_a.weight", rows=T)
        qa = g.op(qa.size, qa, inplace=True)
        q = g.op(T * H * dk * F32, qa, weight=b + "attn_q_b.weight", rows=T)
    else:
        q = g.op(T * H * dk * F32, x, weight=b + "attn_q.weight", rows=T)
    kv = g.op(T * meta.head_dim_k * F32, x, weight=b + "attn_kv_a_mqa.weight", rows=T)
    q_pe = g.op(T * H * rope * F32, q, pos)  # rope of a view
    k_pe = g.op(T * rope * F32, kv, pos)
    kv_c = g.op(T * r * F32, kv)  # norm of the compressed part
    q_abs = g.op(T * H * r * F32, q, weight=b + "attn_k_b.weight", rows=T)
    q_cat = g.op(T * H * meta.head_dim_k * F32, q_abs, q_pe)
    k_cat = g.op(T * meta.head_dim_k * F32, kv_c, k_pe)
    g.op(0, k_cat, dev=dev)
    if fa:
        o = g.op(T * H * r * F32, q_cat, mask)
    else:
        kq = g.op(n_kv * T * H * F32, q_cat)
        kq = g.op(kq.size, kq, mask, inplace=True)
        o = g.op(T * H * r * F32, kq)
    o = g.op(T * H * dv * F32, o, weight=b + "attn_v_b.weight", rows=T)
    return g.op(o.size, o)


def _ffn(g: _Graph, meta: ModelMeta, il: int, b: str, x: _T, T: int, build: int) -> _T:
    E = meta.n_embd
    dense, exp, shexp = _ffn_widths(meta, il)
    fused = build >= FUSED_GLU_BUILD  # before: silu(gate) and * up, both in place
    if dense:
        up = g.op(T * dense * F32, x, weight=b + "ffn_up.weight", rows=T)
        gate = g.op(T * dense * F32, x, weight=b + "ffn_gate.weight", rows=T)
        act = g.op(T * dense * F32, gate, up, inplace=not fused)  # swiglu/geglu
        return g.op(T * E * F32, act, weight=b + "ffn_down.weight", rows=T)
    k = max(1, meta.n_expert_used)
    if build < BATCHED_MOE_BUILD:
        logits = g.op(T * meta.n_expert * F32, x, weight=b + "ffn_gate_inp.weight", rows=T)
        probs = g.op(logits.size, logits, inplace=True)
        sel = g.op(T * meta.n_expert * 4, probs)
        moe: _T | None = None
        for _ in range(k):  # one expert slot at a time, summed as it goes
            up = g.op(T * exp * F32, x, sel, weight=b + "ffn_up_exps.weight", rows=T)
            gate = g.op(T * exp * F32, x, sel, weight=b + "ffn_gate_exps.weight", rows=T)
            act = g.op(up.size, gate, up, inplace=True)
            down = g.op(T * E * F32, act, sel, weight=b + "ffn_down_exps.weight", rows=T)
            down = g.op(down.size, down, probs, inplace=True)
            moe = down if moe is None else g.op(down.size, moe, down, inplace=True)
        assert moe is not None
        return moe
    logits = g.op(T * meta.n_expert * F32, x, weight=b + "ffn_gate_inp.weight", rows=T)
    probs = g.op(logits.size, logits, inplace=True)
    sel = g.op(T * meta.n_expert * 4, probs)  # argsort (top-k is a view)
    wts = g.op(T * k * F32, probs, sel)
    up = g.op(T * k * exp * F32, x, sel, weight=b + "ffn_up_exps.weight", rows=T)
    gate = g.op(T * k * exp * F32, x, sel, weight=b + "ffn_gate_exps.weight", rows=T)
    act = g.op(up.size, gate, up, inplace=not fused)
    down = g.op(T * k * E * F32, act, sel, weight=b + "ffn_down_exps.weight", rows=T)
    down = g.op(down.size, down, wts, inplace=True)
    moe = g.op(T * E * F32, down)  # sum over the experts' views
    if shexp:
        su = g.op(T * shexp * F32, x, weight=b + "ffn_up_shexp.weight", rows=T)
        sg = g.op(T * shexp * F32, x, weight=b + "ffn_gate_shexp.weight", rows=T)
        sa = g.op(su.size, sg, su, inplace=not fused)
        sd = g.op(T * E * F32, sa, weight=b + "ffn_down_shexp.weight", rows=T)
        moe = g.op(moe.size, moe, sd, inplace=True)
    return moe


# --- entry point -----------------------------------------------------------------------------

def _is_rpc(d: Device) -> bool:
    return d.id.startswith("RPC") or any(a.startswith("RPC[") for a in getattr(d, "aliases", ()))


def pipeline_parallel(devices: list[Device], placement: list[str], overridden: bool, build: int) -> bool:
    """llama.cpp's pipeline parallelism (n_copies = 4): several devices, every layer and the
    output offloaded, no tensor overrides, every device with async compute and events."""
    return (len(devices) > 1 and all(dev != HOST for dev in placement)
            and not (overridden and build >= OVERRIDES_NO_PP_BUILD)
            and not (any(_is_rpc(d) for d in devices) and build < RPC_EVENTS_BUILD))


def compute_buffers(meta: ModelMeta, p: LlamaParams, mem: dict[str, DeviceMemory], placement: list[str],
                    devices: list[Device], caches: list[tuple[int, bool]],
                    moved: dict[str, str] | None = None) -> None:
    """Set each device's `compute` (the host's includes its output buffer: one row of logits per
    sequence). `placement` is the device of each of the n_layer + 1 layers; `moved` maps the name
    of each tensor that a tensor override put somewhere other than its layer's device (e.g. the
    experts of a GPU layer kept in host memory by --n-cpu-moe) to the device it went to.
    `p.llama_build` (None: the release the tests build) selects the build's sizing rules."""
    moved = moved or {}
    build = p.llama_build or TESTED_BUILD
    n_ctx = pad(p.n_ctx or meta.n_ctx_train, 256)
    ub = min(p.n_ubatch, p.n_batch, n_ctx)
    # the worst-case graph's outputs: every token of the ubatch, or (llama-server since the
    # May 2026 change) one per slot
    n_out = min(ub, max(1, p.n_parallel)) if build >= NEW_RESERVE_BUILD else ub
    pipeline = pipeline_parallel(devices, placement, bool(moved) or bool(p.overrides), build)
    offload_to = None
    if build >= OP_OFFLOAD_BUILD:
        offload_to = next((d.id for d in devices if d.gpu and not _is_rpc(d)), None)
    shapes = {il: _layer_shapes(meta, il) for il in range(meta.n_layer)}
    weights = _tensor_weights(meta, placement, moved) if meta.tensors else \
        _group_weights(meta, placement, moved, shapes)
    for il in range(meta.n_layer):
        for suffix in ("attn_norm", "ffn_norm"):
            weights.setdefault(f"blk.{il}.{suffix}.weight", (placement[il], 0))
    swa = list(meta.swa_layers or []) if meta.sliding_window else []
    g = _Graph(meta, weights)
    g.home = HOST
    _build(g, meta, p, placement, caches, ub, n_out, build, swa)
    _assign(g.nodes, offload_to)
    nodes, leafs = _split_copies(g.nodes, N_COPIES if pipeline else 1)
    sizes = _gallocr(nodes, leafs)
    for dev_id, dm in mem.items():
        dm.compute = sizes.get(dev_id, 0)
    if build >= TESTED_BUILD and placement and meta.n_layer:
        # fitted to the tested build's own figures (docs/accuracy.md, recorded cases): the device
        # that runs the first layer holds one more f32 tensor of the query's width per ubatch
        # token than the replayed graph accounts for (2.02 MiB at ubatch 512 on Gemma 3 270M)
        mem[placement[0]].compute += ub * meta.n_head * (meta.head_dim_k_mla or meta.head_dim_k) * F32
    mem[HOST].compute += meta.n_vocab * F32 * max(1, p.n_parallel)
