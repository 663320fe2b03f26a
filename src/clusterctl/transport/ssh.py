"""The SSH transport, on Fabric's `Connection` and Paramiko channels/SFTP (the only module that
imports them).

Host keys: only the known_hosts file given by the inventory is consulted: no system host keys,
no ~/.ssh/config, no automatic adding. An unknown key or a changed key stops the connection
before authentication, so nothing runs on a node we have not recognised; `clusterctl trust`
(transport/trust.py, through `scan_host_key`) is the only writer of known_hosts.

Commands: argv lists joined with `shlex.join` and run by the login shell of the node's user,
which must be POSIX-like (sh, bash, dash, zsh). Every command has a timeout; on expiry the
remote process group is signalled (SIGTERM, then SIGKILL) and the channel closed. Secrets go
over stdin, never argv: `env=` values are visible on the node's process list.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import logging
import os
import posixpath
import secrets
import shlex
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import fabric
import paramiko
from paramiko.sftp import (
    CMD_EXTENDED,
    CMD_HANDLE,
    CMD_OPEN,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_EXCL,
    SFTP_FLAG_TRUNC,
    SFTP_FLAG_WRITE,
)
from paramiko.ssh_exception import NoValidConnectionsError

from clusterctl.layout import host_port
from clusterctl.transport import (
    CommandResult,
    CommandTimeout,
    ConnectError,
    HostKeyError,
    Progress,
    TransportError,
)
from clusterctl.transport.local import (
    KILL_GRACE,
    READ_SIZE,
    Exchange,
    check_argv,
    command_argv,
    display,
    env_assignments,
    install_with_sudo,
    read_with_sudo,
    timeout_message,
)

# Paramiko logs a failed negotiation or a dropped connection with its traceback; with no
# handler configured, Python's last-resort handler prints that to stderr. The failure reaches
# the user once, as the typed error this module raises, so Paramiko's own records go nowhere.
_PARAMIKO_LOG = logging.getLogger("paramiko")
_PARAMIKO_LOG.addHandler(logging.NullHandler())
_PARAMIKO_LOG.propagate = False

WINDOW_SIZE = 8 << 20  # receive window per channel (the default 2 MiB limits `get` of large files)
PUSH_CHUNK = 1 << 20  # bytes read from the local file per write
# AES-GCM needs one AEAD pass per packet instead of a cipher pass plus an HMAC: in Paramiko it is
# markedly faster (see docs/ssh.md). Preferred when the server offers it.
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
# Paramiko puts at most (max packet - 64) bytes of channel data in one SSH packet; an SFTP write
# adds length, type, id, handle, offset and data length (25 bytes + the handle) to its data.
CHANNEL_PACKET_MARGIN = 64
SFTP_WRITE_HEADER = 25


# -- host keys ------------------------------------------------------------------------------


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint (`ssh-keygen -l`): SHA256:<unpadded base64>."""
    return sha256_fingerprint(key.asbytes())


def sha256_fingerprint(blob: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def known_hosts_name(address: str, port: int) -> str:
    """How known_hosts names a host: `address`, or `[address]:port` off port 22."""
    return address if port == 22 else f"[{address}]:{port}"


def scan_host_key(address: str, port: int = 22, timeout: float = 10.0,
                  prefer: Sequence[str] = ()) -> tuple[str, str, str]:
    """Connect, read the host key the server offers, hang up without authenticating.

    Returns (key type, base64 of the key, SHA256 fingerprint). Without `prefer` the key type is
    the one a connection with an empty known_hosts negotiates (ed25519 where the server has
    one); `prefer` (known_hosts key types) asks for those first, as a connection does when
    known_hosts already holds a key of that type.
    """
    where = host_port(address, port)
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except OSError as exc:
        raise _connect_error(exc, where, where, timeout) from exc
    transport = _new_transport(sock)
    _prefer_key_types(transport, prefer)
    try:
        transport.start_client(timeout=timeout)
        key = transport.get_remote_server_key()
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise _connect_error(exc, where, where, timeout) from exc
    finally:
        transport.close()
        sock.close()
    return key.get_name(), key.get_base64(), fingerprint(key)


def _prefer_key_types(transport: paramiko.Transport, prefer: Sequence[str]) -> None:
    options = transport.get_security_options()
    current = list(options.key_types)
    wanted: list[str] = []
    for key_type in prefer:
        # known_hosts says ssh-rsa; the handshake asks for an RSA signature algorithm
        for name in (["rsa-sha2-512", "rsa-sha2-256"] if key_type == "ssh-rsa" else [key_type]):
            if name in current and name not in wanted:
                wanted.append(name)
    if wanted:
        options.key_types = tuple(wanted + [k for k in current if k not in wanted])


class _RejectUnknownKey(paramiko.MissingHostKeyPolicy):
    """Unknown host key: refuse, with what is needed to check the key and record it."""

    def __init__(self, node: str, known_hosts: str) -> None:
        self.node = node
        self.known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise HostKeyError(
            f"{self.node}: unknown host key: {hostname} offered {key.get_name()} {fingerprint(key)}, "
            f"which is not in {self.known_hosts}; nothing was run on it",
            f"compare the fingerprint with `ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub` run on the node, "
            f"then `clusterctl trust -i INVENTORY {self.node}` records it after you confirm",
            host=self.node)


def _new_transport(sock: Any, **kwargs: Any) -> paramiko.Transport:
    """A Paramiko transport with a larger receive window and AES-GCM first."""
    transport = paramiko.Transport(sock, default_window_size=WINDOW_SIZE, **kwargs)
    options = transport.get_security_options()
    current = list(options.ciphers)
    fast = [c for c in FAST_CIPHERS if c in current]
    options.ciphers = tuple(fast + [c for c in current if c not in fast])
    return transport


def _connect_error(exc: BaseException, node: str, where: str, timeout: float) -> ConnectError:
    """A ConnectError that says which of refused / timeout / no route / DNS / auth it was."""
    def err(what: str, hint: str) -> ConnectError:
        return ConnectError(f"{node}: {what}", hint, host=node)

    if isinstance(exc, paramiko.PasswordRequiredException):
        return err(f"the key for {where} is encrypted and no passphrase was given",
                   "use an unencrypted deploy key, or load the key into ssh-agent and leave `key` unset")
    if isinstance(exc, paramiko.AuthenticationException):
        return err(f"authentication failed for {where} ({exc})",
                   "check the user and that the public half of the key is in the user's "
                   "~/.ssh/authorized_keys on the node")
    if isinstance(exc, NoValidConnectionsError):
        codes = {getattr(e, "errno", None) for e in exc.errors.values()}
        if codes == {errno.ECONNREFUSED}:
            return err(f"connection refused by {where}",
                       "is sshd running on the node and listening on that port? (a firewall may reject it)")
        return err(f"no route to {where}", "check the address, the network and the node's power")
    if isinstance(exc, socket.gaierror):
        return err(f"cannot resolve the host name in {where} ({exc.strerror})",
                   "check the address in the inventory and the controller's DNS")
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError
        return err(f"timed out after {timeout:g}s connecting to {where}",
                   "is the node up and the address right? a firewall may be dropping packets")
    if isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
        return err(f"connection refused by {where}",
                   "is sshd running on the node and listening on that port? (a firewall may reject it)")
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return err(f"no route to {where}", "check the address, the network and the node's power")
    if isinstance(exc, paramiko.SSHException) and "no existing session" in str(exc).lower():
        # Paramiko's handshake wait ended at the timeout without raising; the next step found
        # no session
        return err(f"{where} did not complete the SSH handshake within {timeout:g}s",
                   "check the port (is it an SSH server?); the node may also be overloaded")
    if isinstance(exc, paramiko.SSHException) and "banner" in str(exc).lower():
        return err(f"{where} did not answer as an SSH server ({exc})",
                   "check the port; the server may also be overloaded (MaxStartups)")
    if isinstance(exc, EOFError):
        return err(f"{where} closed the connection during the SSH handshake",
                   "see the node's sshd log (MaxStartups, AllowUsers, fail2ban ...)")
    return err(f"cannot connect to {where}: {exc}", "see the node's sshd log")


# -- SFTP helpers -----------------------------------------------------------------------------


def _sftp_create(sftp: paramiko.SFTPClient, path: str, mode: int, *, exclusive: bool,
                 bufsize: int = -1) -> paramiko.SFTPFile:
    """Open `path` for writing, created with `mode` in the OPEN request itself.

    `SFTPClient.open` sends no attributes, so a new file would start at 0666 minus the server's
    umask (world-readable) until a chmod: here the permissions travel with the open, and the
    caller chmods afterwards only to restore bits the umask removed.
    """
    attrs = paramiko.SFTPAttributes()
    attrs.st_mode = mode & 0o7777
    flags = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | (SFTP_FLAG_EXCL if exclusive else SFTP_FLAG_TRUNC)
    kind, msg = sftp._request(CMD_OPEN, path, flags, attrs)  # type: ignore[attr-defined]
    if kind != CMD_HANDLE:
        raise paramiko.SFTPError("expected a file handle")
    return paramiko.SFTPFile(sftp, msg.get_binary(), "w", bufsize)


def _sftp_fsync(sftp: paramiko.SFTPClient, f: paramiko.SFTPFile) -> bool:
    """fsync on the server (OpenSSH's fsync@openssh.com); False when unsupported."""
    try:
        sftp._request(CMD_EXTENDED, "fsync@openssh.com", f.handle)  # type: ignore[attr-defined]
    except (OSError, paramiko.SFTPError):
        return False
    return True


class _PidMarker:
    """Learns the remote process id of a command, for killing it on timeout.

    Commands run as `sh -c 'printf "%s%s]" "$0" "$$" >&2 && exec "$@"' [clusterctl-pid-TOKEN: argv`:
    the first bytes on stderr name the process, which then becomes argv (same pid). sshd makes
    each session its own process group, led by the login shell, which execs our `sh`; killing
    that group reaches the command and everything it started. The marker is removed from the
    stderr the caller sees. (sshd's own "signal" channel request is refused for root sessions,
    the common case here, so it is not used.)
    """

    SCRIPT = 'printf "%s%s]" "$0" "$$" >&2 && exec "$@"'
    LIMIT = 1 << 16  # give up looking after this much stderr

    def __init__(self, read: Callable[[], bytes]) -> None:
        self.prefix = f"[clusterctl-pid-{secrets.token_hex(8)}:".encode()
        self.pid: int | None = None
        self._read = read
        self._pending = bytearray()
        self._done = False

    def wrap(self, argv: Sequence[str]) -> list[str]:
        return ["sh", "-c", self.SCRIPT, self.prefix.decode(), *argv]

    def read(self) -> bytes:
        """`read` for stderr with the marker taken out; b"" only at end of file."""
        while True:
            data = self._read()
            if self._done:
                return data
            if not data:
                self._done = True
                return self._flush()
            self._pending += data
            start = self._pending.find(self.prefix)
            if start >= 0:
                end = self._pending.find(b"]", start + len(self.prefix))
                if end >= 0:
                    with contextlib.suppress(ValueError):
                        self.pid = int(self._pending[start + len(self.prefix):end])
                    del self._pending[start:end + 1]
                    self._done = True
            elif len(self._pending) > self.LIMIT:
                self._done = True
            if self._done:
                out = self._flush()
                if out:
                    return out

    def _flush(self) -> bytes:
        out = bytes(self._pending)
        self._pending.clear()
        return out


# `sh -c KILL_SCRIPT sh PID SIGNAL`: signal PID's process group (PID alone if that fails).
KILL_SCRIPT = (
    'pg=$(ps -o pgid= -p "$1" 2>/dev/null | tr -d " "); '
    'kill -s "$2" -- "-${pg:-$1}" 2>/dev/null || kill -s "$2" "$1" 2>/dev/null'
)


# -- the transport ----------------------------------------------------------------------------


class SSHTransport:
    """One node over SSH. Connects on first use (or `open()`), reconnects when the link dropped.

    Used from one thread at a time (the protocol's rule); use one transport per node and thread.
    """

    def __init__(self, name: str, address: str, *, port: int = 22, user: str = "root",
                 key_filename: str | None = None, known_hosts: str, connect_timeout: float = 10.0,
                 keepalive: float = 15.0, sudo_password: str | None = None) -> None:
        self.host = name
        self.address = address
        self.port = port
        self.user = user
        self.key_filename = key_filename
        self.known_hosts = known_hosts
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.sudo_password = sudo_password
        self._conn: Any = None  # fabric.Connection
        self._sftp_client: paramiko.SFTPClient | None = None
        self._fsync_ok: bool | None = None

    @property
    def where(self) -> str:
        return f"{self.user}@{host_port(self.address, self.port)}"

    def __repr__(self) -> str:
        return f"SSHTransport({self.host!r}, {self.where!r})"

    def __enter__(self) -> SSHTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connection ---------------------------------------------------------------------------

    def open(self) -> None:
        """Connect now: verify the host key against known_hosts only, then authenticate."""
        if self._conn is not None and self._conn.is_connected:
            return
        self.close()
        if self.key_filename is not None and not os.path.isfile(self.key_filename):
            raise ConnectError(f"{self.host}: key file {self.key_filename} does not exist",
                               "set ssh.key in the inventory to the private key used for the nodes",
                               host=self.host)
        timeout = self.connect_timeout
        connect_kwargs: dict[str, Any] = {
            "timeout": timeout,
            "banner_timeout": timeout,
            "auth_timeout": timeout,
            "channel_timeout": timeout,
            # a key file is the only identity when given; else ssh-agent and ~/.ssh/id_*
            "allow_agent": self.key_filename is None,
            "look_for_keys": self.key_filename is None,
            "transport_factory": _new_transport,
        }
        if self.key_filename is not None:
            connect_kwargs["key_filename"] = [self.key_filename]
        # An explicit empty SSHConfig and lazy=True: no ~/.ssh/config, /etc/ssh/ssh_config or
        # Fabric config files can change the host, port, user, identities or proxy.
        config = fabric.Config(lazy=True, ssh_config=paramiko.SSHConfig(),
                               overrides={"load_ssh_configs": False, "forward_agent": False})
        conn = fabric.Connection(self.address, user=self.user, port=self.port, config=config,
                                 forward_agent=False, connect_kwargs=connect_kwargs)
        client: paramiko.SSHClient = conn.client
        # Fabric installs AutoAddPolicy; never accept a key we do not already know.
        client.set_missing_host_key_policy(_RejectUnknownKey(self.host, self.known_hosts))
        self._load_known_hosts(client)
        try:
            conn.open()
        except HostKeyError:
            conn.close()
            raise
        except paramiko.BadHostKeyException as exc:
            conn.close()
            raise self._changed_key(exc) from None
        except Exception as exc:
            conn.close()
            raise _connect_error(exc, self.host, self.where, timeout) from exc
        except BaseException:  # Ctrl-C during the handshake
            conn.close()
            raise
        transport: paramiko.Transport = conn.transport
        if self.keepalive > 0:  # SSH-level keepalive: notices a dead peer, keeps NAT state alive
            transport.set_keepalive(max(1, round(self.keepalive)))
        with contextlib.suppress(OSError, AttributeError):
            transport.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # type: ignore[union-attr]
            # no Nagle delay: each command is a few small packets, and waiting for delayed ACKs
            # cost about 40 ms per command
            transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
        # a dead peer must end blocked writes too: Paramiko's keepalive asks for no reply, so the
        # kernel notices instead (idle probes, and a limit on unacknowledged data)
        with contextlib.suppress(OSError, AttributeError):
            sock = transport.sock
            idle = max(1, round(self.keepalive))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)  # type: ignore[union-attr]
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)  # type: ignore[union-attr]
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)  # type: ignore[union-attr]
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,  # type: ignore[union-attr]
                            int((idle + 15) * 1000))
        self._conn = conn

    def _load_known_hosts(self, client: paramiko.SSHClient) -> None:
        # HostKeys.load (not SSHClient.load_host_keys): no file name is remembered, so nothing
        # can ever save back into known_hosts.
        try:
            client.get_host_keys().load(self.known_hosts)
        except FileNotFoundError:
            pass  # no known hosts yet: every key is unknown
        except OSError as exc:
            raise HostKeyError(f"{self.host}: cannot read {self.known_hosts}: {exc.strerror}",
                               "ssh.known_hosts in the inventory names the file", host=self.host) from exc

    def _changed_key(self, exc: paramiko.BadHostKeyException) -> HostKeyError:
        known, offered = exc.expected_key, exc.key
        return HostKeyError(
            f"{self.host}: HOST KEY CHANGED for {known_hosts_name(self.address, self.port)}: "
            f"{self.known_hosts} has {known.get_name()} {fingerprint(known)}, the node offered "
            f"{offered.get_name()} {fingerprint(offered)}; nothing was run and {self.known_hosts} "
            "was left unchanged",
            "if the node was reinstalled, check the new fingerprint on its console and record it "
            f"with `clusterctl trust -i INVENTORY {self.host}` (replacing the old key); otherwise someone may be "
            "intercepting the connection",
            host=self.host)

    def _transport(self) -> paramiko.Transport:
        self.open()
        transport: paramiko.Transport = self._conn.transport
        return transport

    def _sftp(self) -> paramiko.SFTPClient:
        transport = self._transport()
        if self._sftp_client is None or self._sftp_client.get_channel() is None \
                or self._sftp_client.sock.closed:
            try:
                sftp = paramiko.SFTPClient.from_transport(transport, window_size=WINDOW_SIZE)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise TransportError(f"{self.host}: cannot start SFTP: {exc}",
                                     "the node's sshd needs an sftp Subsystem", host=self.host) from exc
            if sftp is None:
                raise TransportError(f"{self.host}: cannot start SFTP", host=self.host)
            self._sftp_client = sftp
        return self._sftp_client

    def close(self) -> None:
        if self._sftp_client is not None:
            with contextlib.suppress(Exception):
                self._sftp_client.close()
            self._sftp_client = None
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    # -- commands -----------------------------------------------------------------------------

    def run(self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 120.0,
            sudo: bool = False, env: Mapping[str, str] | None = None) -> CommandResult:
        """Run argv; never raises on a non-zero exit.

        rc is -1 when the command died from a signal (sshd then reports no exit status).
        `env` values appear on the node's command line: secrets go through `input`.
        """
        args = check_argv(argv)
        words = env_assignments(env)
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        full, gate = command_argv(args, words, sudo=sudo and self.user != "root", password=self.sudo_password)
        start = time.monotonic()
        deadline = start + timeout
        transport = self._transport()
        try:
            chan = transport.open_session(timeout=min(self.connect_timeout, timeout))
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self._raise_if_dropped(transport, args)
            raise TransportError(f"{self.host}: cannot start `{display(args)}`: {exc}", host=self.host) from exc
        marker = _PidMarker(lambda: chan.recv_stderr(READ_SIZE))
        exchange = Exchange(read_out=lambda: chan.recv(READ_SIZE), read_err=marker.read,
                            send=chan.sendall, close_stdin=chan.shutdown_write, input=input, gate=gate)
        finished = False
        try:
            try:
                chan.exec_command(shlex.join(marker.wrap(full)))
            except (paramiko.SSHException, OSError, EOFError) as exc:
                self._raise_if_dropped(transport, args)
                raise TransportError(f"{self.host}: cannot start `{display(args)}`: {exc}", host=self.host) from exc
            exchange.start()
            if not chan.status_event.wait(max(0.0, deadline - time.monotonic())):
                self._kill(chan, marker.pid)
                exchange.stop()
                raise CommandTimeout(timeout_message(self.host, args, timeout),
                                     "raise the timeout if the command legitimately needs longer",
                                     host=self.host)
            exchange.drain(deadline)
            finished = True
        finally:
            if not finished and not chan.status_event.is_set():  # interrupted: leave nothing running
                self._kill(chan, marker.pid)
            chan.close()
        rc = chan.exit_status
        if rc == -1:
            self._raise_if_dropped(transport, args)
        if exchange.error is not None:
            raise exchange.error
        return CommandResult(args, rc, exchange.stdout, exchange.stderr, time.monotonic() - start)

    def _raise_if_dropped(self, transport: paramiko.Transport, args: Sequence[str]) -> None:
        if not transport.is_active():
            self.close()
            raise ConnectError(f"{self.host}: the connection to {self.where} was lost during `{display(args)}`",
                               "the node may have rebooted or the network dropped; the command may or may "
                               "not have run", host=self.host)

    def _kill(self, chan: paramiko.Channel, pid: int | None) -> None:
        """SIGTERM, then SIGKILL, to the command's process group on the node; close the channel.

        The signals are sent by `kill` over a second channel of the same connection. Without a
        pid (the command never started) closing the channel is all there is.
        """
        if pid is not None and pid > 1:
            for sig in ("TERM", "KILL"):
                with contextlib.suppress(TransportError):
                    self.run(["sh", "-c", KILL_SCRIPT, "sh", str(pid), sig], timeout=max(5.0, self.connect_timeout))
                if chan.status_event.wait(KILL_GRACE):
                    break
        chan.close()

    # -- files --------------------------------------------------------------------------------

    def put(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        """Atomic small-file write (temp file created with `mode`, fsync, posix-rename).

        When the user is not root and may not write there, the file is staged in /tmp (0600)
        and moved into place with `sudo install -m MODE` + `sudo mv`.
        """
        directory, name = posixpath.split(path)
        if not name:
            raise ValueError(f"{path!r} names a directory, not a file")
        sftp = self._sftp()
        tmp = posixpath.join(directory, f".{name}.clusterctl-{secrets.token_hex(6)}")
        try:
            try:
                f = _sftp_create(sftp, tmp, mode, exclusive=True, bufsize=0)
            except FileNotFoundError:
                if not directory or not self._mkdir_p(directory):
                    raise PermissionError(errno.EACCES, "cannot create the directory") from None
                f = _sftp_create(sftp, tmp, mode, exclusive=True, bufsize=0)
        except PermissionError:
            if self.user == "root":
                raise TransportError(f"{self.host}: cannot write {path}: permission denied", host=self.host) from None
            self._put_sudo(path, data, mode)
            return
        except (OSError, paramiko.SFTPError) as exc:
            raise TransportError(f"{self.host}: cannot write {path}: {exc}", host=self.host) from exc
        try:
            with f:
                f.chmod(mode & 0o7777)  # the server's umask may have removed bits asked for
                f.set_pipelined(True)
                f.write(data)
                # the server handles requests in order: this fsync follows every write
                synced = self._fsync(sftp, f)
            # closing waited for every write's status
            if not synced:
                self.run(["sync", "--", tmp], timeout=60.0)  # best effort (GNU sync takes files)
            self._rename(sftp, tmp, path)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                sftp.remove(tmp)
            if isinstance(exc, (OSError, paramiko.SFTPError)):
                raise TransportError(f"{self.host}: cannot write {path}: {exc}", host=self.host) from exc
            raise

    def _fsync(self, sftp: paramiko.SFTPClient, f: paramiko.SFTPFile) -> bool:
        if self._fsync_ok is not False:
            self._fsync_ok = _sftp_fsync(sftp, f)
        return self._fsync_ok

    def _rename(self, sftp: paramiko.SFTPClient, tmp: str, path: str) -> None:
        try:
            sftp.posix_rename(tmp, path)
        except OSError as exc:
            if exc.errno is not None:  # a real error (ENOENT, EACCES...), not "unsupported"
                raise
            result = self.run(["mv", "-f", "--", tmp, path], timeout=60.0)
            if not result.ok:
                raise TransportError(f"{self.host}: cannot rename {tmp} to {path}: {result.err.strip()}",
                                     host=self.host) from exc

    def _mkdir_p(self, directory: str) -> bool:
        result = self.run(["mkdir", "-p", "--", directory], timeout=60.0)
        if result.ok:
            return True
        if self.user != "root":
            return False  # the caller takes the sudo route
        raise TransportError(f"{self.host}: cannot create {directory}: {result.err.strip()}", host=self.host)

    def _put_sudo(self, path: str, data: bytes, mode: int) -> None:
        sftp = self._sftp()
        staged = f"/tmp/.clusterctl-{secrets.token_hex(8)}"
        try:
            with _sftp_create(sftp, staged, 0o600, exclusive=True) as f:
                f.write(data)
            install_with_sudo(self.run, self.host, staged, path, mode)
        except (OSError, paramiko.SFTPError) as exc:
            raise TransportError(f"{self.host}: cannot stage {path} in /tmp: {exc}", host=self.host) from exc
        finally:
            with contextlib.suppress(Exception):
                sftp.remove(staged)

    def push(self, local: str, remote: str, *, mode: int = 0o644, progress: Progress | None = None) -> int:
        """Copy a large file over SFTP with pipelined writes, resuming after a remote prefix.

        A remote file of n <= size bytes is taken as the first n bytes already sent: writing
        continues at offset n (callers verify a checksum afterwards). Returns bytes sent.
        """
        try:
            total = os.path.getsize(local)
            src = open(local, "rb", buffering=0)  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise TransportError(f"{self.host}: cannot read {local}: {exc.strerror}", host=self.host) from exc
        sftp = self._sftp()
        sent = 0
        try:
            f, offset = self._open_for_push(sftp, remote, total, mode)
            with src, f:
                chan = sftp.get_channel()
                packet = chan.out_max_packet_size if chan is not None else 32768
                # one SFTP write per SSH packet: Paramiko's 32 KiB writes take two packets each
                room = packet - CHANNEL_PACKET_MARGIN - SFTP_WRITE_HEADER - len(cast(bytes, f.handle))
                f.MAX_REQUEST_SIZE = max(4096, min(f.MAX_REQUEST_SIZE, room))
                f.set_pipelined(True)
                f.seek(offset)
                src.seek(offset)
                if progress is not None:
                    progress(offset, total)
                while chunk := src.read(PUSH_CHUNK):
                    f.write(chunk)
                    sent += len(chunk)
                    if progress is not None:
                        progress(offset + sent, total)
            # leaving the block closed the file, which waits for every pipelined write's status
        except (OSError, EOFError, paramiko.SFTPError, paramiko.SSHException) as exc:
            # EOFError / SSHException: the connection died under the copy (keepalive, user timeout)
            raise TransportError(f"{self.host}: copying {local} to {remote} failed after {sent} bytes: "
                                 f"{exc or type(exc).__name__}",
                                 "run it again: the copy resumes where it stopped", host=self.host) from exc
        return sent

    def _open_for_push(self, sftp: paramiko.SFTPClient, remote: str, total: int,
                       mode: int) -> tuple[paramiko.SFTPFile, int]:
        try:
            have = sftp.stat(remote).st_size or 0
        except FileNotFoundError:
            have = -1
        if 0 <= have <= total:
            f = sftp.open(remote, "r+", bufsize=0)
            f.chmod(mode & 0o7777)
            return f, have
        try:
            f = _sftp_create(sftp, remote, mode, exclusive=False, bufsize=0)
        except FileNotFoundError:
            directory = posixpath.dirname(remote)
            if not directory or not self._mkdir_p(directory):
                raise
            f = _sftp_create(sftp, remote, mode, exclusive=False, bufsize=0)
        f.chmod(mode & 0o7777)
        return f, 0

    def get(self, path: str) -> bytes | None:
        sftp = self._sftp()
        try:
            with sftp.open(path, "rb") as f:
                f.prefetch(f.stat().st_size)
                return bytes(f.read())
        except FileNotFoundError:
            return None
        except PermissionError:
            if self.user == "root":
                raise TransportError(f"{self.host}: cannot read {path}: permission denied", host=self.host) from None
            return read_with_sudo(self.run, self.host, path)
        except (OSError, paramiko.SFTPError) as exc:
            raise TransportError(f"{self.host}: cannot read {path}: {exc}", host=self.host) from exc
