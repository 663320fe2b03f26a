"""The metadata the planner needs about one model, independent of where it was read.

This is the documented schema of `clusterctl inspect --json` and of the `models` entries of a
lock file (see docs/metadata.md). Every size is in bytes. Everything the planner needs is
here; nothing else of a GGUF (tokenizer arrays, the chat template's text) is kept.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


class TensorGroupBytes(BaseModel):
    """Weight bytes grouped the way llama.cpp assigns them to devices."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    token_embd: int = Field(0, description="token embedding matrix (kept in host memory by llama.cpp)")
    output: int = Field(0, description="output (lm head) + output norm; on the last GPU when all layers are offloaded")
    layers: list[int] = Field(default_factory=list, description="bytes of each repeating block blk.N.*, index = N")
    other: int = Field(0, description="any tensor outside the groups above (e.g. rope factors)")

    @property
    def total(self) -> int:
        return self.token_embd + self.output + sum(self.layers) + self.other


class TensorEntry(BaseModel):
    """One weight tensor as llama.cpp places it: name, ggml type, bytes and rows (ne[1]).
    Tensor overrides (`-ot PATTERN=BUFT`) match these names; the CPU backend's repack
    (CPU_REPACK) depends on the type and the row count."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    type: str = Field(description="ggml type name, e.g. Q4_K, F32")
    bytes: int = Field(ge=0)
    rows: int = Field(1, ge=0, description="ne[1]: 1 for a vector")


class RecurrentState(BaseModel):
    """Per-sequence state of one recurrent layer, in f32 elements, as llama.cpp's
    llama_memory_recurrent allocates it (hparams.n_embd_r() and n_embd_s())."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    r: int = Field(ge=0, description="convolution / token-shift state (n_embd_r)")
    s: int = Field(ge=0, description="SSM / WKV / delta-net state (n_embd_s)")


class FilePin(BaseModel):
    """What one downloaded file must be: its size and, for hub LFS files, its sha256."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int = Field(ge=0, description="bytes")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$",
                               description="the LFS object's sha256; None: a plain git file (size only)")


class ModelMeta(BaseModel):
    """Architecture facts and byte totals of one model file set."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = SCHEMA_VERSION
    format: Literal["gguf", "safetensors", "mlx"]
    source: str | None = Field(None, description="where it was read from (path or URL)")
    revision: str | None = Field(None, description="pinned revision (commit) for hub sources")
    name: str | None = Field(None, description="general.name, when the file has one")
    architecture: str = Field(description="general.architecture or the HF model_type")
    file_type: str | None = Field(None, description="quantisation label, e.g. Q4_K_M, Q8_0, F16, 4bit")
    files: list[str] = Field(default_factory=list, description="file names (split GGUFs: every part)")
    file_bytes: int = Field(0, description="total size on disk of all files")
    header_bytes_read: int = Field(0, description="bytes actually read to get this metadata")

    n_layer: int = Field(description="repeating blocks")
    n_embd: int
    n_head: int
    n_head_kv: int = Field(description="KV heads (GQA); equals n_head without GQA")
    head_dim_k: int = Field(description="key head size")
    head_dim_v: int = Field(description="value head size")
    n_vocab: int
    n_ctx_train: int
    n_ff: int | None = None
    sliding_window: int | None = Field(None, description="SWA window in tokens")
    swa_layers: list[bool] | None = Field(
        None, description="per layer: True where the layer uses the sliding window"
    )
    n_expert: int = 0
    n_expert_used: int = 0
    n_expert_shared: int = 0
    kv_lora_rank: int | None = Field(None, description="MLA (DeepSeek) compressed KV rank")
    head_dim_k_mla: int | None = Field(
        None, description="MLA: per-head key size after decompression (DeepSeek V3: 192); the cache "
        "stores head_dim_k (576 = kv_lora_rank + rope) per layer and no V")
    head_dim_v_mla: int | None = Field(None, description="MLA: per-head value size after decompression")
    n_ff_exp: int | None = Field(None, description="width of one expert's FFN (expert_feed_forward_length)")
    n_head_kv_layers: list[int] | None = Field(
        None, description="KV heads of each layer, where they differ between layers (0: the layer keeps no "
        "KV cache, e.g. a recurrent layer of a hybrid or a Nemotron layer without attention); None: n_head_kv "
        "for every layer")
    n_ff_layers: list[int] | None = Field(None, description="FFN width of each layer, where it differs")
    n_rot: int | None = None
    recurrent: bool = Field(False, description="recurrent/SSM layers (Mamba, RWKV, hybrids): a fixed state per "
                            "sequence instead of (or beside) a growing KV cache")
    recurrent_layers: list[bool] | None = Field(
        None, description="per layer: True where the layer keeps a recurrent state (None: no such layer)")
    recurrent_state: RecurrentState | None = Field(
        None, description="elements of one recurrent layer's state per sequence; None on a recurrent model: "
        "its state is not modelled")
    has_chat_template: bool | None = Field(
        None, description="GGUF: the file carries tokenizer.chat_template (without one llama-server "
        "falls back to ChatML); None: not recorded (a lock file written before this field, or not a GGUF)")

    tensor_bytes: TensorGroupBytes = Field(default_factory=TensorGroupBytes)
    tensors: list[TensorEntry] | None = Field(
        None, description="GGUF: every tensor (name, type, bytes, rows), for tensor overrides and the CPU "
        "repack; None: not recorded (a lock file written before this field, or not a GGUF)")
    weight_dtype_bytes: float | None = Field(
        None, description="safetensors/MLX: bytes per parameter of the stored weights"
    )
    n_params: int | None = None

    @property
    def weights_bytes(self) -> int:
        return self.tensor_bytes.total or self.file_bytes

    @property
    def is_mla(self) -> bool:
        return bool(self.head_dim_k_mla) and bool(self.head_dim_v_mla)

    def kv_heads(self, il: int) -> int:
        """KV heads of layer `il` (0: the layer keeps no KV cache)."""
        if self.n_head_kv_layers is not None and il < len(self.n_head_kv_layers):
            return self.n_head_kv_layers[il]
        return 0 if self.recurrent and self.recurrent_layers is None else self.n_head_kv

    def is_recurrent_layer(self, il: int) -> bool:
        if self.recurrent_layers is not None:
            return il < len(self.recurrent_layers) and self.recurrent_layers[il]
        return self.recurrent

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0
