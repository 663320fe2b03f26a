"""The baselines file `bench` writes next to the inventory (`.INVENTORY.baselines.json`) and
`verify` compares with: one reader, so that both refuse a damaged file the same way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clusterctl.errors import InventoryError

MAX_BASELINES_BYTES = 16 << 20


def baselines_path(inventory_path: Path) -> Path:
    return inventory_path.with_name(f".{inventory_path.stem}.baselines.json")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def read_baselines(path: Path, inventory: Path | None = None) -> dict[str, dict[str, Any]]:
    """The stored services (service -> tokens_per_second, ttft_seconds, facts); {} before the
    first bench. An InventoryError naming the file when it is not the JSON object bench writes
    (binary, a list, NaN)."""
    from clusterctl.yamlsrc import read_text_file  # the command line imports this module at start

    if not path.exists() and not path.is_symlink():
        return {}
    again = f"clusterctl bench -i {inventory}" if inventory is not None else "clusterctl bench"
    hint = f"bench writes it; delete it and run `{again}` to measure again"
    try:
        text = read_text_file(path, "the baselines file", hint, limit=MAX_BASELINES_BYTES)
    except InventoryError as exc:
        exc.hint = hint
        raise
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise InventoryError(f"the baselines file is not valid JSON: {exc.msg}", hint, file=str(path),
                             line=exc.lineno, column=exc.colno) from None
    except (ValueError, RecursionError) as exc:
        raise InventoryError(f"the baselines file is not valid JSON: {exc}", hint, file=str(path)) from None
    services = data.get("services", {}) if isinstance(data, dict) else None
    if not isinstance(services, dict):
        raise InventoryError("the baselines file is not a JSON object with 'services'", hint, file=str(path))
    return {k: v for k, v in services.items() if isinstance(v, dict)}
