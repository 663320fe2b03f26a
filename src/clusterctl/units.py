"""Byte sizes and durations as users write them: "80GiB", "77.3 GB", "512MiB", "5s"."""

from __future__ import annotations

import math
import re

from clusterctl.errors import HintedValueError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B|B)?\s*$", re.IGNORECASE)
_FACTORS = {
    "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "PIB": 2**50,
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(bit|bps|B)(?:/s)?\s*$")

MIB = 2**20
GIB = 2**30
MAX_SIZE = 2**60  # 1 EiB: far beyond any device, and exact in a float
MAX_DURATION = 366 * 86400.0  # a year
MAX_RATE = 1e15  # bytes/s: 8 Pbit/s
_SIZE_HINT = "write e.g. '80GiB' (binary, 2^30 bytes) or '77.3GB' (decimal, 10^9 bytes)"


def _shown(value: object) -> str:
    """A value quoted for a message, cut short when it is long."""
    text = str(value)
    return repr(text if len(text) <= 40 else text[:20] + "..." + text[-8:])


def parse_size(value: str | int) -> int:
    """Parse a byte size. Integers are bytes; strings need a unit (GiB is 2**30, GB is 10**9)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as '80GiB', got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        if value > MAX_SIZE:
            raise HintedValueError(f"{_shown(value)} bytes is larger than 1 EiB: not a size any device has",
                                   _SIZE_HINT)
        return value
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"'{value}' is not a size; write e.g. '80GiB' (binary) or '77.3GB' (decimal)")
    number, unit = m.groups()
    if unit is None:
        raise ValueError(f"'{value}' has no unit; write '{value}GiB' or '{value}GB' (GiB = 2^30 bytes)")
    size = float(number) * _FACTORS[unit.upper()]
    if not size <= MAX_SIZE:  # also inf, from a number too long for a float
        raise HintedValueError(f"{_shown(value)} is larger than 1 EiB: not a size any device has", _SIZE_HINT)
    return int(size)


def parse_duration(value: str | float | int) -> float:
    """Seconds from '5s', '250ms', '2m' or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '5s'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif not isinstance(value, str):
        raise ValueError("expected a duration such as '5s'")
    else:
        m = _DURATION_RE.match(value)
        if not m:
            raise ValueError(f"'{value}' is not a duration; write e.g. '5s', '250ms' or '2m'")
        number, unit = m.groups()
        seconds = float(number) * _DURATION_FACTORS[unit or "s"]
    if math.isnan(seconds) or abs(seconds) > MAX_DURATION:  # also inf and .nan from YAML
        raise HintedValueError(f"{_shown(value)} is not a duration a cluster waits for (at most a year)",
                               "write e.g. '30s', '250ms', '10m' or '2h'")
    return seconds


def parse_rate(value: str) -> float:
    """Bytes per second from '1Gbit', '100Mbit/s', '50MB/s'."""
    m = _RATE_RE.match(value) if isinstance(value, str) else None
    if not m:
        raise ValueError(f"'{value}' is not a link speed; write e.g. '1Gbit' or '100MB/s'")
    number, prefix, unit = m.groups()
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[prefix]
    bits = unit in ("bit", "bps")
    rate = float(number) * scale / (8 if bits else 1)
    if not rate <= MAX_RATE:
        raise HintedValueError(f"{_shown(value)} is faster than any link (at most 8 Pbit/s)",
                               "write the link's speed, e.g. '1Gbit', '25Gbit' or '100MB/s'")
    return rate


def fmt_gib(n: int | float, digits: int = 1) -> str:
    return f"{n / GIB:.{digits}f}"


def fmt_size(n: int | float) -> str:
    """Human size with binary units, e.g. '71.9 GiB'."""
    for unit, factor in (("TiB", 2**40), ("GiB", GIB), ("MiB", MIB), ("KiB", 2**10)):
        if abs(n) >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{int(n)} B"


def fmt_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
