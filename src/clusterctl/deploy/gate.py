"""The write gate. A dry run hands its nodes a `ReadOnly` transport: it passes the probe and
file reads through and refuses every write, so a dry run is safe by construction, not by the
care of each code path."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from clusterctl.deploy import shell
from clusterctl.transport import CommandResult, Progress, Transport


class WriteRefused(RuntimeError):
    """A write reached the gate in a read-only run: a bug, never a user error."""


READ_SCRIPTS = ("probe", "sha256", "tcp-probe")


class ReadOnly:
    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.host = inner.host

    def run(self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 120.0,
            sudo: bool = False, env: Mapping[str, str] | None = None) -> CommandResult:
        args = list(argv)
        if not any(args[:3] == shell.argv(name)[:3] for name in READ_SCRIPTS):
            raise WriteRefused(f"{self.host}: a read-only run may not run {args[0]!r}")
        return self.inner.run(args, input=input, timeout=timeout, sudo=sudo, env=env)

    def put(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        raise WriteRefused(f"{self.host}: a read-only run may not write {path}")

    def push(self, local: str, remote: str, *, mode: int = 0o644, progress: Progress | None = None) -> int:
        raise WriteRefused(f"{self.host}: a read-only run may not copy to {remote}")

    def get(self, path: str) -> bytes | None:
        return self.inner.get(path)

    def close(self) -> None:
        self.inner.close()
