"""Remote GGUF metadata over HTTP range requests, against a real nginx laid out like the hub."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from clusterctl.errors import MetadataError, NetworkError
from clusterctl.models.gguf_reader import read_local
from clusterctl.models.remote import (
    HttpRangeReader,
    Source,
    hf_endpoint,
    hf_resolve_url,
    parse_source,
    read_remote,
)
from tests import assets
from tests.nginx_server import NginxServer, free_port, hub_layout, nginx_server

COMMIT = "0123456789abcdef0123456789abcdef01234567"
GEMMA_REPO = "google/gemma-3-270m-GGUF"
TINY_REPO = "acme/tiny-GGUF"
# the bytes a header read may differ from the local read: where it came from
ORIGIN = {"source", "revision"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic models laid out like the hub: <org>/<repo>/resolve/<rev>/<file>."""
    models = tmp_path_factory.mktemp("models")
    parts = assets.write_split_model(models, "tiny", 3)
    single = assets.write_llama_like(models / "tiny.gguf")
    truncated = models / "truncated.gguf"
    truncated.write_bytes(single.read_bytes()[:2000])
    root = tmp_path_factory.mktemp("www")
    files = {f"Q8_0/{p.name}": p for p in parts}
    files |= {"tiny.gguf": single, "truncated.gguf": truncated}
    hub_layout(root, TINY_REPO, "main", files)
    hub_layout(root, TINY_REPO, "v1.0", files)
    return root


@pytest.fixture(scope="module")
def server(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxServer]:
    locations = f"""
        add_header X-Repo-Commit {COMMIT};
        location /norange/ {{ alias {tree}/; max_ranges 0; }}
        location /private/ {{ return 401; }}
        location /gated/ {{ add_header X-Error-Code GatedRepo always; return 403; }}
        location /redirect/ {{ rewrite ^/redirect/(.*)$ /$1 redirect; }}
    """
    with nginx_server(tree, tmp_path_factory.mktemp("nginx"), locations=locations) as srv:
        yield srv


@pytest.fixture
def hub(server: NginxServer, monkeypatch: pytest.MonkeyPatch) -> NginxServer:
    """The server as HF_ENDPOINT (set after huggingface_hub was imported)."""
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    server.clear_access_log()
    return server


def gemma_on(server: NginxServer) -> Path:
    path: Path = assets.test_model_path()
    hub_layout(server.root, GEMMA_REPO, "main", {path.name: path})
    return path


def wait_for_log(server: NginxServer, status: int) -> list[int]:
    deadline = time.monotonic() + 5
    while True:
        statuses = [e.status for e in server.access_log()]
        if status in statuses or time.monotonic() > deadline:
            return statuses
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# source strings and URLs


def test_parse_hf_sources() -> None:
    assert parse_source("hf://org/repo/model.gguf") == Source("hf", "model.gguf", "org/repo", None)
    assert parse_source("hf://org/repo@abc123/dir/m-00001-of-00002.gguf") == Source(
        "hf", "dir/m-00001-of-00002.gguf", "org/repo", "abc123"
    )
    assert parse_source("hf://org/repo@refs%2Fpr%2F3/m.gguf").revision == "refs/pr/3"
    assert parse_source("hf://org/repo").path == ""
    glob = parse_source("hf://org/repo/*Q4_K_M*.gguf")
    assert glob.is_glob and glob.path == "*Q4_K_M*.gguf"
    assert str(parse_source("hf://org/repo@v2/a/b.gguf")) == "hf://org/repo@v2/a/b.gguf"


def test_parse_other_sources(tmp_path: Path) -> None:
    assert parse_source("https://host/x/m.gguf?download=1") == Source("https", "https://host/x/m.gguf?download=1")
    assert parse_source("https://host/x/m.gguf?download=1").filename == "m.gguf"
    assert parse_source("file:///models/m.gguf") == Source("file", "/models/m.gguf")
    assert parse_source(str(tmp_path / "m.gguf")) == Source("file", str(tmp_path / "m.gguf"))
    for bad in ("hf://justrepo", "hf://org/repo/../x.gguf", "ftp://h/x", "file://relative/x"):
        with pytest.raises(MetadataError):
            parse_source(bad)


def test_glob_needs_pinning() -> None:
    with pytest.raises(MetadataError, match="glob") as info:
        read_remote("hf://org/repo/*Q4_K_M*.gguf")
    assert info.value.hint is not None and "pin" in info.value.hint


def test_hf_endpoint_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert hf_resolve_url("org/repo", "m.gguf") == "https://huggingface.co/org/repo/resolve/main/m.gguf"
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.local:8080/")
    assert hf_endpoint() == "http://mirror.local:8080"
    assert (
        hf_resolve_url("org/repo", "d/m.gguf", revision="v1") == "http://mirror.local:8080/org/repo/resolve/v1/d/m.gguf"
    )
    assert hf_resolve_url("org/repo", "m.gguf", endpoint="http://other:1").startswith(
        "http://other:1/org/repo/resolve/main/"
    )


# ---------------------------------------------------------------------------------------------
# against nginx


@pytest.mark.real
def test_split_model_over_http(hub: NginxServer, tree: Path) -> None:
    meta = read_remote(f"hf://{TINY_REPO}/Q8_0/tiny-00001-of-00003.gguf")
    local = read_local(tree / TINY_REPO / "resolve/main/Q8_0/tiny-00001-of-00003.gguf")
    assert meta.model_dump(exclude=ORIGIN) == local.model_dump(exclude=ORIGIN)
    assert meta.files == ["tiny-00001-of-00003.gguf", "tiny-00002-of-00003.gguf", "tiny-00003-of-00003.gguf"]
    assert meta.source == f"hf://{TINY_REPO}/Q8_0/tiny-00001-of-00003.gguf"
    assert meta.revision == COMMIT
    log = hub.access_log()
    assert {e.status for e in log} == {206}
    assert all(e.range.startswith("bytes=") for e in log)
    assert meta.header_bytes_read == sum(e.body_bytes_sent for e in log)


@pytest.mark.real
def test_any_part_and_plain_url(hub: NginxServer, tree: Path) -> None:
    url = f"{hub.url}/{TINY_REPO}/resolve/v1.0/Q8_0/tiny-00002-of-00003.gguf"
    meta = read_remote(url)
    local = read_local(tree / TINY_REPO / "resolve/main/Q8_0/tiny-00001-of-00003.gguf")
    assert meta.model_dump(exclude=ORIGIN) == local.model_dump(exclude=ORIGIN)
    assert meta.source == url


@pytest.mark.real
def test_single_file_revision_and_redirect(hub: NginxServer, tree: Path) -> None:
    local = read_local(tree / TINY_REPO / "resolve/main/tiny.gguf")
    meta = read_remote(f"hf://{TINY_REPO}@v1.0/tiny.gguf", endpoint=f"{hub.url}/redirect")
    assert meta.model_dump(exclude=ORIGIN) == local.model_dump(exclude=ORIGIN)
    assert meta.revision == COMMIT
    assert 302 in [e.status for e in hub.access_log()]


@pytest.mark.real
def test_token_is_a_header_only(hub: NginxServer) -> None:
    read_remote(f"hf://{TINY_REPO}/tiny.gguf", token="hf_secret_value")
    log = hub.access_log()
    assert log and all(e.authorization == "Bearer hf_secret_value" for e in log)
    assert not any("secret" in e.uri for e in log)


@pytest.mark.real
def test_token_from_environment(hub: NginxServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    read_remote(f"hf://{TINY_REPO}/tiny.gguf")
    assert {e.authorization for e in hub.access_log()} == {"Bearer hf_from_env"}


@pytest.mark.real
def test_not_found(hub: NginxServer) -> None:
    with pytest.raises(MetadataError, match=r"not found \(HTTP 404") as info:
        read_remote(f"hf://{TINY_REPO}/missing.gguf")
    assert info.value.hint is not None and "revision" in info.value.hint
    with pytest.raises(MetadataError, match="HTTP 404"):
        read_remote(f"hf://{TINY_REPO}@no-such-rev/tiny.gguf")


@pytest.mark.real
def test_missing_split_part(hub: NginxServer, tree: Path) -> None:
    target = tree / TINY_REPO / "resolve/main/Q8_0/tiny-00003-of-00003.gguf"
    saved = target.readlink()
    target.unlink()
    try:
        with pytest.raises(MetadataError, match=r"part tiny-00003-of-00003\.gguf.*HTTP 404"):
            read_remote(f"hf://{TINY_REPO}/Q8_0/tiny-00001-of-00003.gguf")
    finally:
        target.symlink_to(saved)


@pytest.mark.real
def test_unauthorized(hub: NginxServer) -> None:
    with pytest.raises(MetadataError, match=r"access denied \(HTTP 401\)") as info:
        read_remote("hf://private/repo/model.gguf")
    assert info.value.hint is not None and "HF_TOKEN" in info.value.hint


@pytest.mark.real
def test_gated(hub: NginxServer) -> None:
    with pytest.raises(MetadataError, match=r"HTTP 403 \(GatedRepo\)") as info:
        read_remote("hf://gated/repo/model.gguf", token="hf_no_access")
    assert info.value.hint is not None and "licence" in info.value.hint


@pytest.mark.real
def test_truncated_remote_file(hub: NginxServer) -> None:
    with pytest.raises(MetadataError, match="ends inside its header"):
        read_remote(f"hf://{TINY_REPO}/truncated.gguf")


def test_connection_refused() -> None:
    port = free_port()
    with pytest.raises(NetworkError, match=f"cannot reach 127.0.0.1:{port}"):
        read_remote("hf://org/repo/m.gguf", endpoint=f"http://127.0.0.1:{port}")


@pytest.mark.real
def test_server_ignoring_range_split(hub: NginxServer, tree: Path) -> None:
    meta = read_remote(f"hf://{TINY_REPO}/Q8_0/tiny-00001-of-00003.gguf", endpoint=f"{hub.url}/norange")
    local = read_local(tree / TINY_REPO / "resolve/main/Q8_0/tiny-00001-of-00003.gguf")
    assert meta.model_dump(exclude={*ORIGIN, "header_bytes_read"}) == local.model_dump(
        exclude={*ORIGIN, "header_bytes_read"}
    )
    assert 200 in wait_for_log(hub, 200)


@pytest.mark.real
def test_passed_client_is_left_open(hub: NginxServer) -> None:
    with httpx.Client() as client:
        read_remote(f"hf://{TINY_REPO}/tiny.gguf", client=client)
        assert not client.is_closed
        read_remote(f"hf://{TINY_REPO}/tiny.gguf", client=client)


@pytest.mark.real
def test_range_reader_counts_body_bytes(hub: NginxServer) -> None:
    url = f"{hub.url}/{TINY_REPO}/resolve/main/tiny.gguf"
    with HttpRangeReader(url) as reader:
        assert reader.read_at(4, 4) == (3).to_bytes(4, "little")
        assert reader.read_at(100, 10) and reader.bytes_read == 14
        size = (hub.root / TINY_REPO / "resolve/main/tiny.gguf").stat().st_size
        assert reader.size == size
        assert reader.read_at(size + 10, 5) == b""
        assert reader.ranges_supported


# ---------------------------------------------------------------------------------------------
# the real Gemma file over nginx


@pytest.mark.real
def test_gemma_over_http_equals_local(hub: NginxServer) -> None:
    path = gemma_on(hub)
    start = time.perf_counter()
    local = read_local(path)
    local_s = time.perf_counter() - start
    start = time.perf_counter()
    meta = read_remote(f"hf://{GEMMA_REPO}/{path.name}")
    remote_s = time.perf_counter() - start
    print(
        f"\nGemma header: local {local_s * 1000:.1f} ms, nginx {remote_s * 1000:.1f} ms, "
        f"{meta.header_bytes_read} bytes over {len(hub.access_log())} range requests"
    )
    assert meta.model_dump(exclude=ORIGIN) == local.model_dump(exclude=ORIGIN)
    assert meta.revision == COMMIT
    assert meta.file_bytes == 253_113_024
    # the vocabulary strings (4,412,563 bytes) must be walked; scores/types are skipped
    assert meta.header_bytes_read == local.header_bytes_read < 5 << 20
    assert meta.header_bytes_read == sum(e.body_bytes_sent for e in hub.access_log())


@pytest.mark.real
def test_gemma_server_ignoring_range(hub: NginxServer) -> None:
    path = gemma_on(hub)
    start = time.perf_counter()
    meta = read_remote(f"hf://{GEMMA_REPO}/{path.name}", endpoint=f"{hub.url}/norange")
    elapsed = time.perf_counter() - start
    print(f"\nGemma header without Range: {meta.header_bytes_read} bytes, {elapsed * 1000:.1f} ms")
    local = read_local(path)
    same = {*ORIGIN, "header_bytes_read"}
    assert meta.model_dump(exclude=same) == local.model_dump(exclude=same)
    # the stream is read up to the end of the tensor infos (6,525,120) and then closed
    assert 6_500_000 < meta.header_bytes_read < 7 << 20
    assert 200 in wait_for_log(hub, 200)
    sent = [e.body_bytes_sent for e in hub.access_log() if e.status == 200]
    assert sent and max(sent) < 253_113_024 // 2
