"""Configuration: one frozen dataclass per component, loaded in one place.

Sources, later ones winning: built-in defaults < TOML file < environment
(``KVSTORE_<SECTION>_<FIELD>``, e.g. ``KVSTORE_DRAM_CAPACITY=8GiB``) < explicit
overrides (CLI flags, keyword arguments). Sizes accept units (``512MiB``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomllib

from kvstore.errors import ConfigError
from kvstore.units import parse_size

MiB = 1 << 20
GiB = 1 << 30

_SIZE_FIELDS = {"capacity", "page_size", "segment_size"}


def default_dram_capacity() -> int:
    """A quarter of available memory, capped at 4 GiB and at least 64 MiB."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(
                int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable")
            )
    except (OSError, StopIteration):
        avail = 4 * GiB
    return max(64 * MiB, min(avail // 4, 4 * GiB))


def default_data_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvstore"


@dataclass(frozen=True)
class DramConfig:
    """The host-memory pool. ``page_size`` 0 picks capacity/64 within [1, 64] MiB."""

    capacity: int = field(default_factory=default_dram_capacity)
    page_size: int = 0
    high_watermark: float = 0.90
    low_watermark: float = 0.75
    prefault: bool = True
    hugepages: bool = True

    def __post_init__(self) -> None:
        if self.capacity <= 0:
            raise ConfigError(f"dram.capacity must be > 0, got {self.capacity}")
        if not 0.0 < self.low_watermark < self.high_watermark <= 1.0:
            raise ConfigError(
                "need 0 < dram.low_watermark < dram.high_watermark <= 1, got "
                f"{self.low_watermark} and {self.high_watermark}"
            )
        if self.page_size and (self.page_size & (self.page_size - 1) or self.page_size < 4096):
            raise ConfigError(
                f"dram.page_size must be a power of two >= 4096, got {self.page_size}"
            )

    @property
    def effective_page_size(self) -> int:
        if self.page_size:
            return self.page_size
        target = max(MiB, min(64 * MiB, self.capacity // 64))
        return 1 << (target.bit_length() - 1)


@dataclass(frozen=True)
class SsdConfig:
    """The SSD tier: append-only segment files under ``path`` (None: no SSD tier)."""

    path: Path | None = None
    capacity: int = 64 * GiB
    segment_size: int = 256 * MiB
    compression: str = "none"
    sync_writes: bool = False
    compact_garbage_ratio: float = 0.5
    flush_on_close: bool = True  # write DRAM-only blocks to SSD at close

    def __post_init__(self) -> None:
        if self.path is not None and not isinstance(self.path, Path):
            object.__setattr__(self, "path", Path(self.path).expanduser())
        if self.capacity <= 0 or self.segment_size < 64 * 1024:
            raise ConfigError("ssd.capacity must be > 0 and ssd.segment_size >= 64KiB")
        if self.compression not in ("none", "lz4"):
            raise ConfigError(f"ssd.compression must be 'none' or 'lz4', got {self.compression!r}")
        if not 0.0 < self.compact_garbage_ratio <= 1.0:
            raise ConfigError("ssd.compact_garbage_ratio must lie in (0, 1]")

    @property
    def enabled(self) -> bool:
        return self.path is not None


@dataclass(frozen=True)
class StoreConfig:
    dram: DramConfig = field(default_factory=DramConfig)
    ssd: SsdConfig = field(default_factory=SsdConfig)
    eviction: str = "prefix-lru"
    promote_on_hit: bool = True

    @classmethod
    def load(
        cls,
        toml_path: str | os.PathLike[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        defaults: Mapping[str, Any] | None = None,
    ) -> StoreConfig:
        """Merge ``defaults``, a TOML file, ``KVSTORE_*`` env vars and dotted overrides.

        Override keys are dotted (``"dram.capacity"``, ``"eviction"``); None values
        are ignored so argparse results can be passed straight through.
        """
        flat: dict[str, Any] = dict(defaults or {})
        if toml_path is not None:
            try:
                with open(toml_path, "rb") as f:
                    doc = tomllib.load(f)
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise ConfigError(f"cannot read config file {toml_path}: {e}") from None
            for k, v in doc.items():
                if isinstance(v, dict):
                    flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
                else:
                    flat[k] = v
        for dotted in _known_keys():
            var = "KVSTORE_" + dotted.replace(".", "_").upper()
            if env is not None and var in env:
                flat[dotted] = env[var]
        flat.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return _build(flat)


_SECTIONS: dict[str, Any] = {"dram": DramConfig, "ssd": SsdConfig}


def _known_keys() -> list[str]:
    keys = [f"{sec}.{f.name}" for sec, cls in _SECTIONS.items() for f in fields(cls)]
    return keys + [f.name for f in fields(StoreConfig) if f.name not in _SECTIONS]


def _coerce(name: str, value: Any, default: Any) -> Any:
    short = name.rsplit(".", 1)[-1]
    if short in _SIZE_FIELDS:
        return parse_size(value, what=name)
    if isinstance(default, bool) or short in (
        "prefault",
        "hugepages",
        "sync_writes",
        "promote_on_hit",
    ):
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected a boolean, got {value!r}")
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if short == "path":
        return None if value in ("", "none", None) else Path(str(value)).expanduser()
    return str(value)


def _build(flat: Mapping[str, Any]) -> StoreConfig:
    known = set(_known_keys())
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ConfigError(
            f"unknown config keys: {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    base = StoreConfig()
    top: dict[str, Any] = {}
    for section in _SECTIONS:
        current = getattr(base, section)
        sub = {
            k.split(".", 1)[1]: _coerce(k, v, getattr(current, k.split(".", 1)[1]))
            for k, v in flat.items()
            if k.startswith(section + ".")
        }
        if section == "dram" and "capacity" not in sub:
            sub["capacity"] = current.capacity
        top[section] = replace(current, **sub)
    for k, v in flat.items():
        if "." not in k:
            top[k] = _coerce(k, v, getattr(base, k))
    return replace(base, **top)
