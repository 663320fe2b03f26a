"""Reading a secret a SecretRef points at (an environment variable or a 0600 file). Light:
no model or network code is imported here."""

from __future__ import annotations

import os
from pathlib import Path

from clusterctl.errors import InventoryError
from clusterctl.inventory import SecretRef


def read_secret(ref: SecretRef | None) -> str | None:
    """The secret a reference points at, or None when it is not set. Never logged."""
    if ref is None:
        return None
    if ref.env:
        return os.environ.get(ref.env) or None
    assert ref.file is not None
    path = Path(ref.file).expanduser()
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:  # never the bytes themselves: they may be the secret
        detail = "it is not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror
        raise InventoryError(f"cannot read the secret file: {detail}",
                             hint="it holds the secret as one line of text (mode 0600)", file=str(path)) from None
