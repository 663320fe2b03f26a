"""API keys: the clients' (one per line in `api_keys_file`) and each backend's upstream key.

Keys are read at start and again on SIGHUP; they are never logged. A client key is checked
by comparing SHA-256 digests with hmac.compare_digest against every stored key, so the time
taken does not depend on how much of a key matched nor on which key matched.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path


class KeyFileError(Exception):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path


def too_open(path: str) -> str | None:
    """Why a key file may not be used because other users can read or change it (like ssh
    refuses such a private key), or None. The files deploy writes are 0600, systemd
    credentials 0400."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None  # reading it says why
    if mode & 0o077:
        return f"the key file is open to other users (mode {mode:04o}); make it private: chmod 600 {path}"
    return None


def read_key_lines(path: str) -> list[str]:
    """The keys in a file: one per line; blank lines and lines starting with '#' are skipped.
    A file other users can read or write is refused (too_open)."""
    problem = too_open(path)
    if problem is not None:
        raise KeyFileError(path, problem)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise KeyFileError(path, f"cannot read the key file: {exc.strerror or exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def read_upstream_key(path: str) -> str:
    keys = read_key_lines(path)
    if not keys:
        raise KeyFileError(path, "the key file holds no key")
    return keys[0]


class ClientKeys:
    """The accepted client keys; `enabled` is False when the route table names no key file."""

    __slots__ = ("_digests", "enabled")

    def __init__(self, keys: list[str] | None) -> None:
        self.enabled = keys is not None
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys or []]

    @classmethod
    def from_file(cls, path: str | None) -> ClientKeys:
        return cls(None if path is None else read_key_lines(path))

    def __len__(self) -> int:
        return len(self._digests)

    def check_header(self, authorization: str | None) -> bool:
        """True when auth is off or `authorization` is `Bearer <a known key>`."""
        if not self.enabled:
            return True
        if not authorization or authorization[:7].lower() != "bearer ":
            return False
        digest = hashlib.sha256(authorization[7:].strip().encode()).digest()
        found = False
        for known in self._digests:
            found |= hmac.compare_digest(digest, known)
        return found
