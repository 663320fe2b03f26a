"""SSHTransport and trust against a real OpenSSH server on 127.0.0.1 (tests/sshd.py).

The "node" is this machine, so the tests look at the node's side directly: file modes with
os.stat, processes with pgrep, the sshd log.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from clusterctl.transport import CommandTimeout, ConnectError, HostKeyError, TransportError
from clusterctl.transport.ssh import SSHTransport, scan_host_key
from clusterctl.transport.trust import trust
from tests.sshd import SSHServer, free_port, keygen, sshd, sudo_user

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    with sshd(tmp_path_factory.mktemp("sshd")) as s:
        yield s


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[SSHServer]:
    """A server of the test's own, for tests that restart it with another host key."""
    with sshd(tmp_path / "sshd") as s:
        yield s


@pytest.fixture
def known_hosts(server: SSHServer, tmp_path: Path) -> Path:
    return server.write_known_hosts(tmp_path / "known_hosts")


def transport(server: SSHServer, known_hosts: Path, **kwargs: object) -> SSHTransport:
    options: dict[str, object] = {"port": server.port, "user": "root", "key_filename": str(server.client_key),
                                  "known_hosts": str(known_hosts), "connect_timeout": 5.0}
    options.update(kwargs)
    return SSHTransport("node1", server.host, **options)  # type: ignore[arg-type]


@pytest.fixture
def node(server: SSHServer, known_hosts: Path) -> Iterator[SSHTransport]:
    t = transport(server, known_hosts)
    yield t
    t.close()


def pgrep(pattern: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return out.split()


# -- commands -------------------------------------------------------------------------------


def test_quoting_is_exact(node: SSHTransport) -> None:
    assert node.run(["echo", "a b;c"]).stdout == b"a b;c\n"
    nasty = ["$HOME", "`id`", "$(id)", "'single'", '"double"', "a\\b", "", "*", "x\ny", "; rm -rf /", "ü"]
    result = node.run(["printf", "%s|", *nasty])
    assert result.rc == 0
    assert result.stdout == ("|".join(nasty) + "|").encode()


def test_exit_code_and_exact_stderr_bytes(node: SSHTransport) -> None:
    result = node.run(["sh", "-c", "exit 7"])
    assert result.rc == 7 and not result.ok
    result = node.run(["sh", "-c", r"printf 'o\000\377' && printf 'e\001\n' >&2 && exit 3"])
    assert (result.rc, result.stdout, result.stderr) == (3, b"o\x00\xff", b"e\x01\n")


def test_stdin_round_trip(node: SSHTransport) -> None:
    data = os.urandom(3 << 20)
    result = node.run(["cat"], input=data)
    assert result.ok and result.stdout == data
    assert node.run(["cat"]).stdout == b""  # no input: end of file at once


def test_env_values_arrive_exactly(node: SSHTransport) -> None:
    value = "a b'c\"$HOME`id`"
    result = node.run(["sh", "-c", 'printf %s "$CCTEST_VALUE"'], env={"CCTEST_VALUE": value})
    assert result.stdout == value.encode()
    with pytest.raises(ValueError):
        node.run(["true"], env={"BAD NAME": "x"})


def test_timeout_kills_the_command_and_its_children(node: SSHTransport) -> None:
    duration = f"29.{secrets.randbelow(10**6):06d}"
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        node.run(["sh", "-c", f"sleep {duration} & sleep {duration}; wait"], timeout=1.0)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0 + 2.0, elapsed
    assert "node1" in str(info.value) and "sleep" in str(info.value)
    deadline = time.monotonic() + 3
    while pgrep(f"sleep {duration}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pgrep(f"sleep {duration}") == []
    # the connection is still usable
    assert node.run(["echo", "ok"]).stdout == b"ok\n"


def test_plain_sleep_is_killed_on_timeout(node: SSHTransport) -> None:
    duration = f"30.{secrets.randbelow(10**6):06d}"
    started = time.monotonic()
    with pytest.raises(CommandTimeout):
        node.run(["sleep", duration], timeout=0.5)
    assert time.monotonic() - started < 0.5 + 2.0
    time.sleep(0.2)
    assert pgrep(f"sleep {duration}") == []


def test_agent_is_not_forwarded(server: SSHServer, known_hosts: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        subprocess.run(["ssh-add", str(server.client_key)], env={**os.environ, "SSH_AUTH_SOCK": str(sock)},
                       check=True, capture_output=True)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        for key in (str(server.client_key), None):  # with a key file, and through the agent
            with transport(server, known_hosts, key_filename=key) as t:
                result = t.run(["env"])
            assert result.ok
            assert "SSH_AUTH_SOCK" not in result.out
    finally:
        agent.terminate()
        agent.wait(5)


# -- host keys and connection errors --------------------------------------------------------


def test_unknown_host_key_is_refused_before_anything_runs(server: SSHServer, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"  # does not exist
    marker = tmp_path / "marker"
    with pytest.raises(HostKeyError) as info:
        transport(server, known_hosts).run(["touch", str(marker)])
    message = str(info.value)
    assert server.fingerprint() in message and "ssh-ed25519" in message
    assert info.value.hint is not None and "clusterctl trust -i INVENTORY node1" in info.value.hint
    assert not marker.exists()
    assert not known_hosts.exists()


def test_unknown_host_key_with_other_hosts_known(server: SSHServer, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    # the right key, but for another name (port 22): not this host
    key_type, b64 = server.host_key()
    known_hosts.write_text(f"{server.host} {key_type} {b64}\n")
    before = known_hosts.read_bytes()
    with pytest.raises(HostKeyError):
        transport(server, known_hosts).run(["true"])
    assert known_hosts.read_bytes() == before


def test_system_known_hosts_are_not_used(server: SSHServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    server.write_known_hosts(home / ".ssh" / "known_hosts")
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(HostKeyError):
        transport(server, tmp_path / "empty_known_hosts").run(["true"])


def test_changed_host_key_names_both_fingerprints(own_server: SSHServer, tmp_path: Path) -> None:
    known_hosts = own_server.write_known_hosts(tmp_path / "known_hosts", "main")
    with transport(own_server, known_hosts) as t:
        assert t.run(["true"]).ok
    before = known_hosts.read_bytes()
    own_server.restart(host_key="other")
    marker = tmp_path / "marker"
    with pytest.raises(HostKeyError) as info:
        transport(own_server, known_hosts).run(["touch", str(marker)])
    message = str(info.value)
    assert own_server.fingerprint("main") in message
    assert own_server.fingerprint("other") in message
    assert "CHANGED" in message
    assert known_hosts.read_bytes() == before
    assert not marker.exists()


def test_connection_refused(tmp_path: Path) -> None:
    port = free_port()
    t = SSHTransport("node1", "127.0.0.1", port=port, user="root", key_filename=None,
                     known_hosts=str(tmp_path / "kh"), connect_timeout=3.0)
    with pytest.raises(ConnectError) as info:
        t.run(["true"])
    assert "refused" in str(info.value)
    assert info.value.hint


def test_no_ssh_server_answering_times_out(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        t = SSHTransport("node1", "127.0.0.1", port=listener.getsockname()[1], user="root", key_filename=None,
                         known_hosts=str(tmp_path / "kh"), connect_timeout=1.0)
        started = time.monotonic()
        with pytest.raises(ConnectError) as info:
            t.open()
        assert time.monotonic() - started < 5
        assert "handshake" in str(info.value) or "SSH server" in str(info.value)
    finally:
        listener.close()


def test_authentication_failure(server: SSHServer, known_hosts: Path, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    keygen(stranger, "not-authorized")
    with pytest.raises(ConnectError) as info:
        transport(server, known_hosts, key_filename=str(stranger)).run(["true"])
    assert "authentication failed" in str(info.value)
    with pytest.raises(ConnectError) as missing:
        transport(server, known_hosts, key_filename=str(tmp_path / "nope")).run(["true"])
    assert "does not exist" in str(missing.value)


# -- files ----------------------------------------------------------------------------------


def test_put_creates_parents_with_the_final_mode(node: SSHTransport, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a" / "b" / "secret.env"
    modes_at_creation: list[int] = []
    real_chmod = paramiko.SFTPFile.chmod

    def spy(self: paramiko.SFTPFile, mode: int) -> None:
        # before our chmod: the temp file exists with the mode it was created with
        for tmp in target.parent.glob(".secret.env.clusterctl-*"):
            modes_at_creation.append(tmp.stat().st_mode & 0o777)
        real_chmod(self, mode)

    monkeypatch.setattr(paramiko.SFTPFile, "chmod", spy)
    node.put(str(target), b"TOKEN=1\n", mode=0o600)
    assert target.read_bytes() == b"TOKEN=1\n"
    assert target.stat().st_mode & 0o7777 == 0o600
    assert modes_at_creation == [0o600]  # the server's sftp umask is 000: no help from it
    node.put(str(target), b"TOKEN=2\n", mode=0o640)
    assert target.read_bytes() == b"TOKEN=2\n"
    assert target.stat().st_mode & 0o7777 == 0o640
    assert [p.name for p in target.parent.iterdir()] == ["secret.env"]


def test_put_is_atomic_for_readers(node: SSHTransport, tmp_path: Path) -> None:
    target = tmp_path / "big.bin"
    old, new = b"o" * (2 << 20), b"n" * (2 << 20)
    node.put(str(target), old)
    seen: set[bytes] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            data = target.read_bytes()
            seen.add(hashlib.sha256(data).digest())
            time.sleep(0.001)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(5):
            node.put(str(target), new)
            node.put(str(target), old)
    finally:
        stop.set()
        thread.join()
    assert seen <= {hashlib.sha256(old).digest(), hashlib.sha256(new).digest()}


def test_failed_put_leaves_the_old_content_and_no_temp_file(node: SSHTransport, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "etc" / "config.yaml"
    node.put(str(target), b"old\n")

    def fail(self: paramiko.SFTPClient, old: str, new: str) -> None:
        raise OSError(errno.EIO, "simulated failure")

    monkeypatch.setattr(paramiko.SFTPClient, "posix_rename", fail)
    with pytest.raises(TransportError):
        node.put(str(target), b"new content\n")
    assert target.read_bytes() == b"old\n"
    assert [p.name for p in target.parent.iterdir()] == ["config.yaml"]


def test_get(node: SSHTransport, tmp_path: Path) -> None:
    assert node.get(str(tmp_path / "missing")) is None
    data = os.urandom(5 << 20)
    (tmp_path / "blob").write_bytes(data)
    assert node.get(str(tmp_path / "blob")) == data


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_push_resumes_from_a_remote_prefix(node: SSHTransport, tmp_path: Path) -> None:
    source = tmp_path / "model.gguf"
    size = 64 << 20
    with open(source, "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    remote = tmp_path / "node" / "models" / "model.gguf.part"
    remote.parent.mkdir(parents=True)
    prefix = 23 * (1 << 20) + 12345
    with open(source, "rb") as src, open(remote, "wb") as dst:
        dst.write(src.read(prefix))
    calls: list[tuple[int, int]] = []
    sent = node.push(str(source), str(remote), mode=0o640, progress=lambda done, total: calls.append((done, total)))
    assert sent == size - prefix
    assert _sha256(remote) == _sha256(source)
    assert remote.stat().st_mode & 0o777 == 0o640
    assert calls[0] == (prefix, size) and calls[-1] == (size, size)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    # complete already: nothing to send
    assert node.push(str(source), str(remote)) == 0
    # a remote file longer than the source is not a prefix: start over
    with open(remote, "ab") as f:
        f.write(b"junk")
    assert node.push(str(source), str(remote)) == size
    assert _sha256(remote) == _sha256(source)


def test_push_fresh_file_creates_parents_with_mode(node: SSHTransport, tmp_path: Path) -> None:
    source = tmp_path / "src.bin"
    source.write_bytes(os.urandom(3 << 20))
    remote = tmp_path / "x" / "y" / "dst.bin"
    assert node.push(str(source), str(remote), mode=0o600) == 3 << 20
    assert remote.read_bytes() == source.read_bytes()
    assert remote.stat().st_mode & 0o777 == 0o600


# -- sudo as a non-root user ------------------------------------------------------------------


def test_sudo_with_password_never_leaks_it(server: SSHServer, known_hosts: Path, tmp_path: Path) -> None:
    with sudo_user(server) as user:
        with transport(server, known_hosts, user=user.name, sudo_password=user.password) as t:
            assert t.run(["id", "-u"]).stdout != b"0\n"
            assert t.run(["id", "-u"], sudo=True).stdout == b"0\n"
            data = b"line one\nline two\n" + os.urandom(1000)
            result = t.run(["cat"], input=data, sudo=True)
            assert result.ok and result.stdout == data
            assert user.password.encode() not in result.stdout + result.stderr
            result = t.run(["sh", "-c", 'printf %s "$CCTEST"'], env={"CCTEST": "v"}, sudo=True)
            assert result.stdout == b"v"
            duration = f"27.{secrets.randbelow(10**6):06d}"
            started = time.monotonic()
            with pytest.raises(CommandTimeout):
                t.run(["sleep", duration], sudo=True, timeout=1.0)
            assert time.monotonic() - started < 1.0 + 2.0
            time.sleep(0.2)
            assert pgrep(f"sleep {duration}") == []
            # root-only target: staged in /tmp, moved with sudo install + mv
            target = Path("/root") / f".clusterctl-test-{secrets.token_hex(4)}" / "unit.conf"
            try:
                t.put(str(target), b"[Unit]\n", mode=0o640)
                st = target.stat()
                assert (st.st_uid, st.st_mode & 0o777, target.read_bytes()) == (0, 0o640, b"[Unit]\n")
                assert t.get(str(target)) == b"[Unit]\n"
                assert t.get(str(target.parent / "missing")) is None
            finally:
                shutil.rmtree(target.parent, ignore_errors=True)
        with transport(server, known_hosts, user=user.name, sudo_password="wrong") as t:
            result = t.run(["cat"], input=b"secret input", sudo=True)
            assert result.rc != 0 and result.stdout == b""
        with transport(server, known_hosts, user=user.name) as t:
            started = time.monotonic()
            result = t.run(["id", "-u"], sudo=True)
            assert result.rc != 0 and "password is required" in result.err
            assert time.monotonic() - started < 5


def test_sudo_nopasswd_does_not_receive_the_password(server: SSHServer, known_hosts: Path) -> None:
    with sudo_user(server, nopasswd=True) as user:
        with transport(server, known_hosts, user=user.name, sudo_password=user.password) as t:
            result = t.run(["cat"], input=b"exact", sudo=True)
            assert (result.rc, result.stdout) == (0, b"exact")
            assert t.run(["cat"], sudo=True).stdout == b""
        with transport(server, known_hosts, user=user.name) as t:
            assert t.run(["id", "-u"], sudo=True).stdout == b"0\n"


# -- trust ----------------------------------------------------------------------------------


def test_scan_host_key(server: SSHServer) -> None:
    key_type, b64, fp = scan_host_key(server.host, server.port, timeout=5)
    assert (key_type, b64) == server.host_key()
    assert fp == server.fingerprint()
    with pytest.raises(ConnectError):
        scan_host_key("127.0.0.1", free_port(), timeout=2)


def test_trust_records_once_and_refuses_a_different_key(own_server: SSHServer, tmp_path: Path) -> None:
    known_hosts = tmp_path / "ssh" / "known_hosts"
    prompts: list[str] = []

    def yes(message: str) -> bool:
        prompts.append(message)
        return True

    assert "not trusted" in trust("node1", own_server.host, own_server.port, str(known_hosts), confirm=lambda m: False)
    assert not known_hosts.exists()

    message = trust("node1", own_server.host, own_server.port, str(known_hosts), confirm=yes)
    assert prompts == [f"node1 {own_server.known_hosts_name} ssh-ed25519 {own_server.fingerprint()}"]
    assert "recorded" in message
    assert known_hosts.read_text() == own_server.known_hosts_line()
    assert known_hosts.stat().st_mode & 0o777 == 0o600
    with transport(own_server, known_hosts) as t:
        assert t.run(["true"]).ok

    before = known_hosts.read_bytes()
    message = trust("node1", own_server.host, own_server.port, str(known_hosts), confirm=yes)
    assert "already trusted" in message and len(prompts) == 1
    assert known_hosts.read_bytes() == before

    own_server.restart(host_key="other")
    with pytest.raises(HostKeyError) as info:
        trust("node1", own_server.host, own_server.port, str(known_hosts), confirm=yes)
    assert own_server.fingerprint("main") in str(info.value)
    assert own_server.fingerprint("other") in str(info.value)
    assert known_hosts.read_bytes() == before and len(prompts) == 1

    message = trust("node1", own_server.host, own_server.port, str(known_hosts), confirm=yes, replace=True)
    assert "replacing 1 old entry" in message
    assert known_hosts.read_text() == own_server.known_hosts_line("other")
    with transport(own_server, known_hosts) as t:
        assert t.run(["true"]).ok


def test_trust_keeps_other_lines_and_sees_hashed_entries(own_server: SSHServer, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    other = "# comment\nexample.org ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBp0Mw9gZ3ZNq1y4JHkDM1oMRc0A7mXGQ3r3a5kHh0cW\n"
    known_hosts.write_text(other.rstrip("\n"))  # no final newline
    trust("node1", own_server.host, own_server.port, str(known_hosts), confirm=lambda m: True)
    assert known_hosts.read_text() == other + own_server.known_hosts_line()

    hashed = tmp_path / "hashed"
    shutil.copy(known_hosts, hashed)
    subprocess.run(["ssh-keygen", "-H", "-f", str(hashed)], check=True, capture_output=True)
    before = hashed.read_bytes()
    assert b"|1|" in before
    message = trust("node1", own_server.host, own_server.port, str(hashed), confirm=lambda m: True)
    assert "already trusted" in message and hashed.read_bytes() == before
    with transport(own_server, hashed) as t:
        assert t.run(["true"]).ok
