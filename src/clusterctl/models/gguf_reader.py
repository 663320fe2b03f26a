"""A fast GGUF header reader that works on any "read bytes at offset" source.

Only the key/value section and the tensor infos are parsed. Big arrays (the tokenizer
vocabulary, scores, token types) are skipped without being decoded: numeric arrays by size
arithmetic, so their bytes are never fetched, string arrays by walking the length prefixes.
The same parser serves local files and HTTP range reads (see remote.py).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from clusterctl.errors import MetadataError
from clusterctl.models.meta import ModelMeta, RecurrentState, TensorEntry, TensorGroupBytes

ReadAt = Callable[[int, int], bytes]
"""(offset, length) -> up to `length` bytes starting at `offset` (fewer only at end of file)."""

MetaValue = int | float | bool | str | list[Any]

FIRST_CHUNK = 1 << 20
JUMP_CHUNK = 64 << 10
MAX_CHUNK = 16 << 20
KEEP_NUMERIC_ARRAY = 4096
KEEP_STRING_ARRAY = 64
_MAX_STRING = 1 << 30
_MAX_DIMS = 8

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_VT = gguf.GGUFValueType
_SCALAR: dict[gguf.GGUFValueType, struct.Struct] = {
    _VT.UINT8: struct.Struct("<B"),
    _VT.INT8: struct.Struct("<b"),
    _VT.UINT16: struct.Struct("<H"),
    _VT.INT16: struct.Struct("<h"),
    _VT.UINT32: struct.Struct("<I"),
    _VT.INT32: struct.Struct("<i"),
    _VT.FLOAT32: struct.Struct("<f"),
    _VT.BOOL: struct.Struct("<?"),
    _VT.UINT64: struct.Struct("<Q"),
    _VT.INT64: struct.Struct("<q"),
    _VT.FLOAT64: struct.Struct("<d"),
}
_MAGIC = _U32.pack(gguf.GGUF_MAGIC)

SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

# llama.cpp hard-codes the interleaved sliding-window layout of these architectures when the
# file has no `{arch}.attention.sliding_window_pattern`: (period, dense_first). With period n a
# layer il uses the window iff il % n < n - 1 (dense_first: iff il % n != 0).
SWA_PATTERNS: dict[str, tuple[int, bool]] = {
    "gemma2": (2, False),
    "gemma3": (6, False),
    "gemma3n": (5, False),
    "gemma-embedding": (6, False),
    "cohere2": (4, False),
    "gpt-oss": (2, False),
    "llama4": (4, False),
    "exaone4": (4, False),
    "afmoe": (4, False),
    "smallthinker": (4, True),
    "plamo3": (8, False),
}
# Window used by llama.cpp when the file does not store one.
SWA_DEFAULT_WINDOW: dict[str, int] = {"gemma2": 4096, "llama4": 8192}

RECURRENT_ARCHS = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})
# llama.cpp's hybrids (llm_arch_is_hybrid): attention layers with a KV cache beside recurrent
# layers with a fixed state. How each marks its recurrent layers (src/models/<arch>.cpp):
HYBRID_ALL_RECURRENT = frozenset({"falcon-h1"})  # every layer has both
HYBRID_BY_INTERVAL = frozenset({"qwen3next", "qwen35", "qwen35moe", "minimax-01", "qwen4exp"})
HYBRID_NO_KV_NO_FF = frozenset({"nemotron_h", "nemotron_h_moe"})
HYBRID_NO_KV = frozenset({"jamba", "plamo2", "granitehybrid", "lfm2", "lfm2moe", "kimi-linear", "bailingmoe3",
                          "kimi-k3", "glm5-next", "deepseek4"})
# archs whose recurrent state follows llama_hparams::n_embd_r()/n_embd_s() from the SSM, WKV or
# short-convolution keys; the others (linear attention, KDA) are refused by the estimator
STATE_MODELLED = (RECURRENT_ARCHS | HYBRID_ALL_RECURRENT | HYBRID_NO_KV_NO_FF
                  | frozenset({"qwen3next", "qwen35", "qwen35moe", "jamba", "plamo2", "granitehybrid", "lfm2",
                               "lfm2moe"}))


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: name, shape (ggml order, ne0 first), type and data size."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def type_name(self) -> str:
        return gguf.GGMLQuantizationType(self.ggml_type).name


@dataclass
class GGUFHeader:
    """Parsed key/value metadata (big arrays left out) and tensor infos of one GGUF file."""

    version: int
    tensor_count: int
    kv_count: int
    metadata: dict[str, MetaValue] = field(default_factory=dict)
    array_lengths: dict[str, int] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)
    alignment: int = gguf.GGUF_DEFAULT_ALIGNMENT
    data_offset: int = 0
    file_size: int | None = None
    bytes_read: int = 0

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get(gguf.Keys.General.ARCHITECTURE)
        return arch if isinstance(arch, str) else None


class _Cursor:
    """Forward-only reader over a ReadAt source that fetches growing chunks on demand."""

    def __init__(self, read_at: ReadAt, size: int | None, first_chunk: int) -> None:
        self._read_at = read_at
        self.size = size
        self.pos = 0
        self.bytes_read = 0
        self._buf = b""
        self._start = 0
        self._chunk = first_chunk

    def _truncated(self) -> MetadataError:
        return MetadataError(
            f"the GGUF file ends inside its header (at byte {self.pos})",
            "the file is truncated or still downloading; fetch it again",
        )

    def ensure(self, n: int, hint: int | None = None) -> None:
        """Make bytes [pos, pos + n) available.

        A fetch reads the next chunk (1 MiB first, doubling while reads are contiguous, 64 KiB
        after a skip), or about `hint` bytes when the caller knows how much it will need.
        """
        end = self._start + len(self._buf)
        if self.pos + n <= end:
            return
        if self._start <= self.pos < end:
            keep = self._buf[self.pos - self._start :]
            read_from = end
            chunk = self._chunk
            self._chunk = min(self._chunk * 2, MAX_CHUNK)
        else:
            keep = b""
            read_from = self.pos
            contiguous = self.pos == end and self.bytes_read > 0
            chunk = self._chunk if contiguous or self.bytes_read == 0 else JUMP_CHUNK
            self._chunk = min(chunk * 2, MAX_CHUNK)
        want = n - len(keep)
        size = max(want, min(chunk if hint is None else hint, MAX_CHUNK))
        if self.size is not None:
            size = min(size, self.size - read_from)
            if size < want:
                raise self._truncated()
        data = self._read_at(read_from, size) if size > 0 else b""
        self.bytes_read += len(data)
        if len(data) < want:
            raise self._truncated()
        self._buf = keep + data if keep else data
        self._start = self.pos

    def take(self, n: int) -> bytes:
        self.ensure(n)
        i = self.pos - self._start
        self.pos += n
        return self._buf[i : i + n]

    def unpack(self, st: struct.Struct) -> Any:
        self.ensure(st.size)
        value = st.unpack_from(self._buf, self.pos - self._start)[0]
        self.pos += st.size
        return value

    def u32(self) -> int:
        return int(self.unpack(_U32))

    def u64(self) -> int:
        return int(self.unpack(_U64))

    def string(self) -> str:
        n = self.u64()
        if n > _MAX_STRING:
            raise MetadataError(f"corrupt GGUF header: string of {n} bytes at byte {self.pos - 8}")
        return self.take(n).decode("utf-8", errors="replace")

    def skip(self, n: int) -> None:
        self.pos += n
        if self.size is not None and self.pos > self.size:
            raise self._truncated()

    def skip_strings(self, count: int) -> None:
        """Skip `count` length-prefixed strings, reading only as far as they go."""
        remaining = count
        first = self.pos
        unpack = _U64.unpack_from
        while remaining:
            buf = self._buf
            end = len(buf)
            p = self.pos - self._start
            done = 0
            try:
                for done in range(remaining):  # noqa: B007 - `done` is used after the loop
                    q = p + 8 + unpack(buf, p)[0]
                    if q > end:
                        break
                    p = q
                else:
                    done = remaining
            except struct.error:
                pass
            remaining -= done
            self.pos = self._start + p
            if remaining:
                need = 8
                if p + 8 <= end:
                    n = unpack(buf, p)[0]
                    if n > _MAX_STRING:
                        raise MetadataError(f"corrupt GGUF header: string of {n} bytes at byte {self.pos}")
                    need += n
                walked = count - remaining
                # the rest of the array at the mean entry size so far, plus 5 %
                estimate = (self.pos - first) * remaining * 21 // (walked * 20) if walked else 0
                self.ensure(need, max(8 * remaining, estimate) + 4096)


def _value(cur: _Cursor, vtype: int) -> MetaValue:
    try:
        vt = gguf.GGUFValueType(vtype)
    except ValueError:
        raise MetadataError(f"corrupt GGUF header: unknown value type {vtype}") from None
    if vt == _VT.STRING:
        return cur.string()
    if vt == _VT.ARRAY:
        raise AssertionError("arrays are handled by _array")
    value: MetaValue = cur.unpack(_SCALAR[vt])
    return value


def _array(cur: _Cursor) -> tuple[list[Any] | None, int]:
    """Read an array value: (elements or None when skipped, element count)."""
    etype = cur.u32()
    count = cur.u64()
    try:
        et = gguf.GGUFValueType(etype)
    except ValueError:
        raise MetadataError(f"corrupt GGUF header: unknown array element type {etype}") from None
    if et == _VT.STRING:
        if count <= KEEP_STRING_ARRAY:
            return [cur.string() for _ in range(count)], count
        cur.skip_strings(count)
        return None, count
    if et == _VT.ARRAY:
        for _ in range(count):
            _array(cur)
        return None, count
    st = _SCALAR[et]
    nbytes = st.size * count
    if count <= KEEP_NUMERIC_ARRAY:
        raw = cur.take(nbytes)
        return list(struct.unpack(f"<{count}{st.format[1:]}", raw)), count
    cur.skip(nbytes)
    return None, count


def read_gguf_header(read_at: ReadAt, *, size: int | None = None, first_chunk: int = FIRST_CHUNK) -> GGUFHeader:
    """Parse the header of one GGUF file (versions 2 and 3, little-endian).

    `size` (the file size, when known) turns reads past the end into a clear error.
    """
    cur = _Cursor(read_at, size, first_chunk)
    magic = cur.take(4) if size is None or size >= 4 else b""
    if magic != _MAGIC:
        raise MetadataError(
            "not a GGUF file (bad magic)",
            "check that the path or URL points at a .gguf file, not an HTML page or a safetensors file",
        )
    version = cur.u32()
    if version & 0xFFFF == 0 and version >> 16:
        raise MetadataError(
            "big-endian GGUF files are not supported",
            "use the little-endian build of this model (the usual one)",
        )
    if version not in (2, 3):
        raise MetadataError(f"unsupported GGUF version {version} (only 2 and 3 are read)")
    tensor_count = cur.u64()
    kv_count = cur.u64()
    header = GGUFHeader(version=version, tensor_count=tensor_count, kv_count=kv_count, file_size=size)
    for _ in range(kv_count):
        key = cur.string()
        vtype = cur.u32()
        if vtype == _VT.ARRAY:
            items, count = _array(cur)
            header.array_lengths[key] = count
            if items is not None:
                header.metadata[key] = items
        else:
            header.metadata[key] = _value(cur, vtype)
    for _ in range(tensor_count):
        name = cur.string()
        n_dims = cur.u32()
        if n_dims > _MAX_DIMS:
            raise MetadataError(f"corrupt GGUF header: tensor {name!r} has {n_dims} dimensions")
        shape = tuple(cur.u64() for _ in range(n_dims))
        ggml_type = cur.u32()
        offset = cur.u64()
        header.tensors.append(TensorInfo(name, shape, ggml_type, offset, tensor_nbytes(name, shape, ggml_type)))
    alignment = header.metadata.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT)
    if isinstance(alignment, int) and alignment > 0:
        header.alignment = alignment
    header.data_offset = -(-cur.pos // header.alignment) * header.alignment
    header.bytes_read = cur.bytes_read
    return header


def tensor_nbytes(name: str, shape: Sequence[int], ggml_type: int) -> int:
    """Bytes of a tensor's data from its shape and ggml type (block size, type size)."""
    try:
        qtype = gguf.GGMLQuantizationType(ggml_type)
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise MetadataError(
            f"tensor {name!r} has ggml type {ggml_type}, unknown to the installed gguf package",
            "upgrade the gguf package (pip install -U gguf)",
        ) from None
    n = 1
    for d in shape:
        n *= d
    if n % block_size:
        raise MetadataError(f"tensor {name!r}: {n} elements is not a multiple of the {qtype.name} block size")
    return n // block_size * type_size


def file_read_at(f: Any) -> ReadAt:
    """A ReadAt over an open binary file object."""

    def read_at(offset: int, length: int) -> bytes:
        f.seek(offset)
        data: bytes = f.read(length)
        return data

    return read_at


# ---------------------------------------------------------------------------------------------
# split files


def split_part_names(name: str) -> list[str]:
    """All part names of a split GGUF given any part (`NAME-00001-of-00003.gguf`).

    A directory prefix ("dir/NAME-...") is kept. A name that is not a split name comes back
    alone.
    """
    head, sep, base = name.rpartition("/")
    m = SPLIT_RE.match(base)
    if not m:
        return [name]
    count = int(m["count"])
    no = int(m["no"])
    if count < 1 or no < 1 or no > count:
        raise MetadataError(f"{base!r} is not a valid split GGUF name (part {no} of {count})")
    prefix = head + sep
    return [f"{prefix}{m['stem']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def _check_split(headers: Sequence[GGUFHeader], names: Sequence[str]) -> None:
    first = headers[0]
    declared = first.get(gguf.Keys.Split.LLM_KV_SPLIT_COUNT)
    if isinstance(declared, int) and declared > 1 and declared != len(headers):
        raise MetadataError(
            f"{names[0]} declares {declared} split parts but {len(headers)} were read",
            "split GGUFs must keep their NAME-00001-of-0000N.gguf names",
        )
    for i, (h, n) in enumerate(zip(headers, names, strict=True)):
        no = h.get(gguf.Keys.Split.LLM_KV_SPLIT_NO)
        if len(headers) > 1 and isinstance(no, int) and no != i:
            raise MetadataError(f"{n} is split part {no + 1}, expected part {i + 1}")
    total = first.get(gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
    found = sum(len(h.tensors) for h in headers)
    if isinstance(total, int) and total != found:
        raise MetadataError(f"split GGUF {names[0]} declares {total} tensors but its parts hold {found}")


# ---------------------------------------------------------------------------------------------
# mapping to ModelMeta


def _int(v: Any) -> int | None:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def _int_or_max(v: Any) -> int | None:
    """A scalar, or the largest entry of a per-layer array (llama.cpp allows both)."""
    if isinstance(v, list):
        vals = [i for i in (_int(x) for x in v) if i is not None]
        return max(vals) if vals else None
    return _int(v)


def file_type_label(value: Any) -> str | None:
    """general.file_type -> "Q4_K_M", "F16", ... (None when absent or unknown)."""
    code = _int(value)
    if code is None:
        return None
    try:
        ft = gguf.LlamaFileType(code)
    except ValueError:
        return None
    if ft == gguf.LlamaFileType.GUESSED:
        return None
    return ft.name.removeprefix("MOSTLY_").removeprefix("ALL_")


def swa_layers_for(arch: str, n_layer: int, pattern: Any) -> list[bool] | None:
    """Per-layer sliding-window flags from the stored pattern or llama.cpp's per-arch default."""
    if isinstance(pattern, list) and pattern:
        flags = [bool(x) for x in pattern[:n_layer]]
        return flags + [False] * (n_layer - len(flags))
    period: int | None = None
    dense_first = False
    if arch in SWA_PATTERNS:
        period, dense_first = SWA_PATTERNS[arch]
    stored = _int(pattern)
    if stored is not None:
        period = stored
    if period is None:
        return None
    if dense_first:
        return [period == 0 or il % period != 0 for il in range(n_layer)]
    return [period == 0 or il % period < period - 1 for il in range(n_layer)]


_BLK_RE = re.compile(r"^blk\.(\d+)\.")


def group_tensor_bytes(tensors: Sequence[TensorInfo], n_layer: int) -> TensorGroupBytes:
    """Sum tensor bytes the way llama.cpp places them: input, output, per layer, other."""
    token_embd = output = other = 0
    layers = [0] * n_layer
    for t in tensors:
        name = t.name
        if name.startswith("token_embd."):
            token_embd += t.n_bytes
        elif name.startswith(("output.", "output_norm.")):
            output += t.n_bytes
        elif m := _BLK_RE.match(name):
            il = int(m.group(1))
            if il >= len(layers):
                layers.extend([0] * (il + 1 - len(layers)))
            layers[il] += t.n_bytes
        else:
            other += t.n_bytes
    return TensorGroupBytes(token_embd=token_embd, output=output, layers=layers, other=other)


def _per_layer(v: Any, n_layer: int) -> list[int] | None:
    """A per-layer array of ints (padded with its last value), or None for a scalar/absent key."""
    if not isinstance(v, list) or not v:
        return None
    vals = [_int(x) or 0 for x in v[:n_layer]]
    return vals + [vals[-1]] * (n_layer - len(vals))


def recurrent_layout(h: GGUFHeader, arch: str, n_layer: int, n_head_kv: int,
                     kv_layers: list[int] | None, ff_layers: list[int] | None
                     ) -> tuple[list[bool] | None, list[int] | None]:
    """(recurrent flag per layer, KV heads per layer) by llama.cpp's per-arch rules."""
    def key(name: str) -> str:
        return f"{arch}.{name}"
    kv = kv_layers or [n_head_kv] * n_layer
    if arch in RECURRENT_ARCHS:
        return [True] * n_layer, [0] * n_layer
    if arch in HYBRID_ALL_RECURRENT:
        return [True] * n_layer, kv_layers
    if arch in HYBRID_BY_INTERVAL:
        stored = h.get(key("attention.recurrent_layers"))
        if isinstance(stored, list) and stored:
            flags = [bool(x) for x in stored[:n_layer]] + [False] * max(0, n_layer - len(stored))
        else:
            interval = _int(h.get(key("full_attention_interval"))) or 4
            flags = [(il + 1) % interval != 0 for il in range(n_layer)]
        return flags, [0 if r else k for r, k in zip(flags, kv, strict=True)]
    if arch in HYBRID_NO_KV_NO_FF:
        ff = ff_layers or [1] * n_layer
        return [k == 0 and f == 0 for k, f in zip(kv, ff, strict=True)], kv_layers
    if arch in HYBRID_NO_KV:
        return [k == 0 for k in kv], kv_layers
    return None, kv_layers


def recurrent_state(h: GGUFHeader, arch: str, n_embd: int) -> RecurrentState | None:
    """One recurrent layer's state per sequence in f32 elements: llama_hparams::n_embd_r() and
    n_embd_s() (RWKV's token shift and WKV state, LFM2's short convolution, else Mamba's conv and
    SSM state, which the gated delta net of Qwen3-Next shares)."""
    if arch not in STATE_MODELLED:
        return None

    def get(name: str) -> int:
        return _int(h.get(f"{arch}.{name}")) or 0
    wkv = get("wkv.head_size")
    if wkv:
        return RecurrentState(r=(get("token_shift_count") or 2) * n_embd, s=n_embd * wkv)
    d_conv, d_inner, d_state, n_group = (get("ssm.conv_kernel"), get("ssm.inner_size"), get("ssm.state_size"),
                                         get("ssm.group_count"))
    l_cache = get("shortconv.l_cache")
    if l_cache:
        return RecurrentState(r=n_embd * (l_cache - 1), s=d_state * d_inner)
    if not d_inner:
        return None
    return RecurrentState(r=max(d_conv - 1, 0) * (d_inner + 2 * n_group * d_state), s=d_state * d_inner)


def has_chat_template(h: GGUFHeader) -> bool:
    """The file carries a chat template llama-server would use: tokenizer.chat_template, or a
    named one (tokenizer.chat_template.tool_use, which llama.cpp takes when the default is absent)."""
    key = gguf.Keys.Tokenizer.CHAT_TEMPLATE
    return any(isinstance(v, str) and v.strip() for k, v in h.metadata.items()
               if k == key or k.startswith(key + "."))


def gguf_to_meta(
    headers: Sequence[GGUFHeader],
    *,
    source: str | None,
    file_bytes: int,
    bytes_read: int,
    files: Sequence[str] | None = None,
    revision: str | None = None,
) -> ModelMeta:
    """Map the headers of one model (every split part, first part first) to a ModelMeta."""
    if not headers:
        raise MetadataError("no GGUF header to read")
    names = list(files) if files else [source or "model.gguf"] * len(headers)
    _check_split(headers, names)
    h = headers[0]
    arch = h.architecture
    if not arch:
        raise MetadataError(f"{names[0]}: general.architecture is missing")

    def key(template: str) -> str:
        return template.format(arch=arch)

    def required(template: str) -> int:
        v = _int_or_max(h.get(key(template)))
        if v is None:
            raise MetadataError(f"{names[0]}: {key(template)} is missing; this is not a model llama.cpp can run")
        return v

    LLM, Att = gguf.Keys.LLM, gguf.Keys.Attention
    n_layer = required(LLM.BLOCK_COUNT)
    n_embd = required(LLM.EMBEDDING_LENGTH)
    n_ctx = required(LLM.CONTEXT_LENGTH)
    # head counts may be per-layer arrays (e.g. OpenELM, hybrid archs with 0 on recurrent
    # layers): the largest value sizes the KV cache conservatively.
    n_head = _int_or_max(h.get(key(Att.HEAD_COUNT))) or 0
    n_head_kv = _int_or_max(h.get(key(Att.HEAD_COUNT_KV)))
    if n_head_kv is None:
        n_head_kv = n_head
    default_dim = n_embd // n_head if n_head else 0
    head_dim_k = _int(h.get(key(Att.KEY_LENGTH)))
    head_dim_v = _int(h.get(key(Att.VALUE_LENGTH)))

    n_vocab = _int(h.get(key(LLM.VOCAB_SIZE)))
    if n_vocab is None:
        n_vocab = h.array_lengths.get(gguf.Keys.Tokenizer.LIST)
    tensors = [t for part in headers for t in part.tensors]
    if n_vocab is None:
        embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
        if embd is not None and len(embd.shape) >= 2:
            n_vocab = embd.shape[1]
    if n_vocab is None:
        raise MetadataError(f"{names[0]}: cannot tell the vocabulary size")

    sliding_window = _int(h.get(key(Att.SLIDING_WINDOW)))
    if sliding_window is None:
        sliding_window = SWA_DEFAULT_WINDOW.get(arch)
    swa_layers: list[bool] | None = None
    if sliding_window:
        swa_layers = swa_layers_for(arch, n_layer, h.get(key(Att.SLIDING_WINDOW_PATTERN)))
    if not swa_layers or not any(swa_layers):
        # llama.cpp keeps a full-size cache for every layer of these models
        sliding_window = swa_layers = None

    kv_layers = _per_layer(h.get(key(Att.HEAD_COUNT_KV)), n_layer)
    ff_layers = _per_layer(h.get(key(LLM.FEED_FORWARD_LENGTH)), n_layer)
    recurrent_flags, kv_layers = recurrent_layout(h, arch, n_layer, n_head_kv, kv_layers, ff_layers)
    recurrent = bool(recurrent_flags and any(recurrent_flags))
    k_mla = _int(h.get(key(Att.KEY_LENGTH_MLA)))
    v_mla = _int(h.get(key(Att.VALUE_LENGTH_MLA)))
    n_params = sum(t.n_elements for t in tensors)
    return ModelMeta(
        format="gguf",
        source=source,
        revision=revision,
        name=name if isinstance(name := h.get(gguf.Keys.General.NAME), str) else None,
        architecture=arch,
        file_type=file_type_label(h.get(gguf.Keys.General.FILE_TYPE)),
        files=[n.rpartition("/")[2] for n in names] if files else [],
        file_bytes=file_bytes,
        header_bytes_read=bytes_read,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k if head_dim_k is not None else default_dim,
        head_dim_v=head_dim_v if head_dim_v is not None else default_dim,
        n_vocab=n_vocab,
        n_ctx_train=n_ctx,
        n_ff=_int_or_max(h.get(key(LLM.FEED_FORWARD_LENGTH))),
        sliding_window=sliding_window,
        swa_layers=swa_layers,
        n_expert=_int(h.get(key(LLM.EXPERT_COUNT))) or 0,
        n_expert_used=_int(h.get(key(LLM.EXPERT_USED_COUNT))) or 0,
        n_expert_shared=_int(h.get(key(LLM.EXPERT_SHARED_COUNT))) or 0,
        kv_lora_rank=_int(h.get(key(Att.KV_LORA_RANK))),
        head_dim_k_mla=k_mla,
        head_dim_v_mla=v_mla,
        n_ff_exp=_int_or_max(h.get(key(LLM.EXPERT_FEED_FORWARD_LENGTH))),
        n_head_kv_layers=kv_layers,
        n_ff_layers=ff_layers,
        n_rot=_int(h.get(key(gguf.Keys.Rope.DIMENSION_COUNT))),
        recurrent=recurrent,
        recurrent_layers=recurrent_flags if recurrent else None,
        recurrent_state=recurrent_state(h, arch, n_embd) if recurrent else None,
        has_chat_template=has_chat_template(h),
        tensor_bytes=group_tensor_bytes(tensors, n_layer),
        tensors=[TensorEntry(name=t.name, type=t.type_name, bytes=t.n_bytes,
                             rows=t.shape[1] if len(t.shape) > 1 else 1) for t in tensors],
        n_params=n_params or None,
    )


# ---------------------------------------------------------------------------------------------
# local files


def read_header_file(path: Path, *, first_chunk: int = FIRST_CHUNK) -> GGUFHeader:
    """Parse the header of one local GGUF file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            return read_gguf_header(file_read_at(f), size=size, first_chunk=first_chunk)
    except OSError as exc:
        raise MetadataError(f"cannot read {path}: {exc.strerror or exc}") from exc


def read_local(path: Path) -> ModelMeta:
    """Metadata of a local GGUF; a split model is read from all parts next to `path`."""
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"{path} does not exist or is not a file")
    names = split_part_names(path.name)
    paths = [path.parent / n for n in names]
    for p in paths:
        if not p.is_file():
            raise MetadataError(
                f"split GGUF part {p.name} is missing next to {path.name}",
                f"download all {len(paths)} parts into {path.parent}",
            )
    # parts after the first hold no vocabulary: a small first read is enough
    headers = [read_header_file(p, first_chunk=FIRST_CHUNK if i == 0 else JUMP_CHUNK) for i, p in enumerate(paths)]
    declared = _int(headers[0].get(gguf.Keys.Split.LLM_KV_SPLIT_COUNT))
    if declared is not None and declared > 1 and len(paths) == 1:
        raise MetadataError(
            f"{path.name} is part of a {declared}-part split GGUF but is not named like one",
            "keep the original NAME-00001-of-0000N.gguf file names",
        )
    return gguf_to_meta(
        headers,
        source=str(paths[0]),
        file_bytes=sum(h.file_size or 0 for h in headers),
        bytes_read=sum(h.bytes_read for h in headers),
        files=names,
    )
