"""One deploy per inventory at a time: an flock the kernel releases if the holder dies."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from clusterctl.errors import LockedError


@contextlib.contextmanager
def cluster_lock(inventory_path: Path) -> Iterator[dict[str, object]]:
    """Yields what the previous holder left when it did not finish (a stale record)."""
    path = inventory_path.with_name(f".{inventory_path.stem}.deploy.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_fd(fd)
            raise LockedError(
                f"another deploy of {inventory_path.name} is running: pid {holder.get('pid')} on "
                f"{holder.get('host')}, started {holder.get('started')}",
                hint="wait for it to finish; the lock is released when it exits") from None
        stale = _read_fd(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode(), 0)
        os.fsync(fd)
        yield stale
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def _read_fd(fd: int) -> dict[str, object]:
    try:
        data = os.pread(fd, 4096, 0)
        value = json.loads(data) if data else {}
        return value if isinstance(value, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}
