"""Safetensors / MLX metadata from config.json, the index and the safetensors headers."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clusterctl.errors import MetadataError
from clusterctl.models.hf_config import (
    meta_from_hf_config,
    read_hf_config,
    read_local_hf_dir,
)
from tests.nginx_server import NginxServer, hub_layout, nginx_server

DTYPE_SIZE = {"BF16": 2, "F16": 2, "F32": 4, "U32": 4, "F8_E4M3": 1}

LLAMA3_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
}

GEMMA3_4B: dict[str, Any] = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    "torch_dtype": "bfloat16",
    "text_config": {
        "model_type": "gemma3_text",
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 34,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "sliding_window": 1024,
        "sliding_window_pattern": 6,
        "max_position_embeddings": 131072,
        "vocab_size": 262208,
    },
    "vision_config": {"hidden_size": 1152, "num_hidden_layers": 27, "model_type": "siglip"},
}

DEEPSEEK_V3: dict[str, Any] = {
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "vocab_size": 129280,
    "max_position_embeddings": 163840,
    "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
}


def meta(config: dict[str, Any], **kw: Any) -> Any:
    kw.setdefault("safetensors_index", None)
    kw.setdefault("file_sizes", {})
    return meta_from_hf_config(config, **kw)


# ---------------------------------------------------------------------------------------------
# config mapping


def test_llama3_8b() -> None:
    index = {"metadata": {"total_size": 16_060_522_496}, "weight_map": {}}
    m = meta(LLAMA3_8B, safetensors_index=index, source="hf://meta-llama/Meta-Llama-3-8B")
    assert m.format == "safetensors"
    assert m.architecture == "llama"
    assert (m.n_layer, m.n_embd, m.n_head, m.n_head_kv) == (32, 4096, 32, 8)
    assert (m.head_dim_k, m.head_dim_v) == (128, 128)
    assert (m.n_vocab, m.n_ctx_train, m.n_ff) == (128256, 8192, 14336)
    assert m.sliding_window is None and m.swa_layers is None
    assert m.file_type == "BF16" and m.weight_dtype_bytes == 2.0
    assert m.file_bytes == 16_060_522_496 == m.weights_bytes
    assert not m.is_moe and not m.is_mla and not m.recurrent


def test_file_sizes_win_over_index_total() -> None:
    index = {"metadata": {"total_size": 100}}
    m = meta(LLAMA3_8B, safetensors_index=index, file_sizes={"a.safetensors": 70, "b.safetensors": 50})
    assert m.file_bytes == 120
    assert m.files == ["a.safetensors", "b.safetensors"]


def test_gemma3_multimodal_text_config() -> None:
    m = meta(GEMMA3_4B)
    assert m.architecture == "gemma3"
    assert (m.n_layer, m.n_embd, m.n_head, m.n_head_kv) == (34, 2560, 8, 4)
    assert (m.head_dim_k, m.head_dim_v) == (256, 256)
    assert (m.n_vocab, m.n_ctx_train, m.n_ff) == (262208, 131072, 10240)
    assert m.sliding_window == 1024
    assert m.swa_layers == [il % 6 < 5 for il in range(34)]
    assert m.weight_dtype_bytes == 2.0


def test_layer_types_list() -> None:
    text = dict(GEMMA3_4B["text_config"], num_hidden_layers=4)
    text["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    del text["sliding_window_pattern"]
    m = meta({"model_type": "gemma3", "text_config": text})
    assert m.swa_layers == [True, False, True, False]
    text["layer_types"] = ["full_attention"] * 4
    m = meta({"model_type": "gemma3", "text_config": text})
    assert m.sliding_window is None and m.swa_layers is None


def test_gemma2_pattern_without_layer_types() -> None:
    cfg = dict(LLAMA3_8B, model_type="gemma2", num_hidden_layers=6, sliding_window=4096)
    assert meta(cfg).swa_layers == [True, False] * 3


def test_sliding_window_flags() -> None:
    qwen2 = dict(
        LLAMA3_8B,
        model_type="qwen2",
        num_hidden_layers=4,
        sliding_window=32768,
        use_sliding_window=False,
        max_window_layers=2,
    )
    assert meta(qwen2).sliding_window is None
    qwen2["use_sliding_window"] = True
    assert meta(qwen2).swa_layers == [False, False, True, True]
    mistral = dict(LLAMA3_8B, model_type="mistral", num_hidden_layers=3, sliding_window=4096)
    m = meta(mistral)
    assert m.sliding_window == 4096 and m.swa_layers == [True, True, True]
    assert meta(dict(mistral, sliding_window=None)).sliding_window is None


def test_deepseek_v3_mla_moe_fp8() -> None:
    m = meta(DEEPSEEK_V3)
    assert m.architecture == "deepseek_v3"
    assert (m.n_layer, m.n_embd, m.n_head, m.n_head_kv) == (61, 7168, 128, 128)
    assert (m.head_dim_k, m.head_dim_v) == (192, 128)
    assert (m.kv_lora_rank, m.head_dim_k_mla, m.head_dim_v_mla, m.n_rot) == (512, 192, 128, 64)
    assert m.is_mla and m.is_moe
    assert (m.n_expert, m.n_expert_used, m.n_expert_shared) == (256, 8, 1)
    assert m.file_type == "fp8" and m.weight_dtype_bytes == 1.0


def test_moe_key_variants() -> None:
    mixtral = dict(LLAMA3_8B, model_type="mixtral", num_local_experts=8, num_experts_per_tok=2)
    assert (meta(mixtral).n_expert, meta(mixtral).n_expert_used) == (8, 2)
    qwen2moe = dict(
        LLAMA3_8B, model_type="qwen2_moe", num_experts=60, num_experts_per_tok=4, shared_expert_intermediate_size=5632
    )
    m = meta(qwen2moe)
    assert (m.n_expert, m.n_expert_used, m.n_expert_shared) == (60, 4, 1)


def test_gpt_oss_mxfp4() -> None:
    cfg = dict(
        LLAMA3_8B,
        model_type="gpt_oss",
        num_hidden_layers=4,
        head_dim=64,
        sliding_window=128,
        num_local_experts=32,
        num_experts_per_tok=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
        quantization_config={"quant_method": "mxfp4"},
    )
    m = meta(cfg)
    assert m.swa_layers == [True, False, True, False] and m.sliding_window == 128
    assert m.file_type == "mxfp4" and m.weight_dtype_bytes == 4.25 / 8
    assert m.head_dim_k == 64


def test_mlx_quantized() -> None:
    cfg = dict(LLAMA3_8B, model_type="qwen3", quantization={"group_size": 64, "bits": 4})
    m = meta(cfg)
    assert m.format == "mlx"
    assert m.file_type == "4bit"
    assert m.weight_dtype_bytes == (4 + 32 / 64) / 8
    cfg8 = dict(cfg, quantization={"group_size": 32, "bits": 8})
    assert meta(cfg8).file_type == "8bit"
    assert meta(LLAMA3_8B, format="mlx").format == "mlx"


def test_missing_keys() -> None:
    with pytest.raises(MetadataError, match="num_hidden_layers"):
        meta({"model_type": "x", "hidden_size": 8})
    with pytest.raises(MetadataError, match="model_type"):
        meta({"hidden_size": 8})


# ---------------------------------------------------------------------------------------------
# local directories with real safetensors files


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = DTYPE_SIZE[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(offset))


TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "vocab_size": 100,
    "torch_dtype": "bfloat16",
}


def tiny_tensors(il: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    p = f"model.layers.{il}."
    return {
        p + "input_layernorm.weight": ("BF16", (64,)),
        p + "self_attn.q_proj.weight": ("BF16", (64, 64)),
        p + "self_attn.k_proj.weight": ("BF16", (32, 64)),
        p + "self_attn.v_proj.weight": ("BF16", (32, 64)),
        p + "self_attn.o_proj.weight": ("BF16", (64, 64)),
        p + "mlp.gate_proj.weight": ("BF16", (128, 64)),
        p + "mlp.up_proj.weight": ("BF16", (128, 64)),
        p + "mlp.down_proj.weight": ("BF16", (64, 128)),
    }


LAYER_BYTES = 2 * (64 + 64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 128 * 64)


def write_tiny_repo(directory: Path, *, sharded: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(TINY))
    first = {"model.embed_tokens.weight": ("BF16", (100, 64)), **tiny_tensors(0)}
    second = {**tiny_tensors(1), "model.norm.weight": ("BF16", (64,)), "lm_head.weight": ("BF16", (100, 64))}
    if not sharded:
        write_safetensors(directory / "model.safetensors", {**first, **second})
        return directory
    shards = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}
    weight_map: dict[str, str] = {}
    for name, tensors in shards.items():
        write_safetensors(directory / name, tensors)
        weight_map |= dict.fromkeys(tensors, name)
    total = (100 * 64 * 2) * 2 + 64 * 2 + 2 * LAYER_BYTES
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def test_local_sharded_dir(tmp_path: Path) -> None:
    repo = write_tiny_repo(tmp_path / "tiny")
    m = read_local_hf_dir(repo)
    assert m.format == "safetensors" and m.architecture == "llama"
    assert (m.n_layer, m.n_embd, m.n_head, m.n_head_kv, m.head_dim_k) == (2, 64, 4, 2, 16)
    assert m.files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert m.file_bytes == sum(p.stat().st_size for p in repo.glob("*.safetensors"))
    assert m.tensor_bytes.token_embd == 100 * 64 * 2
    assert m.tensor_bytes.output == 100 * 64 * 2 + 64 * 2
    assert m.tensor_bytes.layers == [LAYER_BYTES, LAYER_BYTES]
    assert m.tensor_bytes.other == 0
    assert m.n_params == 2 * 100 * 64 + 64 + LAYER_BYTES  # LAYER_BYTES / 2 per layer, two layers
    assert m.header_bytes_read > 0


def test_local_single_file_dir(tmp_path: Path) -> None:
    sharded = read_local_hf_dir(write_tiny_repo(tmp_path / "a"))
    single = read_local_hf_dir(write_tiny_repo(tmp_path / "b", sharded=False))
    assert single.files == ["model.safetensors"]
    assert single.tensor_bytes == sharded.tensor_bytes


def test_local_missing_shard_and_config(tmp_path: Path) -> None:
    repo = write_tiny_repo(tmp_path / "tiny")
    (repo / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MetadataError, match=r"shard model-00002-of-00002\.safetensors is missing"):
        read_local_hf_dir(repo)
    with pytest.raises(MetadataError, match=r"has no config\.json"):
        read_local_hf_dir(tmp_path)


# ---------------------------------------------------------------------------------------------
# hub layout over nginx

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxServer]:
    models = tmp_path_factory.mktemp("repos")
    sharded = write_tiny_repo(models / "sharded")
    single = write_tiny_repo(models / "single", sharded=False)
    root = tmp_path_factory.mktemp("www")
    hub_layout(root, "acme/tiny-llama", "main", {p.name: p for p in sharded.iterdir()})
    hub_layout(root, "acme/tiny-single", "main", {p.name: p for p in single.iterdir()})
    locations = f"""
        add_header X-Repo-Commit {COMMIT};
        location /private/ {{ return 401; }}
    """
    with nginx_server(root, tmp_path_factory.mktemp("nginx"), locations=locations) as srv:
        yield srv


@pytest.fixture
def hub(hub_server: NginxServer, monkeypatch: pytest.MonkeyPatch) -> NginxServer:
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return hub_server


@pytest.mark.real
@pytest.mark.parametrize("repo", ["acme/tiny-llama", "acme/tiny-single"])
def test_hub_repo_equals_local(hub: NginxServer, repo: str) -> None:
    local = read_local_hf_dir(hub.root / repo / "resolve" / "main")
    remote = read_hf_config(f"hf://{repo}")
    assert remote.model_dump(exclude={"source", "revision"}) == local.model_dump(exclude={"source", "revision"})
    assert remote.source == f"hf://{repo}" and remote.revision == COMMIT


@pytest.mark.real
def test_hub_without_shard_headers(hub: NginxServer) -> None:
    m = read_hf_config("hf://acme/tiny-llama", max_shard_headers=0)
    assert m.tensor_bytes.total == 0
    assert m.file_bytes == m.weights_bytes == (100 * 64 * 2) * 2 + 64 * 2 + 2 * LAYER_BYTES
    assert m.files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


@pytest.mark.real
def test_hub_errors(hub: NginxServer) -> None:
    with pytest.raises(MetadataError, match=r"config\.json not found"):
        read_hf_config("hf://acme/nothing-here")
    with pytest.raises(MetadataError, match=r"HTTP 401") as info:
        read_hf_config("hf://private/repo")
    assert info.value.hint is not None and "HF_TOKEN" in info.value.hint
