"""Tensor overrides (-ot, --cpu-moe, --n-cpu-moe), the CPU repack and recurrent state in the
llama.cpp estimator, on metadata whose every tensor is known, so each figure is exact."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np
import pytest

from clusterctl.errors import MetadataError
from clusterctl.models.gguf_reader import read_local
from clusterctl.models.meta import ModelMeta, TensorEntry, TensorGroupBytes
from clusterctl.planner.llama import HOST, Device, LlamaParams, OverrideError, estimate_llama, resolve_buft
from clusterctl.planner.llama_base import MOE_EXPERTS_REGEX, moe_overrides
from tests import assets

MIB = 2**20
EXPERT = 10 * MIB  # one ffn_*_exps tensor
ATTN = 1 * MIB


def moe_meta(n_layer: int = 4, expert_type: str = "Q6_K") -> ModelMeta:
    tensors = [TensorEntry(name="token_embd.weight", type="Q8_0", bytes=4 * MIB, rows=1000),
               TensorEntry(name="output.weight", type="Q6_K", bytes=3 * MIB, rows=1000),
               TensorEntry(name="output_norm.weight", type="F32", bytes=1024, rows=1)]
    for il in range(n_layer):
        tensors.append(TensorEntry(name=f"blk.{il}.attn_q.weight", type="Q8_0", bytes=ATTN, rows=256))
        for part in ("gate", "up", "down"):
            tensors.append(TensorEntry(name=f"blk.{il}.ffn_{part}_exps.weight", type=expert_type, bytes=EXPERT,
                                       rows=512))
    per_layer = ATTN + 3 * EXPERT
    return ModelMeta(format="gguf", architecture="qwen3moe", n_layer=n_layer, n_embd=256, n_head=4, n_head_kv=2,
                     head_dim_k=64, head_dim_v=64, n_vocab=1000, n_ctx_train=4096, n_ff=512, n_expert=8,
                     n_expert_used=2, n_ff_exp=128,
                     tensor_bytes=TensorGroupBytes(token_embd=4 * MIB, output=3 * MIB + 1024,
                                                   layers=[per_layer] * n_layer),
                     tensors=tensors)


def gpus(n: int = 2) -> list[Device]:
    return [Device(f"dev{i}", 8 << 30, aliases=(f"CUDA{i}",)) for i in range(n)]


def weights(est: object) -> dict[str, int]:
    return {k: d.weights for k, d in est.devices.items()}  # type: ignore[attr-defined]


def test_without_overrides_the_layers_split_over_the_gpus() -> None:
    est = estimate_llama(moe_meta(), LlamaParams(n_ctx=1024), gpus())
    # 4 layers + the output layer over 2 equal GPUs by llama.cpp's cumulative split (layer i
    # goes where i/5 falls): layers 0-2 on dev0, layer 3 and the output on dev1
    assert weights(est) == {HOST: 4 * MIB, "dev0": 3 * (ATTN + 3 * EXPERT),
                            "dev1": ATTN + 3 * EXPERT + 3 * MIB + 1024}


def test_cpu_moe_keeps_every_expert_in_host_memory() -> None:
    p = LlamaParams(n_ctx=1024, overrides=moe_overrides(True, 0))
    est = estimate_llama(moe_meta(), p, gpus())
    assert weights(est) == {HOST: 4 * MIB + 12 * EXPERT, "dev0": 3 * ATTN, "dev1": ATTN + 3 * MIB + 1024}
    assert est.devices[HOST].moved_in == 12 * EXPERT and est.devices[HOST].repack == 0  # Q6_K: no x86 repack


def test_n_cpu_moe_moves_the_experts_of_the_first_n_layers() -> None:
    assert moe_overrides(False, 2) == ((rf"blk\.0{MOE_EXPERTS_REGEX}", "CPU"), (rf"blk\.1{MOE_EXPERTS_REGEX}", "CPU"))
    est = estimate_llama(moe_meta(), LlamaParams(n_ctx=1024, overrides=moe_overrides(False, 2)), gpus())
    assert weights(est) == {HOST: 4 * MIB + 6 * EXPERT, "dev0": 3 * ATTN + 3 * EXPERT,
                            "dev1": ATTN + 3 * EXPERT + 3 * MIB + 1024}


def test_first_matching_override_wins_and_names_a_gpu() -> None:
    # layer 3's experts to CUDA0, then every other expert to the CPU (seed 003's style)
    p = LlamaParams(n_ctx=1024, overrides=((r"blk\.3\..*_exps\.", "CUDA0"), (r"_exps\.", "CPU")))
    est = estimate_llama(moe_meta(), p, gpus())
    assert weights(est) == {HOST: 4 * MIB + 9 * EXPERT, "dev0": 3 * ATTN + 3 * EXPERT,
                            "dev1": ATTN + 3 * MIB + 1024}
    assert est.devices["dev0"].moved_in == 3 * EXPERT


def test_experts_in_host_memory_are_repacked_beside_the_mapping() -> None:
    meta = moe_meta(expert_type="Q4_K")  # Q4_K with rows % 8 == 0: the AVX2 repack applies
    mapped = estimate_llama(meta, LlamaParams(n_ctx=1024, overrides=moe_overrides(True, 0)), gpus())
    read = estimate_llama(meta, LlamaParams(n_ctx=1024, overrides=moe_overrides(True, 0), mmap=False), gpus())
    assert mapped.devices[HOST].repack == 12 * EXPERT
    assert mapped.devices[HOST].weights == 4 * MIB + 24 * EXPERT
    assert read.devices[HOST].weights == 4 * MIB + 12 * EXPERT and read.devices[HOST].repack == 0
    off = estimate_llama(meta, LlamaParams(n_ctx=1024, overrides=moe_overrides(True, 0), repack=False), gpus())
    assert off.devices[HOST].weights == 4 * MIB + 12 * EXPERT


def test_an_unknown_buffer_type_is_refused_with_the_devices_named() -> None:
    with pytest.raises(OverrideError, match=r"buffer type 'CUDA2' is none of this instance's devices "
                                            r"\(CPU, dev0 = CUDA0, dev1 = CUDA1\)"):
        estimate_llama(moe_meta(), LlamaParams(overrides=((r"exps", "CUDA2"),)), gpus())
    rpc = [Device("n2/cpu", 8 << 30, gpu=False, aliases=("RPC[10.0.0.2:50052]",))]
    assert resolve_buft("RPC[10.0.0.2:50052]", rpc) == "n2/cpu"
    assert resolve_buft("CPU", rpc) == HOST


def test_overrides_without_a_tensor_list_are_a_metadata_error() -> None:
    meta = moe_meta().model_copy(update={"tensors": None})
    with pytest.raises(MetadataError, match="tensor overrides need the model's tensor list"):
        estimate_llama(meta, LlamaParams(overrides=moe_overrides(True, 0)), gpus())


def write_hybrid(path: Path, arch: str, keys: Mapping[str, int | list[int]], n_layer: int, n_embd: int = 256) -> None:
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(n_layer)
    w.add_context_length(262144)
    w.add_embedding_length(n_embd)
    w.add_head_count(16)
    w.add_vocab_size(100)
    for key, value in keys.items():
        if isinstance(value, list):
            w.add_array(f"{arch}.{key}", value)
        else:
            w.add_uint32(f"{arch}.{key}", value)
    w.add_tensor("token_embd.weight", np.zeros((100, n_embd), dtype=np.float32))
    assets.finish(w)


QWEN3_NEXT = {"attention.head_count_kv": 2, "attention.key_length": 256, "attention.value_length": 256,
              "ssm.conv_kernel": 4, "ssm.inner_size": 4096, "ssm.state_size": 128, "ssm.group_count": 16,
              "ssm.time_step_rank": 32, "full_attention_interval": 4}


def test_qwen3_next_recurrent_state_matches_llama_cpp(tmp_path: Path) -> None:
    """Qwen3-Next 80B-A3B (48 layers, every 4th full attention): llama.cpp's published logs give
    an RS buffer of 301.50 MiB at 4 slots, 75.375 MiB per sequence, for any context."""
    write_hybrid(tmp_path / "q3n.gguf", "qwen3next", QWEN3_NEXT, n_layer=48, n_embd=2048)
    meta = read_local(tmp_path / "q3n.gguf")
    assert meta.recurrent and meta.recurrent_state is not None
    assert (meta.recurrent_state.r, meta.recurrent_state.s) == (3 * (4096 + 2 * 16 * 128), 128 * 4096)
    assert sum(meta.recurrent_layers or []) == 36
    for slots, ctx, rs_mib in ((4, 8192, 301.50), (1, 131072, 75.375)):
        est = estimate_llama(meta, LlamaParams(n_ctx=ctx, n_parallel=slots, kv_unified=True), [])
        (rs,) = [c for c in est.caches if c.recurrent]
        (kv,) = [c for c in est.caches if not c.recurrent]
        assert (rs.cells, rs.layers, rs.total / MIB) == (slots, 36, rs_mib)
        # the 12 attention layers: 2 KV heads x 256 x f16, K and V
        assert (kv.layers, kv.total) == (12, 12 * ctx * 2 * 256 * 2 * 2)


def test_qwen35_27b_recurrent_state_matches_llama_cpp(tmp_path: Path) -> None:
    """A 64-layer Qwen3.5-style hybrid (d_inner 6144): the published log reads R (f32) 5.62 MiB,
    S (f32) 144.00 MiB, 149.62 MiB in all, for one sequence."""
    keys = dict(QWEN3_NEXT, **{"ssm.inner_size": 6144, "attention.head_count_kv": 4})
    write_hybrid(tmp_path / "q35.gguf", "qwen35", keys, n_layer=64, n_embd=5120)
    est = estimate_llama(read_local(tmp_path / "q35.gguf"), LlamaParams(n_ctx=131072, n_parallel=1), [])
    (rs,) = [c for c in est.caches if c.recurrent]
    assert (round(rs.k_bytes / MIB, 2), rs.v_bytes / MIB, round(rs.total / MIB, 2)) == (5.62, 144.0, 149.62)
    (kv,) = [c for c in est.caches if not c.recurrent]
    assert (kv.cells, kv.layers, kv.total / MIB) == (131072, 16, 8192.0)


def test_nemotron_h_layers_are_mamba_attention_or_mlp(tmp_path: Path) -> None:
    """Nemotron-H marks its layers by per-layer arrays: KV heads > 0 is attention, FFN width > 0
    is an MLP, neither is a Mamba-2 layer. Only the attention layers get a KV cache."""
    kv = [0, 0, 8, 0, 0, 8]
    ff = [0, 1024, 0, 0, 1024, 0]
    keys = {"attention.head_count_kv": kv, "feed_forward_length": ff, "attention.key_length": 128,
            "attention.value_length": 128, "ssm.conv_kernel": 4, "ssm.inner_size": 512, "ssm.state_size": 128,
            "ssm.group_count": 8, "ssm.time_step_rank": 8}
    write_hybrid(tmp_path / "nh.gguf", "nemotron_h", keys, n_layer=6)
    meta = read_local(tmp_path / "nh.gguf")
    assert meta.recurrent_layers == [True, False, False, True, False, False]
    assert meta.n_head_kv_layers == kv
    est = estimate_llama(meta, LlamaParams(n_ctx=1024, n_parallel=1), [])
    (attn,) = [c for c in est.caches if not c.recurrent]
    (rs,) = [c for c in est.caches if c.recurrent]
    assert (attn.layers, attn.total) == (2, 2 * 1024 * 8 * 128 * 2 * 2)
    assert (rs.layers, rs.total) == (2, 2 * 4 * (3 * (512 + 2 * 8 * 128) + 128 * 512))


def test_layers_without_kv_heads_get_no_cache(tmp_path: Path) -> None:
    """A per-layer head_count_kv with zeros (Nemotron's pruned 'deci' layers): the cache counts
    each layer's own heads, not the largest for every layer."""
    keys = {"attention.head_count_kv": [8, 0, 0, 4], "attention.key_length": 128, "attention.value_length": 128}
    write_hybrid(tmp_path / "deci.gguf", "deci", keys, n_layer=4)
    meta = read_local(tmp_path / "deci.gguf")
    assert not meta.recurrent
    est = estimate_llama(meta, LlamaParams(n_ctx=1024, n_parallel=1), [])
    (kv,) = est.caches
    assert (kv.layers, kv.total) == (2, 1024 * (8 + 4) * 128 * 2 * 2)
