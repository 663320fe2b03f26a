"""`clusterctl trust -i INVENTORY NODE`: record a node's SSH host key in known_hosts once the user confirms.

The key is read from the node without authenticating (`ssh.scan_host_key`), shown as
`node address type SHA256:...` to a `confirm` callback, and on yes appended to known_hosts
atomically. A different key already recorded for that host is refused unless `replace=True`:
that is what a reinstalled node, or an interception, looks like. Nothing here prints.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from clusterctl.transport import HostKeyError
from clusterctl.transport.ssh import known_hosts_name, scan_host_key, sha256_fingerprint


@dataclass(frozen=True)
class KnownHostsEntry:
    index: int  # line index in the file
    marker: str | None  # "@revoked" / "@cert-authority" or None
    hosts: str
    key_type: str
    key: str  # base64

    @property
    def fingerprint(self) -> str:
        return sha256_fingerprint(base64.b64decode(self.key))


def parse_known_hosts(lines: list[bytes]) -> list[KnownHostsEntry]:
    entries = []
    for index, raw in enumerate(lines):
        fields = raw.decode(errors="replace").split()
        if not fields or fields[0].startswith("#"):
            continue
        marker = fields.pop(0) if fields[0].startswith("@") else None
        if len(fields) < 3:
            continue
        with contextlib.suppress(ValueError):
            base64.b64decode(fields[2], validate=True)
            entries.append(KnownHostsEntry(index, marker, fields[0], fields[1], fields[2]))
    return entries


def host_matches(hosts: str, name: str) -> bool:
    """Whether a known_hosts host field names `name` (plain or hashed `|1|salt|hash` entries;
    wildcard patterns are not followed: trust records and checks exact names)."""
    for pattern in hosts.split(","):
        if pattern.startswith("|1|"):
            parts = pattern.split("|")
            if len(parts) != 4:
                continue
            try:
                salt, digest = base64.b64decode(parts[2]), base64.b64decode(parts[3])
            except ValueError:
                continue
            if hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), digest):
                return True
        elif pattern == name:
            return True
    return False


def trust(node_name: str, address: str, port: int, known_hosts_path: str, *,
          confirm: Callable[[str], bool], replace: bool = False, timeout: float = 10.0) -> str:
    """Record the node's host key after `confirm` says yes; returns what happened, in words.

    Raises HostKeyError when a different key is already recorded for the host (unless
    `replace`), or when the offered key is marked @revoked; ConnectError when unreachable.
    """
    path = os.path.realpath(os.path.expanduser(known_hosts_path))
    name = known_hosts_name(address, port)
    lines = _read_lines(path)
    entries = parse_known_hosts(lines)
    recorded = [e for e in entries if e.marker is None and host_matches(e.hosts, name)]
    key_type, key, fp = scan_host_key(address, port, timeout, prefer=[e.key_type for e in recorded])
    offered = f"{node_name} {name} {key_type} {fp}"
    if any(e.marker == "@revoked" and e.key == key for e in entries):
        raise HostKeyError(f"{node_name}: the key {name} offers ({key_type} {fp}) is marked @revoked in {path}",
                           "do not trust this node until its host key has been replaced", host=node_name)
    if any((e.key_type, e.key) == (key_type, key) for e in recorded):
        return f"{offered}: already trusted in {path}; nothing changed"
    if recorded and not replace:
        known = ", ".join(f"{e.key_type} {e.fingerprint}" for e in recorded)
        raise HostKeyError(
            f"{node_name}: {path} already has a different key for {name} ({known}); "
            f"the node now offers {key_type} {fp}; nothing changed",
            "if the node was reinstalled, check the new fingerprint on its console, then trust it "
            "again replacing the old key; otherwise someone may be intercepting the connection",
            host=node_name)
    if not confirm(offered):
        return f"{offered}: not trusted; {path} unchanged"
    drop = {e.index for e in recorded} if replace else set()
    kept = [line for i, line in enumerate(lines) if i not in drop]
    if kept and not kept[-1].endswith(b"\n"):
        kept[-1] += b"\n"
    kept.append(f"{name} {key_type} {key}\n".encode())
    _write_atomic(path, b"".join(kept))
    replaced = f", replacing {len(drop)} old entr{'y' if len(drop) == 1 else 'ies'}" if drop else ""
    return f"{offered}: recorded in {path}{replaced}"


def _read_lines(path: str) -> list[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read().splitlines(keepends=True)
    except FileNotFoundError:
        return []


def _write_atomic(path: str, data: bytes) -> None:
    """Same directory temp file (0600, or the existing file's mode), fsync, rename."""
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600
    tmp = os.path.join(directory, f".{os.path.basename(path)}.clusterctl-{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
