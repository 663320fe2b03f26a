"""Model metadata of safetensors / MLX checkpoints from config.json (+ the safetensors index).

Reads a local model directory or a hub repository (config.json and
model.safetensors.index.json over HTTP, safetensors headers with range requests).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from clusterctl.errors import MetadataError
from clusterctl.models import remote
from clusterctl.models.meta import ModelMeta, TensorGroupBytes

Format = Literal["safetensors", "mlx"]
ReadAt = Callable[[int, int], bytes]

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_SHARD_HEADERS = 16
_HEADER_PROBE = 64 << 10
_MAX_HEADER = 100 << 20

_NESTED_KEYS = ("text_config", "llm_config", "language_config", "thinker_config")
_DTYPE_BYTES = {
    "float32": 4.0,
    "float": 4.0,
    "float16": 2.0,
    "half": 2.0,
    "bfloat16": 2.0,
    "float8_e4m3fn": 1.0,
    "float8_e5m2": 1.0,
    "int8": 1.0,
    "uint8": 1.0,
}
_DTYPE_LABEL = {"float32": "F32", "float": "F32", "float16": "F16", "half": "F16", "bfloat16": "BF16"}
# HF model_type -> period of the interleaved sliding-window layout when the config lists no
# layer_types (a layer il uses the window iff il % period < period - 1).
_SWA_PERIOD = {
    "gemma2": 2,
    "gemma3": 6,
    "gemma3_text": 6,
    "cohere2": 4,
    "gpt_oss": 2,
    "llama4": 4,
    "llama4_text": 4,
    "exaone4": 4,
}
_SLIDING_LAYER_TYPES = frozenset({"sliding_attention", "chunked_attention", "local_attention"})
_LAYER_RE = re.compile(r"^(?:model\.|language_model\.|transformer\.|backbone\.|decoder\.)*(?:layers|h|blocks)\.(\d+)\.")
_EMBED_RE = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|tok_embeddings|embeddings)\.")
_OUTPUT_RE = re.compile(
    r"^(?:lm_head\.|(?:model\.|language_model\.|transformer\.)*(?:norm|ln_f|final_layernorm|final_norm)\.)"
)


@dataclass(frozen=True)
class SafetensorsTensor:
    dtype: str
    shape: tuple[int, ...]
    n_bytes: int


# ---------------------------------------------------------------------------------------------
# config.json -> ModelMeta


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language-model part of a (possibly multimodal) config."""
    for key in _NESTED_KEYS:
        nested = config.get(key)
        if isinstance(nested, Mapping):
            if "num_hidden_layers" in nested or "hidden_size" in nested:
                return nested
            inner = _text_config(nested)
            if inner is not nested:
                return inner
    return config


def _num(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


class _Cfg:
    """Looks keys up in the text config first, then in the top-level config."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.top = config
        self.text = _text_config(config)

    def get(self, *names: str) -> Any:
        for cfg in (self.text, self.top):
            for n in names:
                if cfg.get(n) is not None:
                    return cfg[n]
        return None

    def num(self, *names: str) -> int | None:
        return _num(self.get(*names))

    def required(self, *names: str) -> int:
        v = self.num(*names)
        if v is None:
            raise MetadataError(
                f"config.json has no {names[0]}",
                "this does not look like a transformers language-model config",
            )
        return v


def _dtype_name(cfg: _Cfg) -> str | None:
    v = cfg.get("torch_dtype", "dtype")
    if isinstance(v, str):
        return v.removeprefix("torch.").lower()
    return None


def _quantization(cfg: _Cfg) -> tuple[str | None, float | None]:
    """(file_type label, bytes per weight) of MLX or HF quantised checkpoints."""
    mlx = cfg.top.get("quantization")
    if isinstance(mlx, Mapping) and _num(mlx.get("bits")):
        bits = _num(mlx["bits"]) or 0
        group = _num(mlx.get("group_size")) or 64
        mode = mlx.get("mode", "affine")
        if mode == "affine":
            # a 16-bit scale and a 16-bit bias per group
            return f"{bits}bit", (bits + 32 / group) / 8
        return str(mode), (bits + 8 / group) / 8
    qc = cfg.get("quantization_config")
    if isinstance(qc, Mapping):
        method = str(qc.get("quant_method", "quantized"))
        qbits = _num(qc.get("bits"))
        if method == "fp8":
            return "fp8", 1.0
        if method == "mxfp4":
            return "mxfp4", 4.25 / 8
        if method == "bitsandbytes":
            if qc.get("load_in_4bit"):
                return "bnb-4bit", 0.5
            return "bnb-8bit", 1.0
        if qbits:
            return f"{method}-{qbits}bit", qbits / 8
        return method, None
    return None, None


def _swa(cfg: _Cfg, arch: str, n_layer: int) -> tuple[int | None, list[bool] | None]:
    window = cfg.num("sliding_window")
    if cfg.get("use_sliding_window") is False:
        window = None
    if window is None and arch in ("llama4", "llama4_text"):
        window = cfg.num("attention_chunk_size")
    if not window:
        return None, None
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and layer_types:
        flags = [str(t) in _SLIDING_LAYER_TYPES for t in layer_types[:n_layer]]
        flags += [False] * (n_layer - len(flags))
        return (window, flags) if any(flags) else (None, None)
    period = cfg.num("sliding_window_pattern") or _SWA_PERIOD.get(arch)
    if period:
        return window, [il % period < period - 1 for il in range(n_layer)]
    first_windowed = cfg.num("max_window_layers") if cfg.get("use_sliding_window") else None
    if first_windowed is not None:
        flags = [il >= first_windowed for il in range(n_layer)]
        return (window, flags) if any(flags) else (None, None)
    return window, [True] * n_layer


def group_safetensors(tensors: Mapping[str, SafetensorsTensor], n_layer: int) -> TensorGroupBytes:
    """Sum tensor bytes by role: token embedding, output (head + final norm), layers, other."""
    token_embd = output = other = 0
    layers = [0] * n_layer
    for name, t in tensors.items():
        if m := _LAYER_RE.match(name):
            il = int(m.group(1))
            if il >= len(layers):
                layers.extend([0] * (il + 1 - len(layers)))
            layers[il] += t.n_bytes
        elif _OUTPUT_RE.match(name):
            output += t.n_bytes
        elif _EMBED_RE.search(name) and not re.search(r"vision|visual|audio|image", name):
            token_embd += t.n_bytes
        else:
            other += t.n_bytes
    return TensorGroupBytes(token_embd=token_embd, output=output, layers=layers, other=other)


def meta_from_hf_config(
    config: Mapping[str, Any],
    *,
    safetensors_index: Mapping[str, Any] | None,
    file_sizes: Mapping[str, int],
    format: Format | None = None,
    source: str | None = None,
    revision: str | None = None,
    tensors: Mapping[str, SafetensorsTensor] | None = None,
    header_bytes_read: int = 0,
    files: Sequence[str] | None = None,
) -> ModelMeta:
    """Map a transformers config.json (and optional index / tensor headers) to a ModelMeta.

    `file_sizes` maps weight file names to their sizes; `tensors` (from the safetensors
    headers) gives exact per-layer bytes when known.
    """
    cfg = _Cfg(config)
    arch = config.get("model_type") or cfg.text.get("model_type")
    if not isinstance(arch, str):
        archs = config.get("architectures")
        arch = archs[0] if isinstance(archs, list) and archs else None
    if not isinstance(arch, str):
        raise MetadataError("config.json has no model_type")
    n_layer = cfg.required("num_hidden_layers", "n_layer", "num_layers")
    n_embd = cfg.required("hidden_size", "d_model", "n_embd")
    n_head = cfg.required("num_attention_heads", "n_head", "num_heads")
    n_head_kv = cfg.num("num_key_value_heads", "num_kv_heads", "n_head_kv")
    if n_head_kv is None:
        n_head_kv = 1 if cfg.get("multi_query") else n_head
    head_dim = cfg.num("head_dim") or (n_embd // n_head if n_head else 0)
    head_dim_k = head_dim_v = head_dim
    kv_lora_rank = cfg.num("kv_lora_rank")
    k_mla = v_mla = None
    n_rot = cfg.num("rotary_dim")
    factor = cfg.get("partial_rotary_factor")
    if n_rot is None and isinstance(factor, int | float) and not isinstance(factor, bool):
        n_rot = int(head_dim * factor)
    if kv_lora_rank is not None:
        rope = cfg.num("qk_rope_head_dim") or 0
        nope = cfg.num("qk_nope_head_dim") or 0
        head_dim_k = k_mla = nope + rope
        v_mla = cfg.num("v_head_dim") or head_dim
        head_dim_v = v_mla
        n_rot = rope or n_rot
    n_vocab = cfg.required("vocab_size", "n_vocab", "padded_vocab_size")
    n_ctx = cfg.required("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
    window, swa_layers = _swa(cfg, arch, n_layer)

    n_expert = cfg.num("num_local_experts", "n_routed_experts", "num_experts", "moe_num_experts") or 0
    n_expert_used = cfg.num("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k") or 0
    n_shared = cfg.num("n_shared_experts", "num_shared_experts") or 0
    if not n_shared and (cfg.num("shared_expert_intermediate_size") or 0) > 0:
        n_shared = 1

    dtype = _dtype_name(cfg)
    file_type, weight_bytes = _quantization(cfg)
    if file_type is None and dtype is not None:
        file_type = _DTYPE_LABEL.get(dtype)
        weight_bytes = _DTYPE_BYTES.get(dtype)
    fmt: Format = format or ("mlx" if isinstance(config.get("quantization"), Mapping) else "safetensors")

    weights_total = sum(file_sizes.values())
    index_meta = (safetensors_index or {}).get("metadata") or {}
    if not weights_total:
        weights_total = _num(index_meta.get("total_size")) or 0
    n_params = _num(index_meta.get("total_parameters"))
    quantized = cfg.top.get("quantization") is not None or cfg.get("quantization_config") is not None
    if n_params is None and tensors and not quantized:
        n_params = 0
        for t in tensors.values():
            n = 1
            for d in t.shape:
                n *= d
            n_params += n
    return ModelMeta(
        format=fmt,
        source=source,
        revision=revision,
        name=config.get("_name_or_path") if isinstance(config.get("_name_or_path"), str) else None,
        architecture=arch,
        file_type=file_type,
        files=sorted(files if files is not None else file_sizes),
        file_bytes=weights_total,
        header_bytes_read=header_bytes_read,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        n_vocab=n_vocab,
        n_ctx_train=n_ctx,
        n_ff=cfg.num("intermediate_size", "ffn_dim", "n_inner"),
        sliding_window=window,
        swa_layers=swa_layers,
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        n_expert_shared=n_shared,
        kv_lora_rank=kv_lora_rank,
        head_dim_k_mla=k_mla,
        head_dim_v_mla=v_mla,
        n_rot=n_rot,
        recurrent=arch in ("mamba", "mamba2", "rwkv", "rwkv6", "rwkv7"),
        tensor_bytes=group_safetensors(tensors, n_layer) if tensors else TensorGroupBytes(),
        weight_dtype_bytes=weight_bytes,
        n_params=n_params or None,
    )


# ---------------------------------------------------------------------------------------------
# safetensors headers


def read_safetensors_header(read_at: ReadAt, *, label: str) -> tuple[dict[str, SafetensorsTensor], int]:
    """Tensor table of one safetensors file and the number of bytes read for it."""
    head = read_at(0, _HEADER_PROBE)
    got = len(head)
    if len(head) < 8:
        raise MetadataError(f"{label} is not a safetensors file (too short)")
    (n,) = struct.unpack_from("<Q", head)
    if n > _MAX_HEADER:
        raise MetadataError(f"{label} is not a safetensors file (header of {n} bytes)")
    if 8 + n > len(head):
        more = read_at(len(head), 8 + n - len(head))
        got += len(more)
        head += more
    if 8 + n > len(head):
        raise MetadataError(f"{label}: the safetensors header is truncated")
    try:
        table = json.loads(head[8 : 8 + n])
    except ValueError as exc:
        raise MetadataError(f"{label}: the safetensors header is not JSON ({exc})") from exc
    if not isinstance(table, dict):
        raise MetadataError(f"{label}: the safetensors header is not a JSON object")
    out: dict[str, SafetensorsTensor] = {}
    for name, info in table.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        start, end = info.get("data_offsets", (0, 0))
        shape = tuple(int(d) for d in info.get("shape", ()))
        out[name] = SafetensorsTensor(str(info.get("dtype", "")), shape, int(end) - int(start))
    return out, got


def _index_shards(index: Mapping[str, Any], label: str) -> list[str]:
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise MetadataError(f"{label}: {INDEX_FILE} has no weight_map")
    return sorted({str(v) for v in weight_map.values()})


def _load_json(data: bytes, label: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise MetadataError(f"{label} is not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise MetadataError(f"{label} is not a JSON object")
    return value


# ---------------------------------------------------------------------------------------------
# local directory


def read_local_hf_dir(path: Path, *, format: Format | None = None) -> ModelMeta:
    """Metadata of a local safetensors / MLX model directory."""
    path = Path(path)
    if path.is_file() and path.name == CONFIG_FILE:
        path = path.parent
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise MetadataError(f"{path} has no {CONFIG_FILE}", "point at a transformers/MLX model directory")
    config = _load_json(config_path.read_bytes(), str(config_path))
    read = config_path.stat().st_size
    index: dict[str, Any] | None = None
    index_path = path / INDEX_FILE
    if index_path.is_file():
        index = _load_json(index_path.read_bytes(), str(index_path))
        read += index_path.stat().st_size
        shards = _index_shards(index, str(path))
        for shard in shards:
            if not (path / shard).is_file():
                raise MetadataError(
                    f"safetensors shard {shard} is missing from {path}",
                    "download every file listed in model.safetensors.index.json",
                )
    else:
        shards = sorted(p.name for p in path.glob("*.safetensors"))
        if not shards:
            raise MetadataError(f"{path} has no .safetensors weights")
    sizes: dict[str, int] = {}
    tensors: dict[str, SafetensorsTensor] = {}
    for shard in shards:
        shard_path = path / shard
        sizes[shard] = shard_path.stat().st_size
        with shard_path.open("rb") as f:

            def read_at(offset: int, length: int, f: Any = f) -> bytes:
                f.seek(offset)
                data: bytes = f.read(length)
                return data

            table, got = read_safetensors_header(read_at, label=str(shard_path))
        tensors.update(table)
        read += got
    return meta_from_hf_config(
        config,
        safetensors_index=index,
        file_sizes=sizes,
        format=format,
        source=str(path),
        tensors=tensors,
        header_bytes_read=read,
        files=shards,
    )


# ---------------------------------------------------------------------------------------------
# hub / remote


def _get(client: httpx.Client, url: str, token: str | None, label: str) -> tuple[bytes | None, str | None]:
    """GET a small file: (body, x-repo-commit); body None on 404."""
    headers = {"Accept-Encoding": "identity"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    response = remote.with_backoff(lambda: client.get(url, headers=headers, follow_redirects=True), label, url)
    commit = None
    for r in (*response.history, response):
        commit = r.headers.get("x-repo-commit") or commit
    if response.status_code == 404 and response.headers.get("x-error-code") in (None, "EntryNotFound"):
        return None, commit
    if response.status_code >= 400:
        remote.raise_for_status(response, label)
    return response.content, commit


def read_hf_config(
    source: str | remote.Source,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    client: httpx.Client | None = None,
    format: Format | None = None,
    max_shard_headers: int = MAX_SHARD_HEADERS,
) -> ModelMeta:
    """Metadata of a hub (or file://) safetensors / MLX repository without the weights.

    `hf://org/repo[@rev][/subfolder]`: config.json, the index and, for up to
    `max_shard_headers` shards, the safetensors headers (range requests) are read.
    """
    src = source if isinstance(source, remote.Source) else remote.parse_source(source)
    if src.scheme == "file":
        return read_local_hf_dir(Path(src.path), format=format)
    if src.scheme != "hf":
        raise MetadataError(f"{src}: safetensors metadata is read from hf:// or local sources")
    if src.is_glob:
        remote.source_url(src)
    token = remote.token_for(remote.hf_endpoint(endpoint), remote.hf_token(token), endpoint=endpoint)
    folder = src.path.strip("/")

    def url(name: str) -> str:
        return remote.source_url(src.with_path(f"{folder}/{name}" if folder else name), endpoint=endpoint)

    http = client or httpx.Client(timeout=remote.DEFAULT_TIMEOUT)
    try:
        body, commit = _get(http, url(CONFIG_FILE), token, f"{src}/{CONFIG_FILE}")
        if body is None:
            raise MetadataError(
                f"{src}: {CONFIG_FILE} not found",
                "check the repository id and revision; GGUF repos need the .gguf file path",
            )
        config = _load_json(body, f"{src}/{CONFIG_FILE}")
        read = len(body)
        index_body, _ = _get(http, url(INDEX_FILE), token, f"{src}/{INDEX_FILE}")
        index: dict[str, Any] | None = None
        if index_body is not None:
            read += len(index_body)
            index = _load_json(index_body, f"{src}/{INDEX_FILE}")
            shards = _index_shards(index, str(src))
        else:
            shards = [SINGLE_FILE]
        sizes: dict[str, int] = {}
        tensors: dict[str, SafetensorsTensor] | None = {} if len(shards) <= max_shard_headers else None
        if tensors is not None:
            for shard in shards:
                with remote.HttpRangeReader(url(shard), token=token, client=http, label=f"{src}/{shard}") as reader:
                    table, _ = read_safetensors_header(reader.read_at, label=f"{src}/{shard}")
                    read += reader.bytes_read
                    if reader.size is not None:
                        sizes[shard] = reader.size
                    commit = commit or reader.repo_commit
                tensors.update(table)
    finally:
        if client is None:
            http.close()
    return meta_from_hf_config(
        config,
        safetensors_index=index,
        file_sizes=sizes,
        format=format,
        source=str(src),
        revision=commit or src.revision,
        tensors=tensors,
        header_bytes_read=read,
        files=shards,
    )
