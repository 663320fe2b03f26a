"""Writes the lock files of the bundled example inventories.

The example clusters' models (DeepSeek V3, Qwen2.5 72B, ...) are far too large to fetch in a
test, and `clusterctl resolve` needs the hub. Their metadata is pinned here from each model's
public config.json (architecture) and the published file size of the named quantisation; the
split of bytes between embedding, output and layers follows the parameter counts.

    python tools/example_locks.py          # rewrite inventories/*.lock
    python tools/example_locks.py --check  # exit 1 if a lock differs (run by the tests)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from clusterctl.inventory import load_inventory
from clusterctl.lockfile import LockedModel, LockFile, lock_path, read_lock, write_lock
from clusterctl.models.meta import ModelMeta, TensorEntry, TensorGroupBytes

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Arch:
    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx_train: int
    n_ff: int
    n_params: int
    tied: bool = False
    head_dim_v: int | None = None
    n_expert: int = 0
    n_expert_used: int = 0
    n_expert_shared: int = 0
    kv_lora_rank: int | None = None
    mla_k: int | None = None
    n_rot: int | None = None
    sliding_window: int | None = None
    swa_pattern: int | None = None
    extra: dict[str, int] = field(default_factory=dict)
    n_ff_exp: int | None = None  # one expert's FFN width (moe_intermediate_size)
    n_dense: int = 0  # leading dense layers of an MoE model (first_k_dense_replace)


# Facts from each model's config.json on the Hugging Face hub (num_hidden_layers, hidden_size,
# num_attention_heads, num_key_value_heads, head_dim, vocab_size, max_position_embeddings,
# intermediate_size) and its parameter count.
ARCHS: dict[str, Arch] = {
    # Qwen2.5-72B-Instruct (OR1-Behemoth 73B is a depth-upscaled Qwen2 model of the same width)
    "qwen2.5-72b": Arch("qwen2", 80, 8192, 64, 8, 128, 152064, 32768, 29568, 72_700_000_000),
    "or1-behemoth-73b": Arch("qwen2", 80, 8192, 64, 8, 128, 152064, 32768, 29568, 73_000_000_000),
    "qwen2.5-14b": Arch("qwen2", 48, 5120, 40, 8, 128, 152064, 32768, 13824, 14_770_000_000),
    "qwen2.5-7b": Arch("qwen2", 28, 3584, 28, 4, 128, 152064, 32768, 18944, 7_620_000_000),
    "qwen2.5-coder-32b": Arch("qwen2", 64, 5120, 40, 8, 128, 152064, 32768, 27648, 32_760_000_000),
    # DeepSeek-V3 / V3.1: 61 layers (3 dense), MLA with kv_lora_rank 512 and 64 rope dims
    "deepseek-v3": Arch("deepseek2", 61, 7168, 128, 128, 192, 129280, 163840, 18432,
                        671_000_000_000, head_dim_v=128, n_expert=256, n_expert_used=8,
                        n_expert_shared=1, kv_lora_rank=512, mla_k=576, n_rot=64, n_ff_exp=2048, n_dense=3),
    "llama3.1-70b": Arch("llama", 80, 8192, 64, 8, 128, 128256, 131072, 28672, 70_600_000_000),
    "llama3.1-8b": Arch("llama", 32, 4096, 32, 8, 128, 128256, 131072, 14336, 8_030_000_000),
    "llama3.2-1b": Arch("llama", 16, 2048, 32, 8, 64, 128256, 131072, 8192, 1_240_000_000, tied=True),
    "llama3.2-3b": Arch("llama", 28, 3072, 24, 8, 128, 128256, 131072, 8192, 3_210_000_000, tied=True),
    "qwen2-57b-a14b": Arch("qwen2moe", 28, 3584, 28, 4, 128, 151936, 32768, 18944, 57_400_000_000,
                           n_expert=64, n_expert_used=8, n_expert_shared=8, n_ff_exp=2560),
    "qwen3-coder-30b-a3b": Arch("qwen3moe", 48, 2048, 32, 4, 128, 151936, 262144, 6144,
                                30_500_000_000, n_expert=128, n_expert_used=8, n_ff_exp=768),
    "gpt-oss-20b": Arch("gpt-oss", 24, 2880, 64, 8, 64, 201088, 131072, 2880, 20_900_000_000,
                        n_expert=32, n_expert_used=4, sliding_window=128, swa_pattern=2, n_ff_exp=2880),
    "minimax-m2.1": Arch("minimax-m2", 62, 3072, 48, 8, 128, 200064, 196608, 1536, 229_000_000_000,
                         n_expert=256, n_expert_used=8, n_ff_exp=1536),
    "gemma-3-270m": Arch("gemma3", 18, 640, 4, 1, 256, 262144, 32768, 2048, 268_000_000, tied=True,
                         sliding_window=512, swa_pattern=6),
    # LLM360/K2-Think: a fine-tune of Qwen/Qwen2.5-32B (base_model in its card), so the same shape
    "k2-think-32b": Arch("qwen2", 64, 5120, 40, 8, 128, 152064, 32768, 27648, 32_760_000_000),
    # bigcode/starcoder2-15b; its sliding_window 4096 is not applied by llama.cpp's starcoder2 graph
    "starcoder2-15b": Arch("starcoder2", 40, 6144, 48, 4, 128, 49152, 16384, 24576, 15_960_000_000),
}


@dataclass(frozen=True)
class Pinned:
    arch: str
    quant: str
    file_bytes: int
    files: tuple[str, ...]
    fmt: str = "gguf"


def moe_tensors(a: Arch, p: Pinned, embd: int, output: int, layer_bytes: int) -> list[TensorEntry] | None:
    """A GGUF MoE model's tensors as llama.cpp names them, sized from the config at the file's
    mean bytes per parameter: per layer the routed experts (ffn_{gate,up,down}_exps), the shared
    expert, the dense FFN of the leading dense layers, and the attention (the rest of the layer's
    bytes, the same for every layer), so that tensor overrides can be planned."""
    if p.fmt != "gguf" or not a.n_expert or not a.n_ff_exp:
        return None
    bpp = p.file_bytes / a.n_params
    quant = p.quant.removeprefix("UD-").split("_")
    qtype = "_".join(quant[:2]) if len(quant) > 1 and len(quant[1]) == 1 else quant[0]
    experts = int(a.n_expert * a.n_embd * a.n_ff_exp * bpp)  # one of gate / up / down
    shared = int(a.n_expert_shared * a.n_embd * a.n_ff_exp * bpp)
    dense = int(a.n_embd * a.n_ff * bpp)
    n_moe = a.n_layer - a.n_dense
    attn = (layer_bytes * a.n_layer - n_moe * 3 * (experts + shared) - a.n_dense * 3 * dense) // a.n_layer
    out = [TensorEntry(name="token_embd.weight", type=qtype, bytes=embd, rows=a.n_vocab)]
    if output:
        out.append(TensorEntry(name="output.weight", type=qtype, bytes=output, rows=a.n_vocab))
    for il in range(a.n_layer):
        out.append(TensorEntry(name=f"blk.{il}.attn.weight", type=qtype, bytes=attn, rows=a.n_embd))
        for part in ("gate", "up", "down"):
            if il < a.n_dense:
                out.append(TensorEntry(name=f"blk.{il}.ffn_{part}.weight", type=qtype, bytes=dense, rows=a.n_ff))
                continue
            out.append(TensorEntry(name=f"blk.{il}.ffn_{part}_exps.weight", type=qtype, bytes=experts,
                                   rows=a.n_ff_exp))
            if shared:
                out.append(TensorEntry(name=f"blk.{il}.ffn_{part}_shexp.weight", type=qtype, bytes=shared,
                                       rows=a.n_ff_exp))
    return out


def meta_for(p: Pinned, source: str) -> ModelMeta:
    a = ARCHS[p.arch]
    bytes_per_param = p.file_bytes / a.n_params
    embd = int(a.n_vocab * a.n_embd * bytes_per_param)
    output = 0 if a.tied else embd
    per_layer = (p.file_bytes - embd - output) // a.n_layer
    swa = None
    if a.sliding_window and a.swa_pattern:
        swa = [il % a.swa_pattern < a.swa_pattern - 1 for il in range(a.n_layer)]
    return ModelMeta(
        format=p.fmt,  # type: ignore[arg-type]
        source="pinned from the model's public config.json and published file size",
        architecture=a.architecture, file_type=p.quant, files=list(p.files), file_bytes=p.file_bytes,
        n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_head,
        n_head_kv=1 if a.mla_k else a.n_head_kv,
        head_dim_k=a.mla_k or a.head_dim,
        head_dim_v=a.kv_lora_rank if a.mla_k and a.kv_lora_rank else a.head_dim_v or a.head_dim,
        n_vocab=a.n_vocab, n_ctx_train=a.n_ctx_train, n_ff=a.n_ff,
        sliding_window=a.sliding_window, swa_layers=swa,
        n_expert=a.n_expert, n_expert_used=a.n_expert_used, n_expert_shared=a.n_expert_shared,
        kv_lora_rank=a.kv_lora_rank,
        head_dim_k_mla=a.head_dim if a.mla_k else None,
        head_dim_v_mla=(a.head_dim_v or a.head_dim) if a.mla_k else None, n_rot=a.n_rot,
        n_ff_exp=a.n_ff_exp,
        tensor_bytes=TensorGroupBytes(token_embd=embd, output=output, layers=[per_layer] * a.n_layer),
        tensors=moe_tensors(a, p, embd, output, per_layer),
        weight_dtype_bytes=round(bytes_per_param, 4) if p.fmt != "gguf" else None,
        n_params=a.n_params,
    )


# model source (as written in the inventories) -> what it is
PINNED: dict[str, Pinned] = {}


def pin(source: str, arch: str, quant: str, gb: float, files: tuple[str, ...] = (), fmt: str = "gguf"
        ) -> None:
    name = source.rsplit("/", 1)[-1]
    PINNED[source] = Pinned(arch, quant, int(gb * 1e9), files or (name,), fmt)


def _load_table() -> None:
    from examples_table import register  # type: ignore[import-not-found]

    register(pin)


# Models whose real header was read with `clusterctl inspect --json` (the file is small enough
# to ship in a test package): their lock entry is the real metadata, not a synthesis.
REAL: dict[str, Path] = {
    "hf://unsloth/gemma-3-270m-it-GGUF/gemma-3-270m-it-Q4_K_M.gguf":
        Path(__file__).resolve().parent / "data" / "gemma-3-270m-q4_k_m.meta.json",
}


def build(inventory: Path) -> LockFile:
    inv = load_inventory(inventory)
    models: dict[str, LockedModel] = {}
    for name, model in inv.models.items():
        if model.source in REAL:
            meta = ModelMeta.model_validate_json(REAL[model.source].read_text())
            models[name] = LockedModel(source=model.source, revision=None, meta=meta)
            continue
        p = PINNED.get(model.source)
        if p is None:
            continue
        models[name] = LockedModel(source=model.source, revision=None, meta=meta_for(p, model.source))
    return LockFile(models=models)


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    _load_table()
    check = "--check" in argv
    stale = []
    for inventory in sorted((ROOT / "inventories").glob("*.yaml")):
        lock = build(inventory)
        if not lock.models:
            continue
        path = lock_path(inventory)
        if check:
            if read_lock(path) != lock:
                stale.append(path.name)
        else:
            write_lock(path, lock)
            print(f"wrote {path.relative_to(ROOT)} ({len(lock.models)} models)")
    if stale:
        print(f"stale lock files: {', '.join(stale)}; run python tools/example_locks.py")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
