"""Model metadata over HTTP without downloading the model: GGUF headers via range reads.

Sources look like `hf://org/repo[@revision]/path/in/repo.gguf`, `https://host/file.gguf` or
`file:///abs/path.gguf`. Hub URLs are built with huggingface_hub and honour `HF_ENDPOINT`.
"""

from __future__ import annotations

import contextlib
import email.utils
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import gguf
import httpx
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_url

from clusterctl import __version__ as _version
from clusterctl.errors import MetadataError, NetworkError
from clusterctl.layout import host_port
from clusterctl.models import gguf_reader
from clusterctl.models.meta import ModelMeta

Scheme = Literal["hf", "https", "http", "file"]

TOKEN_ENV = "HF_TOKEN"
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
_STREAM_CHUNK = 64 << 10
_GLOB_CHARS = re.compile(r"[*?\[]")
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CONTENT_RANGE = re.compile(r"^bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)$")


@dataclass(frozen=True)
class Source:
    """A parsed model source. For http(s) `path` is the whole URL; for file, the local path."""

    scheme: Scheme
    path: str
    repo: str | None = None
    revision: str | None = None

    @property
    def is_glob(self) -> bool:
        return self.scheme == "hf" and bool(_GLOB_CHARS.search(self.path))

    @property
    def filename(self) -> str:
        """Last path component (the file name), without any query string."""
        path = urlsplit(self.path).path if self.scheme in ("http", "https") else self.path
        return path.rstrip("/").rpartition("/")[2]

    def with_path(self, path: str) -> Source:
        return Source(self.scheme, path, self.repo, self.revision)

    def __str__(self) -> str:
        if self.scheme == "hf":
            rev = f"@{self.revision}" if self.revision else ""
            tail = f"/{self.path}" if self.path else ""
            return f"hf://{self.repo}{rev}{tail}"
        if self.scheme == "file":
            return f"file://{self.path}"
        return self.path


def parse_source(text: str) -> Source:
    """Parse `hf://org/repo[@rev][/path]`, `https://...`, `http://...`, `file:///abs` or a path."""
    text = text.strip()
    if text.startswith("hf://"):
        rest = text[len("hf://") :]
        parts = rest.split("/", 2)
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise MetadataError(f"{text!r} is not a hub source", "write hf://org/repo[@revision]/path/to/file.gguf")
        org, name = parts[0], parts[1]
        revision: str | None = None
        if "@" in name:
            name, _, rev = name.partition("@")
            revision = unquote(rev) or None
        repo = f"{org}/{name}"
        if not _REPO_RE.match(repo):
            raise MetadataError(f"{repo!r} in {text!r} is not a valid repository id")
        path = parts[2] if len(parts) == 3 else ""
        if any(p in ("..", ".") for p in path.split("/")):
            raise MetadataError(f"{text!r}: the path must not contain '.' or '..'")
        return Source("hf", path.strip("/"), repo, revision)
    if text.startswith(("https://", "http://")):
        scheme: Scheme = "https" if text.startswith("https://") else "http"
        if not urlsplit(text).netloc:
            raise MetadataError(f"{text!r} has no host")
        return Source(scheme, text)
    if text.startswith("file://"):
        path = unquote(text[len("file://") :])
        if not path.startswith("/"):
            raise MetadataError(f"{text!r}: file:// sources need an absolute path (file:///...)")
        return Source("file", path)
    if "://" in text:
        raise MetadataError(
            f"{text!r}: unknown scheme", "use hf://org/repo[@revision]/file, https://... or file:///path"
        )
    return Source("file", str(Path(text).expanduser().absolute()))


def hf_endpoint(endpoint: str | None = None) -> str:
    """The hub endpoint: the argument, else `HF_ENDPOINT` at call time, else huggingface.co."""
    value = endpoint or os.environ.get("HF_ENDPOINT") or hf_constants.ENDPOINT
    return value.rstrip("/")


def hf_resolve_url(repo: str, path: str, *, revision: str | None = None, endpoint: str | None = None) -> str:
    """`{endpoint}/{repo}/resolve/{revision}/{path}` built by huggingface_hub."""
    return hf_hub_url(repo, path, revision=revision, endpoint=hf_endpoint(endpoint))


def hf_token(token: str | None = None) -> str | None:
    """The explicit token, else `HF_TOKEN` from the environment."""
    return token or os.environ.get(TOKEN_ENV) or None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    try:
        port = parts.port or default
    except ValueError:
        port = None
    return parts.scheme, (parts.hostname or "").lower(), port


def is_hub_url(url: str, *, endpoint: str | None = None) -> bool:
    """True when `url` is on the hub's own origin (scheme, host and port of the endpoint):
    the only place a hub token may go."""
    return _origin(url) == _origin(hf_endpoint(endpoint))


def token_for(url: str, token: str | None, *, endpoint: str | None = None) -> str | None:
    """`token` when `url` is on the hub's origin, else None: a token never leaves the hub."""
    return token if token and is_hub_url(url, endpoint=endpoint) else None


def source_url(source: Source, *, endpoint: str | None = None) -> str:
    """The URL to fetch for an hf:// or http(s) source; globs and missing file paths are errors."""
    if source.scheme == "hf":
        if source.is_glob:
            raise MetadataError(
                f"{source} names a glob, not a file",
                "pin the file name (hf://org/repo/model-Q4_K_M.gguf) "
                "or run `clusterctl resolve` to pin it in the lock file",
            )
        if not source.path:
            raise MetadataError(f"{source} names no file", "append the file path: hf://org/repo/file")
        assert source.repo is not None
        return hf_resolve_url(source.repo, source.path, revision=source.revision, endpoint=endpoint)
    if source.scheme in ("http", "https"):
        return source.path
    raise MetadataError(f"{source} is not a remote source")


def _redact(url: str) -> str:
    """The URL without query string or credentials, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        port = None
    host = host_port(host, port) if port else (f"[{host}]" if ":" in host else host)
    return f"{parts.scheme}://{host}{parts.path}"


class HttpRangeReader:
    """`read_at(offset, length)` over HTTP range requests, counting the body bytes received.

    A server that ignores `Range` (answers 200 with the whole body) is read as one forward
    stream, only as far as the caller asks, then the connection is closed.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        client: httpx.Client | None = None,
        label: str | None = None,
    ) -> None:
        self.url = url
        self.label = label or _redact(url)
        self.size: int | None = None
        self.bytes_read = 0
        self.requests = 0
        self.repo_commit: str | None = None
        self.ranges_supported: bool | None = None
        self._own_client = client is None
        self._client = client or httpx.Client(timeout=DEFAULT_TIMEOUT)
        self._headers = {"Accept-Encoding": "identity", "User-Agent": f"clusterctl/{_version}"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._stream: httpx.Response | None = None
        self._stream_iter: Iterator[bytes] | None = None
        self._stream_pos = 0
        self._stream_rest = b""

    def __enter__(self) -> HttpRangeReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._close_stream()
        if self._own_client:
            self._client.close()

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._stream = None
        self._stream_iter = None
        self._stream_rest = b""

    def _open(self, headers: dict[str, str]) -> httpx.Response:
        def send() -> httpx.Response:
            self.requests += 1
            request = self._client.build_request("GET", self.url, headers=headers)
            # httpx drops Authorization when a redirect leaves the origin (tests pin this)
            return self._client.send(request, stream=True, follow_redirects=True)

        response = with_backoff(send, self.label, self.url)
        for r in (*response.history, response):
            commit = r.headers.get("x-repo-commit")
            if commit:
                self.repo_commit = commit
        if response.status_code >= 400 and response.status_code != 416:
            try:
                raise_for_status(response, self.label)
            finally:
                response.close()
        return response

    def read_at(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        if self._stream is not None:
            if offset >= self._stream_pos:
                return self._read_stream(offset, length)
            self._close_stream()
        headers = dict(self._headers)
        headers["Range"] = f"bytes={offset}-{offset + length - 1}"
        response = self._open(headers)
        if response.status_code == 416:
            self._learn_size(response.headers.get("content-range"))
            response.close()
            return b""
        if response.status_code == 206:
            self.ranges_supported = True
            try:
                start = self._learn_size(response.headers.get("content-range"))
                if start is not None and start != offset:
                    raise MetadataError(f"{self.label}: asked for bytes from {offset}, the server sent from {start}")
                data = self._read_body(response, length)
            finally:
                response.close()
            return data
        if response.status_code == 200:
            self.ranges_supported = False
            length_header = response.headers.get("content-length")
            if length_header and length_header.isdigit():
                self.size = int(length_header)
            self._stream = response
            self._stream_iter = response.iter_bytes(_STREAM_CHUNK)
            self._stream_pos = 0
            return self._read_stream(offset, length)
        response.close()
        raise MetadataError(f"{self.label}: unexpected HTTP {response.status_code}")

    def _read_body(self, response: httpx.Response, limit: int) -> bytes:
        chunks: list[bytes] = []
        got = 0
        try:
            for chunk in response.iter_bytes(_STREAM_CHUNK):
                self.bytes_read += len(chunk)
                chunks.append(chunk)
                got += len(chunk)
                if got >= limit:
                    break
        except httpx.TransportError as exc:
            raise NetworkError(f"connection lost reading {self.label}: {exc}") from exc
        return b"".join(chunks)[:limit]

    def _read_stream(self, offset: int, length: int) -> bytes:
        assert self._stream_iter is not None
        out = bytearray()
        try:
            while len(out) < length:
                if not self._stream_rest:
                    chunk = next(self._stream_iter, b"")
                    if not chunk:
                        break
                    self.bytes_read += len(chunk)
                    self._stream_rest = chunk
                rest = self._stream_rest
                if self._stream_pos < offset:
                    drop = min(len(rest), offset - self._stream_pos)
                    self._stream_rest = rest[drop:]
                    self._stream_pos += drop
                    continue
                take = min(len(rest), length - len(out))
                out += rest[:take]
                self._stream_rest = rest[take:]
                self._stream_pos += take
        except httpx.TransportError as exc:
            raise NetworkError(f"connection lost reading {self.label}: {exc}") from exc
        return bytes(out)

    def _learn_size(self, content_range: str | None) -> int | None:
        if not content_range:
            return None
        m = _CONTENT_RANGE.match(content_range.strip())
        if not m:
            return None
        if m.group(3) != "*":
            self.size = int(m.group(3))
        return int(m.group(1)) if m.group(1) is not None else None


RETRY_STATUSES = (429, 503)
MAX_ATTEMPTS = 4
MAX_WAIT = 30.0  # seconds: the longest Retry-After honoured; a longer one is an error now
_sleep = time.sleep  # tests replace it


def retry_after(response: httpx.Response, attempt: int) -> float:
    """Seconds to wait before the next attempt: the server's Retry-After (seconds or an HTTP
    date), else 1, 2, 4... seconds."""
    value = response.headers.get("retry-after", "").strip()
    if value.isdigit():
        return float(value)
    if value:
        with contextlib.suppress(TypeError, ValueError, IndexError):
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    return float(2 ** (attempt - 1))


def with_backoff(send: Callable[[], httpx.Response], label: str, url: str) -> httpx.Response:
    """`send()` with transport errors as NetworkError and 429/503 retried with bounded
    backoff (Retry-After honoured up to MAX_WAIT, at most MAX_ATTEMPTS tries)."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            response = send()
        except httpx.TimeoutException as exc:
            raise NetworkError(f"timed out reading {label}", "check the network or the endpoint") from exc
        except httpx.TransportError as exc:
            raise NetworkError(
                f"cannot reach {urlsplit(url).netloc}: {type(exc).__name__}: {exc}",
                "check the network, the URL or HF_ENDPOINT",
            ) from exc
        if response.status_code not in RETRY_STATUSES:
            return response
        wait = retry_after(response, attempt)
        if attempt == MAX_ATTEMPTS or wait > MAX_WAIT:
            response.close()
            what = "rate limited (HTTP 429)" if response.status_code == 429 else "unavailable (HTTP 503)"
            after = f"; it asks to wait {wait:.0f} s" if wait > MAX_WAIT else ""
            raise NetworkError(f"{label}: {what} after {attempt} attempt(s){after}",
                               "wait a while and run it again; a token (HF_TOKEN) raises the hub's limits")
        response.close()
        _sleep(wait)
    raise AssertionError("unreachable")


def raise_for_status(response: httpx.Response, label: str) -> None:
    """Turn an HTTP error status into a MetadataError (4xx) or NetworkError (5xx)."""
    status = response.status_code
    code = response.headers.get("x-error-code", "")
    detail = f" ({code})" if code else ""
    server_message = response.headers.get("x-error-message", "")
    if server_message:
        label = f"{label} [{server_message[:200]}]"
    if code == "GatedRepo" or status in (401, 403):
        if code in ("RepoNotFound", "RevisionNotFound", "EntryNotFound"):
            raise MetadataError(
                f"{label}: not found (HTTP {status}{detail})",
                f"check the repository id, the revision and the file name; a private repository also needs {TOKEN_ENV}",
            )
        raise MetadataError(
            f"{label}: access denied (HTTP {status}{detail}); the repository is gated or private",
            f"accept the model's licence on its hub page and set {TOKEN_ENV} to a token with read access",
        )
    if status == 404:
        raise MetadataError(
            f"{label}: not found (HTTP 404{detail})",
            "check the repository id, the revision and the file name (names are case-sensitive)",
        )
    if status >= 500:
        raise NetworkError(f"{label}: server error HTTP {status}", "try again later")
    raise MetadataError(f"{label}: HTTP {status}{detail}")


def _open_client(client: httpx.Client | None) -> tuple[httpx.Client, bool]:
    if client is not None:
        return client, False
    return httpx.Client(timeout=DEFAULT_TIMEOUT), True


def read_remote(
    url_or_source: str | Source,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    client: httpx.Client | None = None,
) -> ModelMeta:
    """Metadata of a remote GGUF (every part of a split model) read with range requests."""
    source = url_or_source if isinstance(url_or_source, Source) else parse_source(url_or_source)
    if source.scheme == "file":
        return gguf_reader.read_local(Path(source.path))
    token = hf_token(token) if source.scheme == "hf" else token
    first_url = source_url(source, endpoint=endpoint)
    if source.scheme == "hf":
        paths = gguf_reader.split_part_names(source.path)
        urls = [source_url(source.with_path(p), endpoint=endpoint) for p in paths]
    else:
        parts = urlsplit(first_url)
        paths = gguf_reader.split_part_names(parts.path)
        urls = [urlunsplit(parts._replace(path=p)) for p in paths]
    names = [unquote(p.rpartition("/")[2]) for p in paths]
    http, own = _open_client(client)
    headers: list[gguf_reader.GGUFHeader] = []
    commit: str | None = None
    try:
        for i, (url, name) in enumerate(zip(urls, names, strict=True)):
            label = str(source) if len(urls) == 1 else f"{source} (part {name})"
            first_chunk = gguf_reader.FIRST_CHUNK if i == 0 else gguf_reader.JUMP_CHUNK
            with HttpRangeReader(url, token=token_for(url, token, endpoint=endpoint), client=http,
                                 label=label) as reader:
                header = gguf_reader.read_gguf_header(reader.read_at, first_chunk=first_chunk)
                if reader.size is None:
                    raise MetadataError(f"{label}: the server did not tell the file size")
                header.file_size = reader.size
                header.bytes_read = reader.bytes_read
                commit = commit or reader.repo_commit
            headers.append(header)
            if len(names) == 1:
                declared = headers[0].get(gguf.Keys.Split.LLM_KV_SPLIT_COUNT)
                if isinstance(declared, int) and declared > 1:
                    raise MetadataError(
                        f"{source} is part of a {declared}-part split GGUF but is not named like one",
                        "point at the first part, NAME-00001-of-0000N.gguf",
                    )
    finally:
        if own:
            http.close()
    return gguf_reader.gguf_to_meta(
        headers,
        source=str(source),
        file_bytes=sum(h.file_size or 0 for h in headers),
        bytes_read=sum(h.bytes_read for h in headers),
        files=names,
        revision=commit or source.revision,
    )
