"""The lock file next to an inventory: pinned revisions and cached model metadata.

`beefcake2.yaml` -> `beefcake2.lock` (JSON). `plan` reads it and never the network, so a
plan is reproducible and runs offline in CI.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from clusterctl.errors import InventoryError, MetadataError
from clusterctl.inventory import Inventory
from clusterctl.models.meta import FilePin, ModelMeta
from clusterctl.yamlsrc import read_text_file

LOCK_VERSION = 1


class LockedModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str
    revision: str | None = None
    meta: ModelMeta
    # hub sources: each file's size and sha256 at `revision`, keyed like meta.files; absent in
    # lock files written before pins (deploy then checks sizes only where it knows them)
    files: dict[str, FilePin] | None = None


class LockFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = LOCK_VERSION
    models: dict[str, LockedModel] = {}


def lock_path(inventory_path: Path) -> Path:
    return inventory_path.with_suffix(".lock")


MAX_LOCK_BYTES = 64 << 20

_REWRITE = "delete it and run `clusterctl resolve` to write it again"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def read_lock(path: Path) -> LockFile:
    if not path.exists() and not path.is_symlink():
        return LockFile()
    text = read_text_file(path, "the lock file", _REWRITE, limit=MAX_LOCK_BYTES)
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise InventoryError(f"lock file is not valid JSON: {exc.msg}", hint=_REWRITE,
                             file=str(path), line=exc.lineno, column=exc.colno) from None
    except (ValueError, RecursionError) as exc:  # NaN/Infinity, or nesting deeper than Python's stack
        detail = str(exc) if isinstance(exc, ValueError) else "nested too deeply"
        raise InventoryError(f"lock file is not valid JSON: {detail}", hint=_REWRITE,
                             file=str(path)) from None
    try:
        return LockFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InventoryError(f"lock file: {where}: {first['msg']}",
                             hint="run `clusterctl resolve` to rewrite it", file=str(path)) from None


def write_lock(path: Path, lock: LockFile) -> None:
    """Atomic write: temp file in the same directory, fsync, rename."""
    text = json.dumps(lock.model_dump(mode="json", exclude_none=True), indent=1, sort_keys=True) + "\n"
    if path.is_dir():
        raise InventoryError("the lock file is a directory, not a file",
                             hint="move the directory away; resolve writes the lock file there", file=str(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise InventoryError(f"cannot write the lock file: {exc.strerror or exc}",
                             hint=f"resolve writes it next to the inventory; check that {path.parent} "
                             "is a writable directory", file=str(path)) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def metas_for(inv: Inventory, lock: LockFile) -> dict[str, ModelMeta]:
    """Metadata of every model the inventory names, from the lock file.

    A lock entry whose source differs from the inventory's is stale and ignored."""
    out: dict[str, ModelMeta] = {}
    for name, model in inv.models.items():
        entry = lock.models.get(name)
        if entry is not None and entry.source == model.source:
            out[name] = entry.meta
    return out


def require_metas(inv: Inventory, lock: LockFile, path: Path) -> dict[str, ModelMeta]:
    metas = metas_for(inv, lock)
    # a custom service declares its memory: its model's files are deployed, never planned from
    used = {s.model for s in inv.services.values() if s.model and s.engine != "custom"}
    missing = sorted(m for m in used if m not in metas)
    if missing:
        stale = [m for m in missing if m in lock.models]
        detail = f" ({', '.join(stale)}: source changed since it was locked)" if stale else ""
        raise MetadataError(
            f"no pinned metadata for {', '.join(missing)} in {path}{detail}",
            hint=f"run `clusterctl resolve {inv.path or ''}`".rstrip() + " to read and pin it",
        )
    return metas
