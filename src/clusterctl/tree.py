"""A rendered tree on the controller's disk: write it atomically, or diff against it."""

from __future__ import annotations

import difflib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clusterctl.errors import UsageError
from clusterctl.render import RenderedFile

_NOT_A_FOLDER_HINT = "name a folder to write the rendered tree into (it is created when missing), e.g. --out rendered"


def local_path(root: Path, f: RenderedFile) -> Path:
    return root / f.node / f.path.lstrip("/")


def check_tree(files: list[RenderedFile], root: Path, *, write: bool) -> None:
    """Refuse, before anything is written, a tree that cannot be written: `root` (or a folder on
    the way to one of its files) is a file, a device or /dev/null, or (`write`) the folder that
    would hold it is not writable. A UsageError naming --out."""
    paths = [root] + [local_path(root, f) for f in files]
    for path in paths:
        for part in (*reversed(path.parents), path):
            if part in (Path("."), Path("/")) or not (part.exists() or part.is_symlink()):
                continue
            if part.is_dir():
                continue
            if part == path and path != root and part.is_file():  # a file the tree replaces
                break
            raise UsageError(f"--out {root}: {part} is not a folder", _NOT_A_FOLDER_HINT)
    if not write:
        return
    folder = next(p for p in (root, *root.parents) if p.exists())
    try:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(folder))
        fd, probe = tempfile.mkstemp(prefix=".clusterctl-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"--out {root}: cannot write in {folder}: {(exc.strerror or str(exc)).lower()}",
                         "name a folder you can write to, e.g. --out rendered") from None


def _atomic_write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_tree(files: list[RenderedFile], root: Path) -> int:
    """Write every file whose content differs; return how many were written."""
    written = 0
    for f in files:
        path = local_path(root, f)
        try:
            same = path.read_text(encoding="utf-8") == f.content and (path.stat().st_mode & 0o7777) == f.mode
        except OSError:
            same = False
        if not same:
            try:
                _atomic_write(path, f.content, f.mode)
            except OSError as exc:  # e.g. the disk filled up: the files written so far are whole
                raise UsageError(f"--out {root}: cannot write {path}: {(exc.strerror or str(exc)).lower()}",
                                 f"{written} file(s) were written, each whole; free space and render again") from None
            written += 1
    return written


@dataclass(frozen=True)
class Change:
    node: str
    path: str
    kind: str  # new, changed, mode
    diff: str
    restarts: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "path": self.path, "kind": self.kind, "restarts": list(self.restarts),
                "diff": self.diff}


def diff_tree(files: list[RenderedFile], root: Path) -> list[Change]:
    changes = []
    for f in files:
        path = local_path(root, f)
        if not path.exists():
            changes.append(Change(f.node, f.path, "new", "", f.restarts))
            continue
        try:
            old = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:  # a folder or unreadable where the file would be
            changes.append(Change(f.node, f.path, "changed", f"cannot read {path}: {exc.strerror or exc}",
                                  f.restarts))
            continue
        if old != f.content:
            text = "".join(difflib.unified_diff(old.splitlines(keepends=True), f.content.splitlines(keepends=True),
                                                f"a{f.path}", f"b{f.path}"))
            changes.append(Change(f.node, f.path, "changed", text, f.restarts))
        elif (path.stat().st_mode & 0o7777) != f.mode:
            changes.append(Change(f.node, f.path, "mode", f"mode {oct(f.mode)}", f.restarts))
    return changes
