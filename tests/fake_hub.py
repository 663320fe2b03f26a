"""A Hugging Face hub on loopback that speaks the hub's own protocol, for the tests:

    GET  /{repo}/resolve/{revision}/{path}       the file (Range requests: 206 + Content-Range),
                                                  X-Repo-Commit, X-Error-Code on 404
    POST /api/models/{repo}/paths-info/{revision} form fields `paths` (repeated) and `expand`:
                                                  a JSON list, one entry per existing path:
                                                  {"type": "file", "oid", "size", "path",
                                                   "lfs": {"oid": sha256, "size", "pointerSize"}}

(the fields huggingface_hub's HfApi.get_paths_info reads into RepoFile/BlobLfsInfo). Files
are LFS files unless listed in `plain`. `script` answers the next requests first (a status,
headers), e.g. 429 with Retry-After; `redirect` sends a resolve request to another URL (the
hub's CDN redirect). `requests` records (method, path, headers) of everything seen.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)  # repo -> {path: content}
    plain: set[str] = field(default_factory=set)  # paths kept in plain git (no LFS entry)
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    redirect: dict[str, str] = field(default_factory=dict)  # resolve path -> Location
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    url: str = ""

    def entry(self, path: str, data: bytes) -> dict[str, object]:
        git_oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        info: dict[str, object] = {"type": "file", "oid": git_oid, "size": len(data), "path": path}
        if path not in self.plain:
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n" \
                      f"size {len(data)}\n"
            info["oid"] = hashlib.sha1(b"blob %d\0" % len(pointer) + pointer.encode()).hexdigest()
            info["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}
        return info


@contextmanager
def serve(hub: FakeHub) -> Iterator[FakeHub]:
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _scripted(self) -> bool:
            with lock:
                self_headers = {k.lower(): v for k, v in self.headers.items()}
                hub.requests.append((self.command, self.path, self_headers))
                step = hub.script.pop(0) if hub.script else None
            if step is None:
                return False
            status, headers = step
            self._reply(status, b"", headers)
            return True

        def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _repo_and_rest(self, path: str) -> tuple[str, str] | None:
            for repo in hub.files:
                if path.startswith(f"/{repo}/"):
                    return repo, path[len(repo) + 2:]
            return None

        def do_GET(self) -> None:
            if self._scripted():
                return
            path = unquote(self.path.split("?", 1)[0])
            if path in hub.redirect:
                self._reply(302, b"", {"Location": hub.redirect[path], "X-Repo-Commit": COMMIT})
                return
            found = self._repo_and_rest(path)
            if found is None:
                self._reply(401, b"", {"X-Error-Code": "RepoNotFound"})
                return
            repo, rest = found
            kind, _, rest = rest.partition("/")
            revision, _, file = rest.partition("/")
            data = hub.files[repo].get(file)
            if kind != "resolve" or revision not in ("main", COMMIT) or data is None:
                self._reply(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
                return
            headers = {"X-Repo-Commit": COMMIT, "Accept-Ranges": "bytes", "ETag": f'"{self._sha(data)}"'}
            rng = self.headers.get("Range", "")
            if rng.startswith("bytes="):
                first, _, last = rng[len("bytes="):].partition("-")
                start = int(first)
                end = min(int(last) if last else len(data) - 1, len(data) - 1)
                if start >= len(data):
                    self._reply(416, b"", {"Content-Range": f"bytes */{len(data)}", **headers})
                    return
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                self._reply(206, data[start:end + 1], headers)
                return
            self._reply(200, data, headers)

        do_HEAD = do_GET

        @staticmethod
        def _sha(data: bytes) -> str:
            return hashlib.sha256(data).hexdigest()

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self._scripted():
                return
            path = unquote(self.path.split("?", 1)[0])
            prefix = "/api/models/"
            found = self._repo_and_rest("/" + path[len(prefix):]) if path.startswith(prefix) else None
            if found is None:
                self._reply(404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound",
                                                                       "Content-Type": "application/json"})
                return
            repo, rest = found
            kind, _, revision = rest.partition("/")
            if kind != "paths-info" or revision not in ("main", COMMIT):
                self._reply(404, b'{"error":"Invalid rev id"}', {"X-Error-Code": "RevisionNotFound",
                                                                 "Content-Type": "application/json"})
                return
            form = parse_qs(body.decode())
            wanted = form.get("paths", [])
            listing = [hub.entry(p, hub.files[repo][p]) for p in wanted if p in hub.files[repo]]
            self._reply(200, json.dumps(listing).encode(), {"Content-Type": "application/json"})

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
