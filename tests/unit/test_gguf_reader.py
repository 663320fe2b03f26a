"""The fast GGUF header reader against synthetic files and the real Gemma 3 270M GGUF."""

from __future__ import annotations

import json
import struct
import time
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest

from clusterctl.errors import MetadataError
from clusterctl.models import gguf_reader
from clusterctl.models.gguf_reader import (
    GGUFHeader,
    file_read_at,
    file_type_label,
    read_gguf_header,
    read_header_file,
    read_local,
    split_part_names,
)
from tests import assets

Q4_K_BYTES = 144  # per 256 weights
Q8_0_BYTES = 34  # per 32 weights


def _reader_groups(paths: list[Path]) -> tuple[dict[str, int], list[int]]:
    """Tensor bytes grouped like the ModelMeta, computed with gguf.GGUFReader."""
    groups: Counter[str] = Counter()
    layers: Counter[int] = Counter()
    for p in paths:
        for t in gguf.GGUFReader(p).tensors:
            if t.name.startswith("token_embd."):
                groups["token_embd"] += int(t.n_bytes)
            elif t.name.startswith(("output.", "output_norm.")):
                groups["output"] += int(t.n_bytes)
            elif t.name.startswith("blk."):
                layers[int(t.name.split(".")[1])] += int(t.n_bytes)
            else:
                groups["other"] += int(t.n_bytes)
    return dict(groups), [layers[i] for i in range(len(layers))]


def _assert_same_as_gguf_reader(path: Path) -> GGUFHeader:
    """Every tensor info and every scalar value equals what gguf.GGUFReader reads."""
    ours = read_header_file(path)
    ref = gguf.GGUFReader(path)
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for mine, theirs in zip(ours.tensors, ref.tensors, strict=True):
        assert mine.shape == tuple(int(d) for d in theirs.shape)
        assert mine.ggml_type == int(theirs.tensor_type)
        assert mine.n_bytes == int(theirs.n_bytes)
        assert ours.data_offset + mine.offset == int(theirs.data_offset)
    assert ours.data_offset == ref.data_offset
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            assert ours.array_lengths[key] == len(field.data)
            if key in ours.metadata:
                assert ours.metadata[key] == field.contents()
        else:
            assert ours.metadata[key] == pytest.approx(field.contents())
    return ours


# ---------------------------------------------------------------------------------------------
# synthetic models


def test_llama_like_with_gqa(tmp_path: Path) -> None:
    path = assets.write_llama_like(tmp_path / "tiny.gguf")
    meta = read_local(path)
    layer = (
        2 * 256 * 4  # attn_norm, ffn_norm (F32)
        + 2 * 256 * 256 // 256 * Q4_K_BYTES  # attn_q, attn_output
        + 2 * 256 * 64 // 32 * Q8_0_BYTES  # attn_k, attn_v
        + 2 * 256 * 512 // 256 * Q4_K_BYTES  # ffn_gate, ffn_up
        + 512 * 256 // 32 * Q8_0_BYTES  # ffn_down
    )
    assert layer == 397_312
    assert meta.format == "gguf"
    assert meta.name == "Tiny Llama"
    assert meta.architecture == "llama"
    assert meta.file_type == "Q8_0"
    assert meta.files == ["tiny.gguf"]
    assert meta.file_bytes == path.stat().st_size
    assert (meta.n_layer, meta.n_embd, meta.n_head, meta.n_head_kv) == (4, 256, 8, 2)
    assert (meta.head_dim_k, meta.head_dim_v) == (32, 32)
    assert (meta.n_vocab, meta.n_ctx_train, meta.n_ff, meta.n_rot) == (5000, 4096, 512, 32)
    assert meta.sliding_window is None and meta.swa_layers is None
    assert (meta.n_expert, meta.n_expert_used, meta.n_expert_shared) == (0, 0, 0)
    assert meta.kv_lora_rank is None and not meta.is_mla and not meta.recurrent
    assert meta.tensor_bytes.token_embd == 256 * 5000 // 32 * Q8_0_BYTES == 1_360_000
    assert meta.tensor_bytes.output == 1_360_000 + 256 * 4
    assert meta.tensor_bytes.layers == [layer] * 4
    assert meta.tensor_bytes.other == 64  # rope_freqs.weight
    groups, layers = _reader_groups([path])
    assert meta.tensor_bytes.layers == layers
    assert groups == {
        "token_embd": meta.tensor_bytes.token_embd,
        "output": meta.tensor_bytes.output,
        "other": meta.tensor_bytes.other,
    }
    assert 0 < meta.header_bytes_read <= meta.file_bytes


def test_header_equals_gguf_reader(tmp_path: Path) -> None:
    for path in (
        assets.write_llama_like(tmp_path / "a.gguf"),
        assets.write_swa_model(tmp_path / "b.gguf", "gemma3", pattern=[True, False] * 4),
        assets.write_deepseek2_like(tmp_path / "c.gguf"),
    ):
        _assert_same_as_gguf_reader(path)


def test_big_arrays_are_skipped_and_counted(tmp_path: Path) -> None:
    header = read_header_file(assets.write_llama_like(tmp_path / "t.gguf", n_vocab=5000))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        assert header.array_lengths[key] == 5000
        assert key not in header.metadata
    assert header.metadata["general.tags"] == ["text-generation", "test"]


def test_small_numeric_array_is_kept_and_max_taken(tmp_path: Path) -> None:
    path = assets.write_llama_like(tmp_path / "t.gguf", head_count_kv=[2, 4, 1, 2])
    assert read_header_file(path).metadata["llama.attention.head_count_kv"] == [2, 4, 1, 2]
    assert read_local(path).n_head_kv == 4


@pytest.mark.parametrize("first_chunk", [1, 7, 100, 4096])
def test_tiny_chunks_give_the_same_header(tmp_path: Path, first_chunk: int) -> None:
    path = assets.write_llama_like(tmp_path / "t.gguf", n_vocab=3000)
    whole = read_header_file(path)
    with path.open("rb") as f:
        small = read_gguf_header(file_read_at(f), size=path.stat().st_size, first_chunk=first_chunk)
    assert small.metadata == whole.metadata
    assert small.tensors == whole.tensors
    assert small.array_lengths == whole.array_lengths
    assert small.data_offset == whole.data_offset


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        ("gemma3", [True, True, True, True, True, False, True, True]),
        ("gemma2", [True, False] * 4),
        ("cohere2", [True, True, True, False] * 2),
        ("gpt-oss", [True, False] * 4),
        ("smallthinker", [False, True, True, True] * 2),
    ],
)
def test_swa_pattern_hard_coded_per_arch(tmp_path: Path, arch: str, expected: list[bool]) -> None:
    meta = read_local(assets.write_swa_model(tmp_path / "m.gguf", arch, n_layer=8, window=512))
    assert meta.sliding_window == 512
    assert meta.swa_layers == expected


def test_swa_pattern_stored_in_file(tmp_path: Path) -> None:
    flags = [True, False, False, True, True, False, True, False]
    meta = read_local(assets.write_swa_model(tmp_path / "a.gguf", "gemma3", pattern=flags))
    assert meta.swa_layers == flags
    period = read_local(assets.write_swa_model(tmp_path / "b.gguf", "gemma3", pattern=3))
    assert period.swa_layers == [True, True, False] * 2 + [True, True]


def test_swa_defaults_and_unknown_arch(tmp_path: Path) -> None:
    gemma2 = read_local(assets.write_swa_model(tmp_path / "a.gguf", "gemma2", window=None))
    assert gemma2.sliding_window == 4096  # llama.cpp's default for gemma2
    assert gemma2.swa_layers == [True, False] * 4
    gemma3 = read_local(assets.write_swa_model(tmp_path / "b.gguf", "gemma3", window=None))
    assert gemma3.sliding_window is None and gemma3.swa_layers is None
    # llama.cpp does not use the window of archs it has no pattern for
    other = read_local(assets.write_swa_model(tmp_path / "c.gguf", "qwen2", window=4096))
    assert other.sliding_window is None and other.swa_layers is None
    stored = read_local(assets.write_swa_model(tmp_path / "d.gguf", "mimo2", window=128, pattern=[True, False] * 4))
    assert stored.sliding_window == 128 and stored.swa_layers == [True, False] * 4


def test_deepseek2_mla_and_experts(tmp_path: Path) -> None:
    path = assets.write_deepseek2_like(tmp_path / "ds.gguf")
    meta = read_local(path)
    assert meta.architecture == "deepseek2" and meta.file_type == "F16"
    assert (meta.n_layer, meta.n_embd, meta.n_head, meta.n_head_kv) == (3, 64, 4, 1)
    assert (meta.head_dim_k, meta.head_dim_v) == (96, 64)
    assert (meta.kv_lora_rank, meta.head_dim_k_mla, meta.head_dim_v_mla) == (64, 48, 32)
    assert meta.is_mla and meta.is_moe
    assert (meta.n_expert, meta.n_expert_used, meta.n_expert_shared) == (8, 2, 1)
    assert (meta.n_vocab, meta.n_ctx_train, meta.n_rot) == (400, 163840, 32)
    layer = 96 * 64 * 2 + 8 * 32 * 64 * 2
    assert meta.tensor_bytes.layers == [layer] * 3
    assert meta.tensor_bytes.token_embd == meta.tensor_bytes.output == 400 * 64 * 2
    assert meta.n_params == 2 * 400 * 64 + 3 * (96 * 64 + 8 * 32 * 64)
    assert read_header_file(path).array_lengths["tokenizer.ggml.merges"] == 200


def test_mla_sizes_absent_without_mla_keys(tmp_path: Path) -> None:
    meta = read_local(assets.write_llama_like(tmp_path / "t.gguf"))
    assert meta.head_dim_k_mla is None and meta.head_dim_v_mla is None


def test_recurrent_arch(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(tmp_path / "mamba.gguf", "mamba")
    w.add_block_count(2)
    w.add_context_length(1 << 20)
    w.add_embedding_length(64)
    w.add_head_count(0)
    w.add_vocab_size(100)
    w.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float32))
    assets.finish(w)
    meta = read_local(tmp_path / "mamba.gguf")
    assert meta.recurrent
    assert (meta.n_head, meta.n_head_kv, meta.head_dim_k, meta.head_dim_v) == (0, 0, 0, 0)
    assert meta.n_vocab == 100


def test_vocab_from_token_embd_when_no_tokenizer(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    w.add_block_count(1)
    w.add_context_length(512)
    w.add_embedding_length(32)
    w.add_head_count(4)
    w.add_tensor("token_embd.weight", np.zeros((77, 32), dtype=np.float32))
    assets.finish(w)
    assert read_local(tmp_path / "m.gguf").n_vocab == 77


# ---------------------------------------------------------------------------------------------
# split models


def test_split_model_sums_all_parts(tmp_path: Path) -> None:
    parts = assets.write_split_model(tmp_path, "tiny", 3)
    (tmp_path / "single").mkdir()
    single = read_local(assets.write_llama_like(tmp_path / "single" / "tiny.gguf"))
    meta = read_local(parts[0])
    assert meta.files == [p.name for p in parts]
    assert meta.file_bytes == sum(p.stat().st_size for p in parts)
    assert meta.tensor_bytes == single.tensor_bytes
    assert meta.n_params == single.n_params
    same = {"files", "file_bytes", "header_bytes_read", "source"}
    assert meta.model_dump(exclude=same) == single.model_dump(exclude=same)
    groups, layers = _reader_groups(parts)
    assert meta.tensor_bytes.layers == layers
    assert meta.tensor_bytes.token_embd == groups["token_embd"]
    assert meta.tensor_bytes.output == groups["output"]
    # any part names the whole set
    assert read_local(parts[1]) == meta
    first = read_header_file(parts[0])
    assert first.metadata["split.count"] == 3
    assert first.metadata["split.tensors.count"] == 40
    assert sum(len(read_header_file(p).tensors) for p in parts) == 40


def test_split_missing_part(tmp_path: Path) -> None:
    parts = assets.write_split_model(tmp_path, "tiny", 3)
    parts[2].unlink()
    with pytest.raises(MetadataError, match=r"tiny-00003-of-00003\.gguf is missing"):
        read_local(parts[0])


def test_split_part_renamed(tmp_path: Path) -> None:
    parts = assets.write_split_model(tmp_path, "tiny", 3)
    lone = parts[0].rename(tmp_path / "renamed.gguf")
    with pytest.raises(MetadataError, match="3-part split GGUF"):
        read_local(lone)


def test_split_part_names() -> None:
    assert split_part_names("m-00002-of-00003.gguf") == [
        "m-00001-of-00003.gguf",
        "m-00002-of-00003.gguf",
        "m-00003-of-00003.gguf",
    ]
    assert split_part_names("dir/sub/Big-Q4_K_M-00001-of-00002.gguf") == [
        "dir/sub/Big-Q4_K_M-00001-of-00002.gguf",
        "dir/sub/Big-Q4_K_M-00002-of-00002.gguf",
    ]
    assert split_part_names("plain.gguf") == ["plain.gguf"]
    assert split_part_names("x-1-of-2.gguf") == ["x-1-of-2.gguf"]
    with pytest.raises(MetadataError):
        split_part_names("m-00004-of-00003.gguf")


# ---------------------------------------------------------------------------------------------
# malformed files


def test_big_endian_rejected(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(tmp_path / "be.gguf", "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_block_count(1)
    assets.finish(w)
    with pytest.raises(MetadataError, match="big-endian"):
        read_local(tmp_path / "be.gguf")


def test_not_gguf(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"<html>not found</html>")
    with pytest.raises(MetadataError, match="not a GGUF file"):
        read_local(tmp_path / "x.gguf")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match="does not exist"):
        read_local(tmp_path / "nope.gguf")


def test_truncated_header(tmp_path: Path) -> None:
    path = assets.write_llama_like(tmp_path / "t.gguf")
    data = path.read_bytes()
    cut = read_header_file(path).data_offset - 100
    path.write_bytes(data[:cut])
    with pytest.raises(MetadataError, match="ends inside its header"):
        read_local(path)


def _set_version(path: Path, version: int) -> None:
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", version)
    path.write_bytes(bytes(data))


def test_version_2_reads_like_3(tmp_path: Path) -> None:
    path = assets.write_llama_like(tmp_path / "t.gguf")
    v3 = read_local(path)
    _set_version(path, 2)
    assert read_header_file(path).version == 2
    assert read_local(path) == v3


def test_version_1_rejected(tmp_path: Path) -> None:
    path = assets.write_llama_like(tmp_path / "t.gguf")
    _set_version(path, 1)
    with pytest.raises(MetadataError, match="unsupported GGUF version 1"):
        read_local(path)


def test_missing_architecture(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    w.add_block_count(1)
    assets.finish(w)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "m.gguf").write_bytes(data.replace(b"general.architecture", b"general.architectur_"))
    with pytest.raises(MetadataError, match=r"general\.architecture is missing"):
        read_local(tmp_path / "m.gguf")


def test_file_type_labels() -> None:
    assert file_type_label(15) == "Q4_K_M"
    assert file_type_label(0) == "F32"
    assert file_type_label(1) == "F16"
    assert file_type_label(32) == "BF16"
    assert file_type_label(1024) is None
    assert file_type_label(9999) is None
    assert file_type_label(None) is None


# ---------------------------------------------------------------------------------------------
# the real Gemma 3 270M Q4_K_M GGUF

GEMMA_LAYER_BYTES = [
    3995648, 3995648, 3596288, 3596288, 3995648, 3596288, 3596288, 3995648, 3596288,
    3596288, 3995648, 3596288, 3596288, 3995648, 3596288, 3995648, 3995648, 3995648,
]  # fmt: skip


@pytest.mark.real
def test_gemma_exact_metadata() -> None:
    path = assets.test_model_path()
    meta = read_local(path)
    assert meta.format == "gguf"
    assert meta.name == "Gemma 3 270m"
    assert meta.architecture == "gemma3"
    assert meta.file_type == "Q4_K_M"
    assert meta.files == ["gemma-3-270m-q4_k_m.gguf"]
    assert meta.file_bytes == 253_113_024
    assert meta.n_layer == 18
    assert meta.n_embd == 640
    assert (meta.n_head, meta.n_head_kv) == (4, 1)
    assert (meta.head_dim_k, meta.head_dim_v) == (256, 256)
    assert meta.n_vocab == 262_144
    assert meta.n_ctx_train == 32_768
    assert meta.n_ff == 2048
    assert meta.sliding_window == 512
    assert meta.swa_layers == [il % 6 < 5 for il in range(18)]
    assert [il for il, swa in enumerate(meta.swa_layers) if not swa] == [5, 11, 17]
    assert (meta.n_expert, meta.n_expert_used, meta.n_expert_shared) == (0, 0, 0)
    assert meta.kv_lora_rank is None and meta.head_dim_k_mla is None
    assert meta.n_rot is None
    assert not meta.recurrent
    assert meta.tensor_bytes.token_embd == 178_257_920
    assert meta.tensor_bytes.output == 2560
    assert meta.tensor_bytes.layers == GEMMA_LAYER_BYTES
    assert meta.tensor_bytes.other == 0
    assert meta.tensor_bytes.total == 246_587_904
    assert meta.n_params == 268_098_176
    header = read_header_file(path)
    assert header.version == 3
    assert (header.tensor_count, header.kv_count) == (236, 33)
    assert header.data_offset == 6_525_120
    assert header.array_lengths["tokenizer.ggml.tokens"] == 262_144
    assert header.array_lengths["tokenizer.ggml.scores"] == 262_144
    assert header.array_lengths["tokenizer.ggml.token_type"] == 262_144
    assert meta.header_bytes_read == header.bytes_read
    print(f"\nGemma header: {meta.header_bytes_read} bytes read of {meta.file_bytes}")


@pytest.mark.real
def test_gemma_numeric_arrays_never_fetched() -> None:
    path = assets.test_model_path()
    reads: list[tuple[int, int]] = []
    with path.open("rb") as f:
        inner = file_read_at(f)

        def traced(offset: int, length: int) -> bytes:
            reads.append((offset, length))
            return inner(offset, length)

        header = read_gguf_header(traced, size=path.stat().st_size)
    # tokenizer.ggml.scores (float32) and token_type (int32): 1 MiB of data each
    scores = (4_413_497 + 8 + 21 + 4 + 4 + 8, 4_413_497 + 1_048_621)
    types = (5_462_118 + 8 + 25 + 4 + 4 + 8, 5_462_118 + 1_048_625)
    for lo, hi in (scores, types):
        assert hi - lo == 262_144 * 4
        overlap = sum(max(0, min(o + n, hi) - max(o, lo)) for o, n in reads)
        # at most the small read that fetched the array's own header spills into its data
        assert overlap <= gguf_reader.JUMP_CHUNK, f"{overlap} bytes of a skipped array were read"
    assert header.bytes_read == sum(n for _, n in reads)
    assert header.bytes_read < 5 << 20


@pytest.mark.real
def test_gemma_header_is_fast() -> None:
    path = assets.test_model_path()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        read_local(path)
        best = min(best, time.perf_counter() - start)
    print(f"\nGemma header read locally in {best * 1000:.1f} ms (best of 3)")
    assert best < 0.25


def test_a_recurrent_model_is_a_clean_error_in_estimate_and_a_plan_error_in_plan(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from clusterctl.cli import app
    from clusterctl.inventory import load_inventory
    from clusterctl.planner import make_plan

    w = gguf.GGUFWriter(tmp_path / "mamba.gguf", "mamba")
    w.add_block_count(2)
    w.add_context_length(4096)
    w.add_embedding_length(64)
    w.add_head_count(0)
    w.add_vocab_size(100)
    w.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float32))
    assets.finish(w)
    # a Mamba header without its ssm.* sizes: the state cannot be sized
    message = ("architecture 'mamba' has recurrent layers whose state size the estimator cannot tell from this "
               "file (it follows llama.cpp's ssm.*, wkv.* and shortconv.* keys; linear-attention and KDA layers "
               "are not modelled), so it cannot say whether this model fits")
    result = CliRunner().invoke(app, ["estimate", str(tmp_path / "mamba.gguf"), "--json"])
    assert result.exit_code == 5, result.output
    assert json.loads(result.stdout)["error"]["message"] == message

    meta = read_local(tmp_path / "mamba.gguf")
    inv_path = tmp_path / "inv.yaml"
    inv_path.write_text(f"""\
cluster: {{name: c}}
nodes:
  n: {{address: 10.0.0.1, ram: 8GiB}}
models:
  m: {{source: 'file://{tmp_path / "mamba.gguf"}'}}
services:
  s: {{engine: llama-server, node: n, model: m, port: 8080, context: 1024}}
""")
    plan = make_plan(load_inventory(inv_path), {"m": meta})
    assert not plan.ok
    assert [(f.severity, f.subject, f.message) for f in plan.findings if f.severity == "error"] == [
        ("error", "s", message)]
