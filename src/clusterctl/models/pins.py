"""Per-file pins of a hub model: each file's size and LFS sha256 from the hub's own metadata.

`resolve` asks the hub (huggingface_hub's `HfApi.get_paths_info`, one request per model, at
the pinned commit) and writes the answer into the lock file; deploy checks every downloaded
file, each part of a split GGUF included, against its pin before moving it into place.
"""

from __future__ import annotations

import contextlib
from typing import Any, cast

import httpx

from clusterctl.errors import MetadataError, NetworkError
from clusterctl.models import remote
from clusterctl.models.meta import FilePin


def _transport_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, httpx.HTTPError]
    with contextlib.suppress(ImportError):  # huggingface_hub >= 1.0 talks through httpx2
        import httpx2

        errors.append(httpx2.HTTPError)
    return tuple(errors)


def repo_paths(source: remote.Source, files: list[str], format: str) -> dict[str, str]:
    """{file name as the lock lists it: its path in the repository}. A GGUF source names a
    file (its parts sit beside it); a safetensors/MLX source names a folder."""
    folder = source.path.rsplit("/", 1)[0] if format == "gguf" and "/" in source.path else (
        "" if format == "gguf" else source.path.strip("/"))
    return {name: f"{folder}/{name}" if folder else name for name in files}


def hub_pins(source: str | remote.Source, files: list[str], *, format: str, revision: str | None,
             token: str | None = None, endpoint: str | None = None) -> dict[str, FilePin]:
    """{file name: FilePin(size, sha256)} of `files` in the hub repository of `source`.

    A file the hub does not list is an error (it would be downloaded unverified); a file kept
    in plain git (no LFS) is pinned by size only, since the hub gives no sha256 for it."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    src = source if isinstance(source, remote.Source) else remote.parse_source(source)
    if src.scheme != "hf" or not files:
        return {}
    assert src.repo is not None
    paths = repo_paths(src, files, format)
    url = remote.hf_endpoint(endpoint)
    label = f"hf://{src.repo} (file metadata)"
    api = HfApi(endpoint=url, token=remote.token_for(url, remote.hf_token(token), endpoint=endpoint) or False)
    rev = revision or src.revision
    infos: list[Any] = []
    for attempt in range(1, remote.MAX_ATTEMPTS + 1):
        try:
            infos = api.get_paths_info(src.repo, sorted(set(paths.values())), revision=rev)
            break
        except HfHubHTTPError as exc:
            response = exc.response
            if response is None:
                raise NetworkError(f"{label}: {exc}", "check the network or HF_ENDPOINT") from None
            status = response.status_code
            if status in remote.RETRY_STATUSES:
                wait = remote.retry_after(cast(httpx.Response, response), attempt)
                if attempt < remote.MAX_ATTEMPTS and wait <= remote.MAX_WAIT:
                    remote._sleep(wait)
                    continue
                raise NetworkError(f"{label}: HTTP {status} after {attempt} attempt(s)",
                                   "wait a while and run resolve again") from None
            remote.raise_for_status(cast(httpx.Response, response), label)
            raise MetadataError(f"{label}: HTTP {status}") from None
        except _transport_errors() as exc:
            raise NetworkError(f"cannot reach {url}: {type(exc).__name__}: {exc}",
                               "check the network, the URL or HF_ENDPOINT") from None
    by_path = {info.path: info for info in infos if hasattr(info, "size")}
    missing = [p for p in paths.values() if p not in by_path]
    if missing:
        raise MetadataError(f"hf://{src.repo}@{rev or 'main'}: the hub lists no {', '.join(missing)}",
                            "check the file names and the revision, then run resolve again")
    pins: dict[str, FilePin] = {}
    for name, path in paths.items():
        info = by_path[path]
        lfs = getattr(info, "lfs", None)
        sha = lfs.sha256 if lfs is not None else None
        size = lfs.size if lfs is not None else info.size
        pins[name] = FilePin(size=int(size), sha256=str(sha) if sha else None)
    return pins
