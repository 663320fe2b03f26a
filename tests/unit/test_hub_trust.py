"""Hostile and odd input around the hub and deploy (issue: no traceback, no hang, no leaked
token): the token stays on the hub's origin, hub files are pinned and verified, 429 is retried
within bounds, exit codes keep their cause, dry runs read no secret, a failing probe is an
error, bench's temporary file is private, `router serve` explains a busy port."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clusterctl.cli import app
from clusterctl.deploy import facts
from clusterctl.deploy.desired import DeployError, build_desired
from clusterctl.deploy.executor import NodeResult
from clusterctl.deploy.rollout import DeployResult, deploy
from clusterctl.errors import ExitCode, MetadataError, NetworkError, most_severe
from clusterctl.inventory import Inventory, load_inventory
from clusterctl.lockfile import LockedModel, LockFile, read_lock
from clusterctl.models import remote
from clusterctl.models.meta import FilePin, ModelMeta
from clusterctl.models.pins import hub_pins
from clusterctl.render import render
from clusterctl.transport import CommandResult, ConnectError
from tests.fake_hub import COMMIT, FakeHub, serve
from tests.fakenode import FakeNode

TOKEN = "hf_canary_0123456789"
runner = CliRunner()


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(remote, "_sleep", lambda s: None)


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with serve(FakeHub(files={"org/repo": {}})) as h:
        yield h


@pytest.fixture
def other() -> Iterator[FakeHub]:
    """Another server, not the hub: it must never see the token."""
    with serve(FakeHub(files={"files": {}})) as h:
        yield h


def auth_seen(server: FakeHub) -> list[str]:
    return [h["authorization"] for _, _, h in server.requests if "authorization" in h]


# -- the token goes to the hub's origin only ----------------------------------------------------

def test_token_is_not_sent_to_a_url_on_another_host(hub: FakeHub, other: FakeHub) -> None:
    other.files["files"]["m.gguf"] = b"not a gguf file at all....."
    with pytest.raises(MetadataError):
        remote.read_remote(f"{other.url}/files/m.gguf", token=TOKEN, endpoint=hub.url)
    assert len(other.requests) >= 1 and auth_seen(other) == []


def test_token_is_sent_to_the_hub_but_not_across_its_redirect(hub: FakeHub, other: FakeHub) -> None:
    other.files["files"]["m.gguf"] = b"not a gguf file at all....."
    hub.redirect["/org/repo/resolve/main/m.gguf"] = f"{other.url}/files/m.gguf"
    with pytest.raises(MetadataError):
        remote.read_remote("hf://org/repo/m.gguf", token=TOKEN, endpoint=hub.url)
    assert auth_seen(hub) == [f"Bearer {TOKEN}"]
    assert len(other.requests) == 1 and auth_seen(other) == []


def test_token_for_compares_scheme_host_and_port() -> None:
    end = "https://hub.example"
    assert remote.token_for("https://hub.example/org/r/resolve/main/f", TOKEN, endpoint=end) == TOKEN
    assert remote.token_for("https://HUB.example:443/x", TOKEN, endpoint=end) == TOKEN
    assert remote.token_for("http://hub.example/x", TOKEN, endpoint=end) is None
    assert remote.token_for("https://hub.example:8443/x", TOKEN, endpoint=end) is None
    assert remote.token_for("https://hub.example.evil/x", TOKEN, endpoint=end) is None


def test_inspect_of_an_https_url_sends_no_token(hub: FakeHub, other: FakeHub, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    other.files["files"]["m.gguf"] = b"GGUF-but-truncated"
    result = runner.invoke(app, ["inspect", f"{other.url}/files/m.gguf"])
    assert result.exit_code == ExitCode.METADATA, result.output
    assert auth_seen(other) == []


def test_node_pull_sends_no_token_to_a_plain_https_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_HUB_TOKEN", TOKEN)
    inv = inventory(tmp_path, "  m: {source: 'https://files.example/m.gguf', format: gguf, size: 12B}\n")
    n1 = fake_node()
    n1.urls["https://files.example/m.gguf"] = b"plain-weight"
    result = deploy(inv, LockFile(), render(inv, None), lambda n: n1, phases=("acquire",))  # type: ignore[arg-type]
    assert result.ok, result.nodes["n1"].failed
    assert [r.stdin for r in n1.ran if r.argv[0] == "curl" and "--output" in r.argv] == [b""]


def test_node_pull_refuses_a_curl_that_forwards_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_HUB_TOKEN", TOKEN)
    inv = inventory(tmp_path, "  m: {source: 'hf://org/repo/m.gguf', format: gguf, size: 12B}\n")
    n1 = fake_node()
    n1.curl_version = "7.29.0"
    n1.urls["https://hub.test/org/repo/resolve/main/m.gguf"] = b"hub-weights!"
    result = deploy(inv, LockFile(), render(inv, None), lambda n: n1, phases=("acquire",))  # type: ignore[arg-type]
    assert result.nodes["n1"].failed == (
        "n1: curl is 7.29.0; before 7.58.0 it sends the hub token on to the host a redirect points at (upgrade "
        "curl on the node to 7.58.0 or later, or copy the model to the controller and use a file:// source)")
    assert result.exit_code == ExitCode.DEPLOY_FAILED
    assert not any(r.argv[0] == "curl" and "--output" in r.argv for r in n1.ran)


def test_an_https_hub_pull_forbids_redirects_to_http(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_HUB_TOKEN", TOKEN)
    inv = inventory(tmp_path, "  m: {source: 'hf://org/repo/m.gguf', format: gguf, size: 12B}\n")
    n1 = fake_node()
    n1.urls["https://hub.test/org/repo/resolve/main/m.gguf"] = b"hub-weights!"
    result = deploy(inv, LockFile(), render(inv, None), lambda n: n1, phases=("acquire",))  # type: ignore[arg-type]
    assert result.ok, result.nodes["n1"].failed
    (pull,) = [r for r in n1.ran if r.argv[0] == "curl" and "--output" in r.argv]
    assert "--location-trusted" not in pull.argv
    assert pull.argv[pull.argv.index("--proto-redir") + 1] == "=https"
    assert pull.stdin == f"Authorization: Bearer {TOKEN}\n".encode()


# -- 429: bounded backoff, a network error ------------------------------------------------------

def test_429_is_retried_honouring_retry_after(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(remote, "_sleep", waits.append)
    hub.files["org/repo"]["m.gguf"] = b"not a gguf"
    hub.script = [(429, {"Retry-After": "2"}), (429, {})]
    with pytest.raises(MetadataError):
        remote.read_remote("hf://org/repo/m.gguf", endpoint=hub.url)
    assert waits == [2.0, 2.0]  # the server's 2 s, then 2**(2-1) without a header


def test_429_that_persists_is_a_network_error_exit_6(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(remote, "_sleep", waits.append)
    hub.script = [(429, {"Retry-After": "1"})] * 10
    with pytest.raises(NetworkError) as info:
        remote.read_remote("hf://org/repo/m.gguf", endpoint=hub.url)
    assert info.value.exit_code == ExitCode.NETWORK == 6
    assert str(info.value) == "hf://org/repo/m.gguf: rate limited (HTTP 429) after 4 attempt(s)"
    assert waits == [1.0, 1.0, 1.0] and len(hub.requests) == 4


def test_a_retry_after_past_the_bound_fails_at_once(hub: FakeHub) -> None:
    hub.script = [(429, {"Retry-After": "3600"})]
    with pytest.raises(NetworkError, match=r"after 1 attempt\(s\); it asks to wait 3600 s"):
        remote.read_remote("hf://org/repo/m.gguf", endpoint=hub.url)
    assert len(hub.requests) == 1


# -- per-file pins from the hub's paths-info, verified by deploy --------------------------------

PART1, PART2 = b"first-part--", b"second-part!"
PARTS = ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]


def test_hub_pins_are_the_lfs_sha256_and_size(hub: FakeHub) -> None:
    hub.files["org/repo"] = {f"q8/{PARTS[0]}": PART1, f"q8/{PARTS[1]}": PART2, "q8/README.md": b"hi"}
    pins = hub_pins(f"hf://org/repo/q8/{PARTS[0]}", PARTS, format="gguf", revision=COMMIT, endpoint=hub.url,
                    token=TOKEN)
    assert pins == {PARTS[0]: FilePin(size=12, sha256=hashlib.sha256(PART1).hexdigest()),
                    PARTS[1]: FilePin(size=12, sha256=hashlib.sha256(PART2).hexdigest())}
    (post,) = [r for r in hub.requests if r[0] == "POST"]
    assert post[1] == f"/api/models/org/repo/paths-info/{COMMIT}" and post[2]["authorization"] == f"Bearer {TOKEN}"


def test_a_plain_git_file_is_pinned_by_size_and_a_missing_one_refused(hub: FakeHub) -> None:
    hub.files["org/repo"] = {"config.json": b"{}"}
    hub.plain.add("config.json")
    assert hub_pins("hf://org/repo", ["config.json"], format="safetensors", revision=None, endpoint=hub.url) == {
        "config.json": FilePin(size=2, sha256=None)}
    with pytest.raises(MetadataError, match=r"the hub lists no model.safetensors"):
        hub_pins("hf://org/repo", ["model.safetensors"], format="safetensors", revision=None, endpoint=hub.url)


def test_hub_pins_of_an_unknown_revision_is_a_metadata_error(hub: FakeHub) -> None:
    hub.files["org/repo"] = {"m.gguf": b"x"}
    with pytest.raises(MetadataError) as info:
        hub_pins("hf://org/repo/m.gguf", ["m.gguf"], format="gguf", revision="nope", endpoint=hub.url)
    assert info.value.exit_code == ExitCode.METADATA


def meta(files: list[str], size: int) -> ModelMeta:
    return ModelMeta(format="gguf", architecture="llama", files=files, file_bytes=size, n_layer=1, n_embd=8,
                     n_head=1, n_head_kv=1, head_dim_k=8, head_dim_v=8, n_vocab=10, n_ctx_train=16)


def split_lock(pinned: bool) -> LockFile:
    source = f"hf://org/repo/{PARTS[0]}"
    pins = {PARTS[0]: FilePin(size=12, sha256=hashlib.sha256(PART1).hexdigest()),
            PARTS[1]: FilePin(size=12, sha256=hashlib.sha256(PART2).hexdigest())}
    return LockFile(models={"m": LockedModel(source=source, revision=COMMIT, meta=meta(PARTS, 24),
                                             files=pins if pinned else None)})


SPLIT = f"  m: {{source: 'hf://org/repo/{PARTS[0]}', format: gguf, size: 24B}}\n"


def test_split_parts_get_their_own_size_and_sha(tmp_path: Path) -> None:
    inv = inventory(tmp_path, SPLIT)
    (d,) = build_desired(inv, split_lock(True), render(inv, None)).values()
    assert [(w.path, w.size, w.sha256) for w in d.weights] == [
        (f"/opt/models/m/{PARTS[0]}", 12, hashlib.sha256(PART1).hexdigest()),
        (f"/opt/models/m/{PARTS[1]}", 12, hashlib.sha256(PART2).hexdigest())]
    # a lock from before per-file pins still loads and deploys; parts then have no size to expect
    (old,) = build_desired(inv, split_lock(False), render(inv, None)).values()
    assert [(w.size, w.sha256) for w in old.weights] == [(0, None), (0, None)]


def test_deploy_refuses_a_corrupted_part(tmp_path: Path) -> None:
    inv = inventory(tmp_path, SPLIT)
    n1 = fake_node()
    base = f"https://hub.test/org/repo/resolve/{COMMIT}"
    n1.urls[f"{base}/{PARTS[0]}"] = PART1
    n1.urls[f"{base}/{PARTS[1]}"] = b"second-part?"  # same size, other bytes
    result = deploy(inv, split_lock(True), render(inv, None), lambda n: n1,  # type: ignore[arg-type]
                    phases=("acquire",))
    failed = result.nodes["n1"].failed
    assert failed == (f"n1: /opt/models/m/{PARTS[1]} failed verification (sha256 "
                      f"{hashlib.sha256(b'second-part?').hexdigest()[:16]}..., expected "
                      f"{hashlib.sha256(PART2).hexdigest()[:16]}...); the partial file was removed (run deploy "
                      "again to fetch it anew; the previous file is untouched)")
    assert n1.files[f"/opt/models/m/{PARTS[0]}"][0] == PART1
    assert f"/opt/models/m/{PARTS[1]}" not in n1.files and f"/opt/models/m/{PARTS[1]}.part" not in n1.files
    assert result.exit_code == ExitCode.DEPLOY_FAILED


def test_deploy_places_pinned_parts(tmp_path: Path) -> None:
    inv = inventory(tmp_path, SPLIT)
    n1 = fake_node()
    base = f"https://hub.test/org/repo/resolve/{COMMIT}"
    n1.urls[f"{base}/{PARTS[0]}"], n1.urls[f"{base}/{PARTS[1]}"] = PART1, PART2
    result = deploy(inv, split_lock(True), render(inv, None), lambda n: n1,  # type: ignore[arg-type]
                    phases=("acquire",))
    assert result.ok, result.nodes["n1"].failed
    manifest = json.loads(n1.files["/opt/clusterctl/state/manifest.json"][0])
    assert manifest[f"/opt/models/m/{PARTS[1]}"] == {"sha256": hashlib.sha256(PART2).hexdigest(), "size": 12}


def test_an_old_lock_without_pins_loads(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    data = split_lock(False).model_dump(mode="json", exclude_none=True)
    assert "files" not in data["models"]["m"]
    path.write_text(json.dumps(data))
    assert read_lock(path).models["m"].files is None


# -- exit codes keep their cause --------------------------------------------------------------

def test_the_most_severe_exit_code_wins() -> None:
    unreachable, broken, config = NodeResult("a"), NodeResult("b"), NodeResult("c")
    unreachable.fail(ConnectError("a: connection refused"))
    broken.fail(DeployError("b: download failed"))
    assert DeployResult({"a": unreachable, "b": broken}, False).exit_code == ExitCode.NETWORK
    config.fail(MetadataError("c: no such model"))
    assert DeployResult({"a": unreachable, "b": broken, "c": config}, False).exit_code == ExitCode.METADATA
    rolled_back = NodeResult("d", failed="d: web did not start; it was new, so it was stopped")
    assert DeployResult({"d": rolled_back}, False).exit_code == ExitCode.DEPLOY_FAILED
    assert DeployResult({"e": NodeResult("e")}, False).exit_code == ExitCode.OK
    assert most_severe([ExitCode.DEPLOY_FAILED, ExitCode.USAGE, ExitCode.NETWORK]) == ExitCode.USAGE
    assert unreachable.failed == "a: connection refused" and broken.error is not None


def test_paramiko_records_never_reach_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    import clusterctl.transport.ssh  # noqa: F401  (configures the logger on import)

    log = logging.getLogger("paramiko.transport")
    log.error("Exception (client): Traceback (most recent call last): ...")
    assert capsys.readouterr().err == ""


def test_router_serve_on_a_busy_port_is_exit_6_with_a_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    import clusterctl.router.cli as router_cli
    import clusterctl.router.server as server
    from clusterctl.router import validate

    monkeypatch.setattr(validate, "load_checked", lambda path, check_files: type(
        "T", (), {"listen_host": "127.0.0.1", "listen_port": 8000})())

    def busy(table: object, host: str | None, port: int | None) -> None:
        raise OSError(errno.EADDRINUSE, "Address already in use")

    monkeypatch.setattr(server, "serve", busy)
    result = runner.invoke(router_cli.router_app, ["serve", "--routes", str(tmp_path / "r.json"), "--port", "9"])
    assert result.exit_code == ExitCode.NETWORK
    assert result.output == ("error: cannot listen on 127.0.0.1:9: Address already in use\n"
                             "  hint: another process listens on that port: stop it, or choose another with --port\n")


# -- dry runs read no secret; a failing probe; bench's temp file --------------------------------

def test_dry_run_needs_no_secret_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAKE_API_KEY", raising=False)
    inv = inventory(tmp_path, "", api_key=True)
    n1 = fake_node()
    n1.add_file("/etc/clusterctl/secrets/web.key", b"old\n", 0o600)
    result = deploy(inv, LockFile(), render(inv, None), lambda n: n1, dry_run=True)  # type: ignore[arg-type]
    assert result.ok, result.nodes["n1"].failed
    (secret,) = [s for s in result.nodes["n1"].steps if s.kind == "secret"]
    assert (secret.target, secret.reason, secret.sensitive) == (
        "/etc/clusterctl/secrets/web.key", "not compared: a dry run does not read secrets", True)
    with pytest.raises(DeployError, match="secret env:FAKE_API_KEY is not set"):
        deploy(inv, LockFile(), render(inv, None), lambda n: n1)  # type: ignore[arg-type]
    # a value that is set is compared: the same one is no step, another one is "changed"
    monkeypatch.setenv("FAKE_API_KEY", "old")
    same = deploy(inv, LockFile(), render(inv, None), lambda n: n1, dry_run=True)  # type: ignore[arg-type]
    assert [s for s in same.nodes["n1"].steps if s.kind == "secret"] == []
    monkeypatch.setenv("FAKE_API_KEY", "new")
    other = deploy(inv, LockFile(), render(inv, None), lambda n: n1, dry_run=True)  # type: ignore[arg-type]
    assert [(s.target, s.reason) for s in other.nodes["n1"].steps if s.kind == "secret"] == [
        ("/etc/clusterctl/secrets/web.key", "changed")]


class FailingProbe:
    host = "n1"

    def run(self, argv: list[str], **kw: object) -> CommandResult:
        return CommandResult(tuple(argv), 127, b"", b"bash: line 1: stat: command not found\n", 0.1)


def test_a_failing_probe_is_an_error_naming_the_node() -> None:
    with pytest.raises(DeployError) as info:
        facts.gather(FailingProbe(), base="/opt/clusterctl", files=[], handles=[], weights=[], dirs=[],  # type: ignore[arg-type]
                     manager="systemd")
    assert str(info.value) == "n1: gathering facts failed (probe exit 127): bash: line 1: stat: command not found"


def test_bench_body_goes_to_a_private_folder() -> None:
    from clusterctl import bench

    class T:
        host = "n1"

        def __init__(self) -> None:
            self.ran: list[list[str]] = []
            self.puts: list[tuple[str, int]] = []

        def run(self, argv: list[str], **kw: object) -> CommandResult:
            self.ran.append(list(argv))
            out = b"/tmp/clusterctl-bench.Xq81ZpLm\n" if argv[0] == "mktemp" else b""
            return CommandResult(tuple(argv), 0, out, b"", 0.0)

        def put(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
            self.puts.append((path, mode))

    t = T()
    bench._load(t, "http://127.0.0.1:8081/v1/chat/completions", {"x": 1}, 1, None)  # type: ignore[arg-type]
    assert t.ran[0] == ["mktemp", "-d", "-t", "clusterctl-bench.XXXXXXXX"]
    assert t.puts == [("/tmp/clusterctl-bench.Xq81ZpLm/body.json", 0o600)]
    assert t.ran[1][4:] == ["1", "/tmp/clusterctl-bench.Xq81ZpLm/body.json", "http://127.0.0.1:8081/v1/chat/completions"]
    assert t.ran[-1] == ["rm", "-rf", "--", "/tmp/clusterctl-bench.Xq81ZpLm"]


# -- helpers ----------------------------------------------------------------------------------

def fake_node() -> FakeNode:
    n = FakeNode("n1")
    n.add_file("/usr/bin/python3", b"ELF", 0o755)
    n.service("web", 8081)
    return n


def inventory(tmp: Path, models: str, *, api_key: bool = False) -> Inventory:
    model = "    model: m\n" if models else ""
    key = "    api_key: {env: FAKE_API_KEY}\n" if api_key else ""
    text = ("cluster:\n  name: fake\n  defaults: {models_dir: /opt/models}\n"
            "  huggingface: {endpoint: 'https://hub.test', token: {env: FAKE_HUB_TOKEN}}\n"
            "nodes:\n  n1: {address: 10.0.0.1, ram: 8GiB}\n" + (f"models:\n{models}" if models else "") +
            "services:\n  web:\n    engine: custom\n    node: n1\n    port: 8081\n    health_path: /health\n"
            f"{model}{key}    command: [/usr/bin/python3, -m, web]\n")
    path = tmp / "fake.yaml"
    path.write_text(text)
    return load_inventory(path)
