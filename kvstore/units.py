"""Human byte sizes (``4GiB``, ``512 MB``) for flags, env vars and TOML."""

from __future__ import annotations

import re

from kvstore.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1 << 10,
    "kib": 1 << 10,
    "mi": 1 << 20,
    "mib": 1 << 20,
    "gi": 1 << 30,
    "gib": 1 << 30,
    "ti": 1 << 40,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int, *, what: str = "size") -> int:
    """Bytes from an int or a string with an optional SI/IEC unit."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a byte size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what}: must be >= 0, got {value}")
        return value
    m = _SIZE.match(str(value))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ConfigError(f"{what}: cannot read {value!r} as a size (e.g. 512MiB, 4GiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: float) -> str:
    """Short IEC rendering for humans: 2.0 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
